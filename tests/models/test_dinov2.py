from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from omnilabel.errors import CheckpointError, InputError
from omnilabel.models.dinov2 import (
    DEFAULT_WEIGHTS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    load_dinov2,
    normalize_images,
    patch_size,
    patch_tokens,
)
from omnilabel.models.registry import REGISTRY
from omnilabel.models.tiny_dinov2 import build_tiny_dinov2
from tests.cli_runner import run_in_process


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_dinov2(tmp_path_factory.mktemp("dinov2") / "tiny", seed=0)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_dinov2(tiny_dir)


def _copy(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(config_changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


# --- the tiny model and the loader --------------------------------------------------------------------------


def test_tiny_build_is_small_seeded_and_leaves_the_global_rng_alone(tiny_dir, tmp_path):
    assert sorted(p.name for p in tiny_dir.iterdir()) == ["config.json", "model.safetensors"]
    assert (tiny_dir / "model.safetensors").stat().st_size < 1 << 20
    torch.manual_seed(123)
    before = torch.get_rng_state()
    again = build_tiny_dinov2(tmp_path / "again", seed=0)
    assert torch.equal(torch.get_rng_state(), before)
    assert (again / "model.safetensors").read_bytes() == (tiny_dir / "model.safetensors").read_bytes()
    other = build_tiny_dinov2(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()


def test_loaded_model_is_frozen_in_eval_mode(tiny):
    assert type(tiny).__name__ == "Dinov2Model" and not tiny.training
    params = list(tiny.parameters())
    assert params and not any(p.requires_grad for p in params)
    assert all(p.dtype == torch.float32 for p in params)
    assert patch_size(tiny) == 8 and tiny.config.hidden_size == 64


@pytest.mark.parametrize(("batch", "height", "width"), [(2, 128, 128), (1, 96, 128), (1, 8, 24)])
def test_patch_tokens_grid_for_several_input_sizes(tiny, batch, height, width):
    pixels = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(0))
    grid = patch_tokens(tiny, pixels)
    assert grid.shape == (batch, 64, height // 8, width // 8) and grid.dtype == torch.float32
    assert not grid.requires_grad and torch.isfinite(grid).all()
    # the same tokens as the model's own output, CLS dropped, in row-major patch order
    hidden = tiny(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(grid.flatten(2).transpose(1, 2), hidden[:, 1:])


def test_token_i_j_describes_patch_i_j(tmp_path):
    # Without transformer blocks, a token sees only its own patch: perturbing patch (1, 2) moves token (1, 2).
    model = load_dinov2(build_tiny_dinov2(tmp_path / "flat", num_layers=0))
    pixels = torch.randn(1, 3, 24, 32, generator=torch.Generator().manual_seed(1))
    moved = pixels.clone()
    moved[:, :, 8:16, 16:24] += 1.0
    changed = (patch_tokens(model, moved) - patch_tokens(model, pixels)).abs().amax(dim=1)[0]
    assert changed.shape == (3, 4)
    assert changed[1, 2] > 1e-3 and (changed > 1e-6).sum() == 1


def test_patch_tokens_rejects_sizes_off_the_patch_grid_and_other_channels(tiny):
    with pytest.raises(InputError, match="not a multiple of its patch size 8"):
        patch_tokens(tiny, torch.zeros(1, 3, 100, 128))
    with pytest.raises(InputError, match="not a multiple"):
        patch_tokens(tiny, torch.zeros(1, 3, 128, 4))
    with pytest.raises(InputError, match=r"\(B, 3, H, W\)"):
        patch_tokens(tiny, torch.zeros(1, 1, 128, 128))
    with pytest.raises(InputError, match=r"\(B, 3, H, W\)"):
        patch_tokens(tiny, torch.zeros(3, 128, 128))


def test_missing_folder_or_config_names_the_folder(tiny_dir, tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'nowhere'}.*config.json is missing"):
        load_dinov2(tmp_path / "nowhere")
    no_config = tmp_path / "no_config"
    shutil.copytree(tiny_dir, no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(CheckpointError, match=f"{no_config}.*config.json is missing"):
        load_dinov2(no_config)


def test_missing_weights_file_is_a_checkpoint_error(tiny_dir, tmp_path):
    folder = _copy(tiny_dir, tmp_path / "no_weights")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=f"cannot load DINOv2 from {folder}"):
        load_dinov2(folder)


def test_weights_of_another_width_name_the_mismatch(tiny_dir, tmp_path):
    folder = _copy(tiny_dir, tmp_path / "narrow", hidden_size=32)
    with pytest.raises(CheckpointError) as err:
        load_dinov2(folder)
    msg = str(err.value)
    assert str(folder) in msg and "mismatched keys" in msg
    assert "embeddings.cls_token (checkpoint (1, 1, 64), model (1, 1, 32))" in msg


def test_weights_missing_for_a_deeper_config_are_named(tiny_dir, tmp_path):
    folder = _copy(tiny_dir, tmp_path / "deeper", num_hidden_layers=3)
    with pytest.raises(CheckpointError, match=r"missing keys: encoder\.layer\.2\."):
        load_dinov2(folder)


def test_a_config_of_another_model_is_refused(tiny_dir, tmp_path):
    folder = _copy(tiny_dir, tmp_path / "resnet", model_type="resnet")
    with pytest.raises(CheckpointError, match="'resnet' model, not a DINOv2"):
        load_dinov2(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_dinov2(folder)


# --- normalize_images --------------------------------------------------------------------------------------


def test_normalize_images_imagenet_statistics_and_layout():
    images = np.zeros((2, 4, 6, 3), np.uint8)
    images[0, 1, 2] = (255, 0, 51)
    x = normalize_images(images)
    assert x.shape == (2, 3, 4, 6) and x.dtype == torch.float32
    expected = [(1.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], -IMAGENET_MEAN[1] / IMAGENET_STD[1],
                (0.2 - IMAGENET_MEAN[2]) / IMAGENET_STD[2]]
    torch.testing.assert_close(x[0, :, 1, 2], torch.tensor(expected))
    torch.testing.assert_close(x[1, :, 0, 0], -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD))
    torch.testing.assert_close(normalize_images(list(images)), x)


def test_normalize_images_rejects_bad_input():
    with pytest.raises(InputError, match="uint8"):
        normalize_images(np.zeros((1, 4, 4, 3), np.float32))
    with pytest.raises(InputError, match=r"\(B, H, W, 3\)"):
        normalize_images(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(InputError, match="one size"):
        normalize_images([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5, 3), np.uint8)])
    with pytest.raises(InputError, match="no images"):
        normalize_images([])


# --- the registry and `omnilabel weights list` ---------------------------------------------------------------


def test_the_default_weights_are_registered_and_listed(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("OMNILABEL_CACHE", str(tmp_path / "cache"))
    assert REGISTRY[DEFAULT_WEIGHTS].kind == "dinov2"
    code, out, _ = run_in_process(capsys, "weights", "list")
    assert code == 0
    for name in ("dinov2-small", "dinov2-base"):
        line = next(line for line in out.splitlines() if name in line)
        assert "dinov2" in line.replace(name, "") and " no " in line
