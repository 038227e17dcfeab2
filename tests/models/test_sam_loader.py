from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import sam_model_registry

from omnilabel.errors import CheckpointError
from omnilabel.models.sam_loader import (
    OFFICIAL_SAM_ARCHS,
    SamArch,
    build_sam_from_arch,
    load_sam,
    sam_arch_from_state_dict,
)
from omnilabel.models.tiny import build_tiny_sam, save_sam_checkpoint


def _meta_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    sam = build_tiny_sam(seed=3)
    return sam, save_sam_checkpoint(sam, tmp_path_factory.mktemp("sam") / "tiny.pth")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("vit_b", (768, 12, 12, (2, 5, 8, 11))),
        ("vit_l", (1024, 24, 16, (5, 11, 17, 23))),
        ("vit_h", (1280, 32, 16, (7, 15, 23, 31))),
    ],
)
def test_arch_inferred_from_official_state_dicts(name, expected):
    # Meta's own builder on the meta device: real shapes, no memory.
    with torch.device("meta"):
        official = sam_model_registry[name]()
    sd = official.state_dict()
    arch = sam_arch_from_state_dict(sd)
    assert (arch.embed_dim, arch.depth, arch.num_heads, arch.global_attn_indexes) == expected
    assert (arch.window_size, arch.patch_size, arch.image_size, arch.out_chans) == (14, 16, 1024, 256)
    assert arch == OFFICIAL_SAM_ARCHS[name]
    with torch.device("meta"):
        ours = build_sam_from_arch(arch)
    assert _meta_shapes(ours) == _meta_shapes(official)


def test_arch_inferred_from_tiny_model():
    sam = build_tiny_sam()
    assert sam_arch_from_state_dict(sam.state_dict()) == SamArch(
        embed_dim=32,
        depth=2,
        num_heads=2,
        global_attn_indexes=(1,),
        window_size=4,
        patch_size=16,
        image_size=256,
        out_chans=256,
    )


def test_non_default_tiny_arch_round_trips(tmp_path):
    sam = build_tiny_sam(
        embed_dim=128, depth=4, num_heads=4, global_attn_indexes=(1, 3), patch_size=8, image_size=128, seed=1
    )
    loaded = load_sam(save_sam_checkpoint(sam, tmp_path / "sam.pth"))
    arch = sam_arch_from_state_dict(loaded.state_dict())
    assert arch == SamArch(128, 4, 4, (1, 3), 4, 8, 128, 256)
    assert not loaded.training
    for k, v in sam.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    x = torch.randint(0, 255, (1, 3, 128, 128)).float()
    with torch.no_grad():
        assert torch.allclose(sam.image_encoder(sam.preprocess(x)), loaded.image_encoder(loaded.preprocess(x)))


def test_load_restores_pixel_normalisation(tiny_ckpt):
    _, path = tiny_ckpt
    loaded = load_sam(path)
    assert torch.equal(loaded.pixel_mean.flatten(), torch.tensor([123.675, 116.28, 103.53]))
    assert torch.equal(loaded.pixel_std.flatten(), torch.tensor([58.395, 57.12, 57.375]))


@pytest.mark.parametrize("wrapper", ["model", "state_dict", "module_prefix", "safetensors"])
def test_wrapped_and_safetensors_checkpoints_load(tiny_ckpt, tmp_path, wrapper):
    sam, _ = tiny_ckpt
    sd = {k: v.contiguous() for k, v in sam.state_dict().items()}
    if wrapper == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "sam.safetensors"
        save_file(sd, str(path))
    else:
        path = tmp_path / "sam.pth"
        if wrapper == "module_prefix":
            torch.save({f"module.{k}": v for k, v in sd.items()}, path)
        else:
            torch.save({wrapper: sd, "epoch": torch.tensor(3)}, path)
    loaded = load_sam(path)
    key = "mask_decoder.iou_prediction_head.layers.0.weight"
    assert torch.equal(loaded.state_dict()[key], sd[key])


def _save_sd(sd, path):
    torch.save(sd, path)
    return path


def test_missing_key_is_named(tiny_ckpt, tmp_path):
    sam, _ = tiny_ckpt
    sd = sam.state_dict()
    del sd["mask_decoder.iou_token.weight"]
    del sd["image_encoder.blocks.0.mlp.lin1.bias"]
    with pytest.raises(CheckpointError, match="missing keys") as err:
        load_sam(_save_sd(sd, tmp_path / "sam.pth"))
    assert "mask_decoder.iou_token.weight" in str(err.value)
    assert "image_encoder.blocks.0.mlp.lin1.bias" in str(err.value)


