"""`finetune-teacher --stable` end to end on the tiny SAM: only the plugins train, the file holds only them, and
`pseudomask --teacher st.pt` decodes with them (on the base's decoder, or on a fine-tuned teacher's)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import run_in_process as run
from cli_runner import run_ok
from pycocotools.coco import COCO

from omnilabel.data.images import read_image_rgb
from omnilabel.data.weak import split_coco
from omnilabel.errors import CheckpointError
from omnilabel.jobs.options import Dataset, JobOptions
from omnilabel.jobs.train_teacher import TeacherRecipe, run_finetune_teacher
from omnilabel.models.sam_loader import load_sam
from omnilabel.models.tiny import save_sam_checkpoint
from omnilabel.teachers.finetune import FinetuneConfig
from omnilabel.teachers.finetune_data import collect_training_set
from omnilabel.teachers.loading import TeacherSpec, load_teachers, resolve_paths
from omnilabel.teachers.stable import StableAttentionBlock, plugins_of
from omnilabel.teachers.teacher_ckpt import read_teacher

SMALL = {"batch_size": 4, "num_points": 256, "log_every": 1}


@pytest.fixture(scope="module")
def data(shapes_coco, tmp_path_factory) -> Path:
    """The synthetic scenes, half the images weakened to boxes."""
    root = tmp_path_factory.mktemp("stable_data")
    shutil.copytree(shapes_coco.parent, root / "data")
    gt = json.loads((root / "data" / "coco.json").read_text())
    (root / "data" / "weak_boxes.json").write_text(json.dumps(split_coco(gt, fully=0.5, weak="boxes", seed=0)))
    return root / "data"


@pytest.fixture(scope="module")
def stable(data, tiny_sam_path, tmp_path_factory) -> tuple[Path, str]:
    """Plugins trained through the CLI for Stable-SAM's default of one epoch (batch 4); the printed summary."""
    out = tmp_path_factory.mktemp("stable_cli") / "st.pt"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        run_ok("finetune-teacher", data / "weak_boxes.json", "--images", data / "images", "--sam", tiny_sam_path,
               "--stable", "--batch-size", "4", "-o", out)
    return out, buf.getvalue()


def _spec(sam: Path | None, teacher: Path) -> TeacherSpec:
    return TeacherSpec(sam=None if sam is None else str(sam), detector="none", teacher=str(teacher))


def _teacher(sam: Path | None, teacher: Path):
    spec = _spec(sam, teacher)
    return load_teachers(spec, resolve_paths(spec, load_detector=False)).sam


def _sam_state(sam) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v for part in ("prompt_encoder", "mask_decoder")
            for k, v in getattr(sam, part).state_dict().items()}


def test_stable_run_trains_only_the_plugins_and_writes_only_them(stable, data, tiny_sam_path):
    out, printed = stable
    tf = read_teacher(out)
    images, instances = collect_training_set(json.loads((data / "weak_boxes.json").read_text()), data / "images")
    assert tf.meta["step"] == math.ceil(len(instances) / 4)  # 1 epoch by default
    assert tf.is_stable and not tf.decoder_included and tf.meta["version"] == 2 and tf.meta["start"] is None
    assert {k.split(".")[0] for k in tf.state} == {"stable"}
    assert out.stat().st_size < 1 << 20  # SAM's own 256-wide decoder: ~330 KB of plugins
    params = sum(v.numel() for v in tf.state.values())
    assert params == tf.meta["stable"]["parameters"] == 81_827
    assert "trainable parameters" in printed and "81,827" in printed
    config = tf.meta["config"]
    assert config["stable"] and config["lr"] == 1e-3 and config["weight_decay"] == 0.0
    run_dir = out.with_name("st.run")
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert log[0]["trainable_parameters"] == 81_827
    assert {r["lr"] for r in log if r["event"] == "step"} == {1e-3}  # no drop
    assert len(list(run_dir.glob("embeddings/*/*.pt"))) == len(images)  # each image encoded once
    # SAM's weights in the run are exactly the base's; the plugins moved from their zero init
    base = _sam_state(load_sam(tiny_sam_path))
    trained = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]
    plugin_keys = {k for k in trained if ".stable." in k}
    assert set(trained) - plugin_keys == set(base)
    assert all(torch.equal(trained[k], base[k]) for k in base)
    assert tf.state["stable.layers.1.offset.4.weight"].abs().sum() > 0  # zero at init
    assert not torch.equal(tf.state["stable.layers.1.router.mlp.3.weight"],
                           torch.zeros_like(tf.state["stable.layers.1.router.mlp.3.weight"]))


