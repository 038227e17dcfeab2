"""`omnilabel pseudomask --prompter prompter.pt`: UOIS-SAM's generated prompts label the tags and unlabelled images."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from cli_runner import run_in_process as run
from cli_runner import run_ok, run_subprocess
from job_outputs import assert_same_annotations
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from omnilabel.data.weak import split_coco
from omnilabel.errors import CheckpointError
from omnilabel.jobs.options import Dataset, JobOptions
from omnilabel.jobs.pseudomask import PseudomaskConfig, run_pseudomask
from omnilabel.models.dinov2 import load_dinov2
from omnilabel.models.sam_loader import load_sam
from omnilabel.models.tiny import build_tiny_sam, save_sam_checkpoint
from omnilabel.models.tiny_clip import build_tiny_clip
from omnilabel.models.tiny_dinov2 import build_tiny_dinov2
from omnilabel.teachers.loading import TeacherSpec
from omnilabel.teachers.teacher_ckpt import state_dict_sha256
from omnilabel.teachers.uois import HDNet, Hpg, HpgConfig, UoisConfig, sam_checksums, save_prompter

#: Thresholds low enough that the random tiny models give a few masks per image (the paper's would drop all).
HPG = HpgConfig(input_hw=(64, 48), head_width=32, fg_thresh=0.0, peak_thresh=0.0, max_peaks=8)
UOIS = UoisConfig(score_thresh=0.0, nms_iou=0.7, max_area_px=None)


def _prompter(path: Path, dino: Path, sam_path: Path, *, seed: int = 0) -> Path:
    """A prompter file: a random HPG head on the tiny DINOv2 and a fresh HDNet, recorded against ``sam_path``."""
    backbone = load_dinov2(dino)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hpg = Hpg(backbone, HPG)
    sam = load_sam(sam_path)
    return save_prompter(path, hpg=hpg, hdnet=HDNet(dim=sam.mask_decoder.transformer_dim), uois=UOIS,
                         backbone={"id": dino.name, "source": str(dino), "sha256": state_dict_sha256(
                             backbone.state_dict()), "hidden_size": 64, "patch_size": 8},
                         sam={"id": sam_path.name, "source": str(sam_path), **sam_checksums(sam)}, training={})


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_sam_path) -> dict[str, Path]:
    """The prompter of the tiny SAM, one of another SAM, and the tiny DINOv2 both run on."""
    root = tmp_path_factory.mktemp("prompter")
    dino = build_tiny_dinov2(root / "dinov2", patch_size=8)
    other_sam = save_sam_checkpoint(build_tiny_sam(seed=1), root / "other_sam.pth")
    return {"prompter": _prompter(root / "prompter.pt", dino, tiny_sam_path),
            "other": _prompter(root / "other.pt", dino, other_sam), "dinov2": dino}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> tuple[str, Path]:
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny_clip.pt", seed=0)


@pytest.fixture(scope="module")
def data(shapes_coco, tmp_path_factory) -> Path:
    """The synthetic dataset with a tags split: a quarter of the images keep their masks."""
    root = tmp_path_factory.mktemp("prompted") / "data"
    shutil.copytree(shapes_coco.parent, root)
    gt = json.loads((root / "coco.json").read_text())
    (root / "weak_tags.json").write_text(json.dumps(split_coco(gt, fully=0.25, weak="tags", seed=0)))
    return root


def _args(data: Path, sam: Path, prompter: Path, weak: str, *extra) -> list:
    """``pseudomask weak_WEAK.json --detector none --prompter PROMPTER`` with the tiny SAM."""
    return ["pseudomask", data / f"weak_{weak}.json", "--images", data / "images", "--sam", sam,
            "--detector", "none", "--prompter", prompter, *extra]


@contextlib.contextmanager
def _worker_threads() -> Iterator[None]:
    """Torch threads as a Ray worker of two gets them (its share of the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(JobOptions(num_workers=2).threads_per_worker())
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def none_run(data, tiny_sam_path, models) -> Path:
    """``--weak none --detector none --prompter`` in this process, with the threads a Ray worker of two gets (so
    that the Ray run is compared bit for bit)."""
    out = data / "none_ref.json"
    with _worker_threads():
        run_ok(*_args(data, tiny_sam_path, models["prompter"], "tags", "--weak", "none", "--batch-size", "3",
                      "-o", out))
    return out


def test_unlabelled_images_take_class_agnostic_masks_of_a_declared_object_category(data, none_run, models):
    coco = COCO(str(none_run))
    weak = json.loads((data / "weak_tags.json").read_text())
    assert coco.dataset["images"] == weak["images"]  # no image left out without a detector
    object_id = max(c["id"] for c in weak["categories"]) + 1
    assert coco.dataset["categories"] == [*weak["categories"],
                                          {"id": object_id, "name": "object", "supercategory": "object"}]
    recorded = coco.dataset["info"]["omnilabel"]["prompter"]
    assert recorded["category_id"] == object_id and recorded["classifier"] is None
    assert recorded["file"] == str(models["prompter"].resolve()) and len(recorded["sha256"]) == 64
    assert recorded["backbone"] == str(models["dinov2"].resolve())
    assert coco.dataset["info"]["omnilabel"]["models"]["prompter"] == "prompter.pt"
    full = set(weak["omnilabel_split"]["full_image_ids"])
    pseudo = [a for a in coco.dataset["annotations"] if a["omnilabel"]["source"] == "pseudo"]
    gt = [a for a in coco.dataset["annotations"] if a["omnilabel"]["source"] == "gt"]
    assert {a["image_id"] for a in gt} == full
    assert {a["image_id"] for a in pseudo} == {im["id"] for im in weak["images"]} - full  # a few masks each
    sizes = {im["id"]: (im["width"], im["height"]) for im in weak["images"]}
    for a in pseudo:
        info = a["omnilabel"]
        assert a["category_id"] == object_id and info["weak"] == "none" and info["weak_id"] is None
        assert set(info["prompt"]) == {"point"} and "clip_score" not in info
        x, y = info["prompt"]["point"]
        w, h = sizes[a["image_id"]]
        assert 0 <= x < w and 0 <= y < h
        assert a["score"] == pytest.approx(min(max(info["prompter_score"], 0.0), 1.0), abs=1e-6)
        assert info["teacher"]["prompter"] == "prompter.pt" and a["area"] > 0
    # pycocotools evaluates it against the GT (the `object` class has no GT: it is simply not scored)
    gt_coco = COCO(str(data / "coco.json"))
    assert len(gt_coco.loadRes(coco.dataset["annotations"]).getAnnIds()) == len(coco.dataset["annotations"])
    records = [json.loads(line) for shard in sorted((data / "none_ref.job" / "shards").glob("*.jsonl"))
               for line in shard.read_text().splitlines()]
    assert {r["image_id"] for r in records if "prompter" in r["seconds"]} == {im["id"] for im in weak["images"]} - full


def test_with_clip_each_mask_is_labelled_among_the_image_tags(capsys, data, tiny_sam_path, models, tiny_clip):
    out = data / "tags_clip.json"
    code, _, err = run(capsys, *_args(data, tiny_sam_path, models["prompter"], "tags", "--clip", tiny_clip[1],
                                      "--clip-arch", tiny_clip[0], "--proposal-threshold", "0", "-o", out))
    assert code == 0, err
    coco = COCO(str(out))
    weak = json.loads((data / "weak_tags.json").read_text())
    assert coco.dataset["categories"] == weak["categories"]  # classified: no category of its own
    tags: dict[int, set[int]] = {}
    for a in weak["annotations"]:
        if "segmentation" not in a:
            tags.setdefault(a["image_id"], set()).add(a["category_id"])
    pseudo = [a for a in coco.dataset["annotations"] if a["omnilabel"]["source"] == "pseudo"]
    assert {a["image_id"] for a in pseudo} == set(tags)
    for a in pseudo:
        info = a["omnilabel"]
        assert info["weak"] == "tags" and a["category_id"] in tags[a["image_id"]]
        assert 0.0 <= info["clip_score"] <= 1.0 and set(info["prompt"]) == {"point"}
        expected = min(max(info["prompter_score"], 0.0), 1.0) * info["clip_score"]
        assert a["score"] == pytest.approx(expected, abs=2e-6)
        assert info["teacher"]["classifier"] == tiny_clip[1].name
    recorded = coco.dataset["info"]["omnilabel"]["prompter"]
    assert recorded["category_id"] is None and recorded["classifier"] == tiny_clip[1].name
    assert recorded["threshold"] == 0.0
    # the same masks as without CLIP, in the same order: classification only labels them (threshold 0 keeps all)
    code, _, err = run(capsys, *_args(data, tiny_sam_path, models["prompter"], "tags", "-o", data / "tags_obj.json"))
    assert code == 0, err
    agnostic = [a for a in json.loads((data / "tags_obj.json").read_text())["annotations"]
                if a["omnilabel"]["source"] == "pseudo"]
    assert {a["category_id"] for a in agnostic} == {max(c["id"] for c in weak["categories"]) + 1}
    assert [(a["image_id"], a["segmentation"], a["omnilabel"]["prompt"]) for a in agnostic] == [
        (a["image_id"], a["segmentation"], a["omnilabel"]["prompt"]) for a in pseudo]


def test_a_class_agnostic_mask_of_an_annotated_object_is_a_duplicate(capsys, data, tiny_sam_path, models, none_run):
    done = json.loads(none_run.read_text())
    pseudo = [a for a in done["annotations"] if a["omnilabel"]["source"] == "pseudo"]
    image_id = pseudo[0]["image_id"]
    masks = [a for a in pseudo if a["image_id"] == image_id]
    # that image with its first prompter mask as a GT mask of class 1 and a tag: the prompter's masks are the
    # same (they do not depend on the labels), and the first is the annotated object again
    weak = json.loads((data / "weak_tags.json").read_text())
    weak["images"] = [im for im in weak["images"] if im["id"] == image_id]
    first = masks[0]
    weak["annotations"] = [{"id": 1, "image_id": image_id, "category_id": 1, "segmentation": first["segmentation"],
                            "area": first["area"], "bbox": first["bbox"], "iscrowd": 0},
                           {"id": 2, "image_id": image_id, "category_id": 2}]
    (data / "weak_dup.json").write_text(json.dumps(weak))
    out = data / "dup.json"
    with _worker_threads():  # as the reference run, so that the masks are the same to the pixel
        code, _, err = run(capsys, *_args(data, tiny_sam_path, models["prompter"], "dup", "-o", out))
    assert code == 0, err
    # dropped: the mask of the annotated object, of another class (`object` vs 1), and any other at IoU >= 0.5
    rles = [{**a["segmentation"], "counts": a["segmentation"]["counts"].encode()} for a in masks]
    iou = mask_utils.iou(rles[1:], rles[:1], [0]).reshape(-1)
    kept = [a["segmentation"] for a, v in zip(masks[1:], iou, strict=True) if v < 0.5]
    anns = json.loads(out.read_text())["annotations"]
    assert [a["omnilabel"]["source"] for a in anns] == ["gt"] + ["pseudo"] * len(kept)
    assert [a["segmentation"] for a in anns[1:]] == kept
    assert all(a["omnilabel"]["weak"] == "tags" for a in anns[1:])


def test_a_prompter_of_another_sam_is_refused_before_any_image(capsys, data, tiny_sam_path, models, tmp_path):
    out = tmp_path / "out.json"
    code, _, err = run(capsys, *_args(data, tiny_sam_path, models["other"], "tags", "-o", out))
    assert code == 1
    assert "CheckpointError" not in err  # a one-line message, not a traceback
    assert str(models["other"].resolve()) in err and "other_sam.pth" in err and f"--sam {tiny_sam_path}" in err
    assert not out.exists() and not list((tmp_path / "out.job" / "shards").glob("*.jsonl"))
    # the library raises it when the models load, before the first shard
    spec = TeacherSpec(sam=str(tiny_sam_path), detector="none", prompter=str(models["other"]))
    with pytest.raises(CheckpointError, match="trained against SAM other_sam.pth"):
        run_pseudomask(Dataset(data / "weak_tags.json", data / "images"), tmp_path / "lib.json",
                       config=PseudomaskConfig(teachers=spec))
    assert not (tmp_path / "lib.json").exists() and not list((tmp_path / "lib.job" / "shards").glob("*.jsonl"))


def test_proposals_or_a_refiner_with_a_prompter_are_refused(capsys, data, tiny_sam_path, models, tmp_path):
    out = tmp_path / "out.json"
    code, _, err = run(capsys, *_args(data, tiny_sam_path, models["prompter"], "tags", "--proposals",
                                      tmp_path / "entities.json", "-o", out))
    assert code == 1 and "--prompter and --proposals" in err
    code, _, err = run(capsys, *_args(data, tiny_sam_path, models["prompter"], "tags", "--refiner",
                                      tmp_path / "refiner.pt", "-o", out))
    assert code == 1 and "--refiner cannot score prompter masks" in err
    assert not out.exists() and not (tmp_path / "out.job").exists()


def test_a_killed_job_resumes_and_another_setting_is_another_job(capsys, data, tiny_sam_path, models, none_run,
                                                                 tiny_clip):
    out = data / "resume.json"
    common = [*_args(data, tiny_sam_path, models["prompter"], "tags", "--weak", "none", "--batch-size", "3"),
              "-o", out]
    code, _, err = run(capsys, *common)
    assert code == 0, err
    assert out.read_bytes() == none_run.read_bytes()
    shards = sorted((data / "resume.job" / "shards").glob("*.jsonl"))
    assert len(shards) == 4
    # as if killed after two shards: the others and the output are gone
    for s in shards[2:]:
        s.unlink()
    out.unlink()
    stamps = {s: s.stat().st_mtime_ns for s in shards[:2]}
    code, stdout, err = run(capsys, *common)
    assert code == 0, err
    assert "resumed" in stdout and all(s.stat().st_mtime_ns == t for s, t in stamps.items())
    assert out.read_bytes() == none_run.read_bytes()
    # classifying the masks is another job, and so is another prompter file at the same path
    code, _, err = run(capsys, *common, "--clip", tiny_clip[1], "--clip-arch", tiny_clip[0])
    assert code == 1 and "different job" in err and "prompter" in err
    moved = data / "moving.pt"
    shutil.copy(models["prompter"], moved)
    other = [*_args(data, tiny_sam_path, moved, "tags", "--weak", "none", "--batch-size", "3"), "-o", out]
    code, _, err = run(capsys, *other, "--overwrite")
    assert code == 0, err
    _prompter(moved, models["dinov2"], tiny_sam_path, seed=1)
    code, _, err = run(capsys, *other)
    assert code == 1 and "different job" in err and "prompter" in err


def test_two_ray_workers_equal_in_process(data, tiny_sam_path, models, none_run):
    out = data / "none_ray.json"
    done = run_subprocess(*_args(data, tiny_sam_path, models["prompter"], "tags", "--weak", "none",
                                 "--batch-size", "3", "--num-workers", "2", "-o", out))
    assert done.returncode == 0, done.stderr
    assert len(list((data / "none_ray.job" / "shards").glob("*.jsonl"))) == 4
    ref, par = json.loads(none_run.read_text()), json.loads(out.read_text())
    assert par["categories"] == ref["categories"] and par["info"]["omnilabel"] == ref["info"]["omnilabel"]
    assert_same_annotations(ref["annotations"], par["annotations"], ignore=("score", "omnilabel"))
    for a, b in zip(ref["annotations"], par["annotations"], strict=True):
        assert a["omnilabel"].get("prompt") == b["omnilabel"].get("prompt")
        assert a["omnilabel"].get("prompter_score") == pytest.approx(b["omnilabel"].get("prompter_score"), abs=1e-5)
    assert any(a["omnilabel"]["source"] == "pseudo" for a in par["annotations"])


def test_evaluate_scores_a_class_agnostic_file_over_one_category(data, none_run, tmp_path):
    """`evaluate` counts every GT and predicted class as the declared `object`: AP and the UOIS metrics."""
    from omnilabel.eval.report import evaluate_files

    got = evaluate_files(none_run, data / "coco.json", uois=True, json_out=tmp_path / "m.json")
    assert got["class_agnostic"] and 0.0 <= got["segm"]["AP"] <= 1.0 and got["images"] == 12
    # the GT masks passed through are found, whatever their class: AP over them alone is 1
    pred = json.loads(none_run.read_text())
    full = set(json.loads((data / "weak_tags.json").read_text())["omnilabel_split"]["full_image_ids"])
    pred["images"] = [im for im in pred["images"] if im["id"] in full]
    pred["annotations"] = [a for a in pred["annotations"] if a["image_id"] in full]
    only_gt = tmp_path / "only_gt.json"
    only_gt.write_text(json.dumps(pred))
    assert evaluate_files(only_gt, data / "coco.json", uois=True)["segm"]["AP"] == pytest.approx(1.0)
    assert json.loads((tmp_path / "m.json").read_text())["class_agnostic"] is True