def test_unexpected_key_is_named(tiny_ckpt, tmp_path):
    sam, _ = tiny_ckpt
    sd = sam.state_dict()
    sd["mask_decoder.extra_head.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match="unexpected keys: mask_decoder.extra_head.weight"):
        load_sam(_save_sd(sd, tmp_path / "sam.pth"))


def test_many_missing_keys_are_listed_with_a_count(tiny_ckpt, tmp_path):
    sam, _ = tiny_ckpt
    sd = {k: v for k, v in sam.state_dict().items() if not k.startswith("mask_decoder.")}
    with pytest.raises(CheckpointError, match=r"more\)"):
        load_sam(_save_sd(sd, tmp_path / "sam.pth"))


def test_shape_mismatch_is_named(tiny_ckpt, tmp_path):
    sam, _ = tiny_ckpt
    sd = sam.state_dict()
    sd["mask_decoder.iou_token.weight"] = torch.zeros(1, 128)
    with pytest.raises(CheckpointError, match="mask_decoder.iou_token.weight"):
        load_sam(_save_sd(sd, tmp_path / "sam.pth"))


def test_state_dict_of_another_model_is_rejected(tmp_path):
    path = _save_sd(torch.nn.Linear(3, 4).state_dict(), tmp_path / "linear.pth")
    with pytest.raises(CheckpointError, match="not a SAM checkpoint.*patch_embed"):
        load_sam(path)


def test_corrupt_file_names_the_path(tiny_ckpt, tmp_path):
    _, good = tiny_ckpt
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:5000])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    for path in (truncated, garbage):
        with pytest.raises(CheckpointError, match="cannot read SAM checkpoint") as err:
            load_sam(path)
        assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_sam(tmp_path / "nope.pth")


def test_tiny_sam_is_seeded_and_keeps_global_rng():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_tiny_sam(seed=5)
    after = torch.rand(1)
    b = build_tiny_sam(seed=5)
    c = build_tiny_sam(seed=6)
    assert torch.equal(before, after)
    key = "mask_decoder.output_upscaling.0.weight"
    assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert not torch.equal(a.state_dict()[key], c.state_dict()[key])


def test_init_sam_writes_a_loadable_untrained_sam_of_the_given_arch(capsys, tmp_path):
    from cli_runner import run_in_process

    from omnilabel.models.sam_loader import SamArch, init_sam_checkpoint

    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    code, out, err = run_in_process(capsys, "weights", "init-sam", a, "--embed-dim", "32", "--depth", "2",
                                    "--num-heads", "2", "--global-attn", "1", "--window-size", "4",
                                    "--patch-size", "8", "--image-size", "64", "--prompt-dim", "64", "--seed", "3")
    assert code == 0, err
    assert "wrote" in out and "untrained" in out
    arch = SamArch(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=4, patch_size=8,
                   image_size=64, out_chans=64)
    sam = load_sam(a)
    assert sam_arch_from_state_dict(sam.state_dict()) == arch
    assert sam.prompt_encoder.embed_dim == 64 and sam.image_encoder.img_size == 64
    init_sam_checkpoint(arch, b, seed=3)
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    init_sam_checkpoint(arch, b, seed=4)
    assert not torch.equal(sa["image_encoder.patch_embed.proj.weight"],
                           torch.load(b, weights_only=True)["image_encoder.patch_embed.proj.weight"])
    # the 128-wide decoder decodes masks of the input size from box prompts
    from omnilabel.teachers.sam import SamTeacher

    teacher = SamTeacher(sam)
    emb = teacher.encode(np.zeros((50, 70, 3), dtype=np.uint8))
    masks = teacher.predict(emb, boxes_xyxy=np.array([[5.0, 5.0, 40.0, 30.0]])).masks
    assert masks.shape == (1, 50, 70)


@pytest.mark.parametrize(("flags", "message"), [
    (["--embed-dim", "30", "--num-heads", "4"], "multiple of num heads"),
    (["--image-size", "100", "--patch-size", "16"], "multiple of patch size"),
    (["--global-attn", "7"], "not in 0..3"),
    (["--global-attn", "one"], "comma-separated"),
])
def test_init_sam_refuses_inconsistent_archs(capsys, tmp_path, flags, message):
    from cli_runner import run_in_process

    code, _, err = run_in_process(capsys, "weights", "init-sam", tmp_path / "x.pth", *flags)
    assert code == 1 and message in err and not (tmp_path / "x.pth").exists()