def test_pseudomask_decodes_with_the_plugin_file(capsys, stable, data, tiny_sam_path, tmp_path):
    out, _ = stable
    pseudo = tmp_path / "pseudo.json"
    code, _, err = run(capsys, "pseudomask", data / "weak_boxes.json", "--weak", "boxes", "--images",
                       data / "images", "--detector", "none", "--teacher", out, "--num-workers", "0", "-o", pseudo)
    assert code == 0, err  # no --sam: the base recorded in the plugin file
    anns = [a for a in COCO(str(pseudo)).dataset["annotations"] if a["omnilabel"]["source"] == "pseudo"]
    assert anns and all(a["omnilabel"]["teacher"] == {"sam": tiny_sam_path.name, "teacher": "st.pt"} for a in anns)
    # the plugins are in the decode path: the masks are not the base SAM's
    teacher, base = _teacher(None, out), _teacher(tiny_sam_path, out)
    assert isinstance(teacher.sam.mask_decoder.transformer.layers[1], StableAttentionBlock)
    plain = load_teachers(TeacherSpec(sam=str(tiny_sam_path), detector="none"),
                          resolve_paths(TeacherSpec(sam=str(tiny_sam_path), detector="none"),
                                        load_detector=False)).sam
    image = read_image_rgb(sorted((data / "images").iterdir())[0])
    emb = plain.encode(image)
    boxes = np.array([[10.0, 12.0, 60.0, 70.0], [30.0, 5.0, 90.0, 40.0]])
    a, b = plain.predict(emb, boxes_xyxy=boxes), teacher.predict(emb, boxes_xyxy=boxes)
    assert np.abs(a.low_res_logits - b.low_res_logits).max() > 1e-4
    np.testing.assert_array_equal(b.low_res_logits, base.predict(emb, boxes_xyxy=boxes).low_res_logits)


def test_plugins_on_another_decoder_are_refused(capsys, stable, data, tiny_sam_path, tmp_path):
    out, _ = stable
    other = load_sam(tiny_sam_path)  # the same image encoder, another decoder
    with torch.no_grad():
        other.mask_decoder.transformer.layers[1].mlp.lin1.weight.mul_(1.01)
    other_path = save_sam_checkpoint(other, tmp_path / "other_decoder.pth")
    with pytest.raises(CheckpointError, match="st.pt.*decoder.*--sam") as exc:
        _teacher(other_path, out)
    assert str(tiny_sam_path.resolve()) in str(exc.value)
    code, _, err = run(capsys, "pseudomask", data / "weak_boxes.json", "--weak", "boxes", "--images",
                       data / "images", "--detector", "none", "--teacher", out, "--sam", other_path,
                       "--num-workers", "0", "-o", tmp_path / "p.json")
    assert code == 1 and "st.pt" in err and "--sam" in err


def _finetune(data: Path, sam: Path, out: Path, **settings) -> dict:
    teacher = settings.pop("teacher", None)
    recipe = TeacherRecipe(FinetuneConfig(**{**SMALL, **settings}), sam=str(sam),
                           teacher=None if teacher is None else str(teacher))
    return run_finetune_teacher(Dataset(data / "weak_boxes.json", data / "images"), out, JobOptions(num_workers=0),
                                recipe)


def test_plugins_on_a_fine_tuned_teacher_load_its_decoder(data, tiny_sam_path, tmp_path):
    first = tmp_path / "t" / "bp.pt"
    _finetune(data, tiny_sam_path, first, steps=2, lr=1e-3)
    out = tmp_path / "t" / "st_on_bp.pt"
    summary = _finetune(data, tiny_sam_path, out, steps=2, stable=True, teacher=first)
    assert summary["trainable_parameters"] == 81_827
    tf = read_teacher(out)
    assert tf.meta["start"]["source"] == str(first.resolve()) and len(tf.meta["start"]["sha256"]) == 64
    assert {k.split(".")[0] for k in tf.state} == {"stable"}
    teacher = _teacher(None, out)
    decoder = {k: v for k, v in _sam_state(teacher.sam).items() if ".stable." not in k}
    start = read_teacher(first).state
    base = _sam_state(load_sam(tiny_sam_path))
    assert decoder.keys() == start.keys()
    assert all(torch.equal(decoder[k], start[k]) for k in start)  # the fine-tuned decoder, not the base's
    assert any(not torch.equal(start[k], base[k]) for k in start)
    assert plugins_of(teacher.sam.mask_decoder).state_dict().keys() == {k[len("stable."):] for k in tf.state}
    # moved together, the start teacher is found beside the plugins
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(out, moved / out.name)
    shutil.copy(first, moved / first.name)
    first.rename(tmp_path / "elsewhere.pt")
    assert isinstance(_teacher(None, moved / out.name).sam.mask_decoder.transformer.layers[1], StableAttentionBlock)
    (moved / first.name).unlink()
    with pytest.raises(CheckpointError, match="put that teacher file back"):
        _teacher(None, moved / out.name)
    # another decoder at the recorded place: refused, naming the plugin file and what to do
    state = torch.load(tmp_path / "elsewhere.pt", map_location="cpu", weights_only=True)
    state["state"]["mask_decoder.transformer.layers.1.mlp.lin1.weight"] *= 1.01
    torch.save(state, first)
    with pytest.raises(CheckpointError, match="st_on_bp.pt.*finetune-teacher --stable --teacher"):
        _teacher(None, out)


def test_plugin_files_are_not_starting_points(capsys, stable, data, tiny_sam_path, tmp_path):
    out, _ = stable
    code, _, err = run(capsys, "finetune-teacher", data / "weak_boxes.json", "--images", data / "images",
                       "--sam", tiny_sam_path, "--teacher", out, "-o", tmp_path / "x.pt")
    assert code == 1 and "Stable-SAM plugins only" in err
    code, _, err = run(capsys, "finetune-teacher", data / "weak_boxes.json", "--images", data / "images",
                       "--sam", tiny_sam_path, "--stable", "--class-aware", "-o", tmp_path / "y.pt")
    assert code == 1 and "--stable" in err
    assert not (tmp_path / "x.run").exists() and not (tmp_path / "y.run").exists()
