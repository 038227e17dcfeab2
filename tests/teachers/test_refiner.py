"""SUM's refiner (``finetune-teacher --prompts refine``): its training pairs, its run, and where it may be used."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import run_in_process as run
from pycocotools import mask as mask_utils

from omnilabel.data.images import read_image_rgb
from omnilabel.data.weak import split_coco
from omnilabel.errors import InputError, JobError
from omnilabel.jobs.options import Dataset, JobOptions
from omnilabel.jobs.train_teacher import TeacherRecipe, run_finetune_teacher
from omnilabel.models.sam_loader import load_sam
from omnilabel.ops.masks import segmentation_to_rle
from omnilabel.teachers.finetune import FinetuneConfig
from omnilabel.teachers.finetune_data import collect_training_set
from omnilabel.teachers.teacher_ckpt import read_teacher
from omnilabel.teachers.uncertainty import PairSet

EXAMPLE_TEACHER = Path(__file__).resolve().parents[2] / "examples" / "teacher" / "shapes-sam.pt"
#: The refiner run every test here shares (``min_iou`` 0: every pair kept), and the one a resume must reproduce.
RECIPE = {"prompts": "refine", "steps": 4, "batch_size": 4, "lr": 1e-4, "num_points": 256, "min_iou": 0.0,
          "checkpoint_every": 2, "log_every": 1}


@pytest.fixture(scope="module")
def data(shapes_coco, tmp_path_factory) -> Path:
    """The synthetic scenes, half of the images keeping their masks (the refiner's training set)."""
    root = tmp_path_factory.mktemp("refiner_data")
    shutil.copytree(shapes_coco.parent, root / "data")
    gt = json.loads((root / "data" / "coco.json").read_text())
    (root / "data" / "weak.json").write_text(json.dumps(split_coco(gt, fully=0.5, weak="boxes", seed=0)))
    return root / "data"


def _gt_masks(data: Path) -> dict[int, np.ndarray]:
    """Annotation id → (H, W) bool mask of every annotation of weak.json with a segmentation."""
    coco = json.loads((data / "weak.json").read_text())
    sizes = {im["id"]: (im["height"], im["width"]) for im in coco["images"]}
    out = {}
    for a in coco["annotations"]:
        if "segmentation" in a:
            h, w = sizes[a["image_id"]]
            out[a["id"]] = mask_utils.decode(segmentation_to_rle(a["segmentation"], h, w)).astype(bool)
    return out


def _train(data: Path, sam: Path, out: Path, *, on_event=None, coco: Path | None = None,
           **settings) -> tuple[dict, list[dict]]:
    """An in-process refiner run of ``RECIPE`` (with ``settings`` replaced) on ``coco`` (default weak.json) and
    ``data``'s images; its summary and events."""
    events: list[dict] = []

    def record(ev: dict) -> None:
        events.append(ev)
        if on_event is not None:
            on_event(ev)

    settings = {**RECIPE, **settings}
    job = JobOptions(num_workers=0, resume=settings.pop("resume", False), overwrite=settings.pop("overwrite", False))
    summary = run_finetune_teacher(Dataset(coco or data / "weak.json", data / "images"), out, job,
                                   TeacherRecipe(FinetuneConfig(**settings), sam=str(sam)), on_event=record)
    return summary, events


@pytest.fixture(scope="module")
def refiner(data, tiny_sam_path, tmp_path_factory) -> tuple[Path, dict, list[dict]]:
    out = tmp_path_factory.mktemp("refiner_run") / "r.pt"
    summary, events = _train(data, tiny_sam_path, out)
    return out, summary, events


def _pair_files(run_dir: Path) -> list[Path]:
    files = sorted(run_dir.glob("embeddings/*/pairs-*/*.pt"))
    assert files, f"no pair files under {run_dir}"
    return files


def _pair_ious(run_dir: Path) -> np.ndarray:
    return np.concatenate([torch.load(f, weights_only=True)["iou"].numpy() for f in _pair_files(run_dir)])


# -- the run --------------------------------------------------------------------------------------------


def test_a_refiner_run_writes_a_refine_file_with_a_pair_per_gt_mask(refiner, data, tiny_sam_path):
    out, summary, events = refiner
    n_gt = len(_gt_masks(data))
    assert n_gt >= 6
    tf = read_teacher(out)
    assert tf.meta["prompts"] == "refine" and tf.meta["step"] == RECIPE["steps"]
    assert {k.split(".")[0] for k in tf.state} == {"prompt_encoder", "mask_decoder"} and not tf.encoder_included
    assert tf.meta["base"]["source"] == str(tiny_sam_path.resolve())
    assert summary["pairs"] == {"kept": n_gt, "dropped": 0} and summary["instances"] == n_gt
    pairs = [ev for ev in events if ev.get("event") == "pairs"]
    assert pairs == [{"event": "pairs", "kept": n_gt, "dropped": 0, "min_iou": 0.0}]
    # one file per training image, one row per GT mask of it, IoUs in [0, 1]
    files = _pair_files(Path(summary["run_dir"]))
    assert len(files) == summary["images"]
    ious = _pair_ious(Path(summary["run_dir"]))
    assert len(ious) == n_gt and (ious >= 0).all() and (ious <= 1).all()


def test_min_iou_splits_the_pairs_into_kept_and_dropped(capsys, refiner, data, tiny_sam_path, tmp_path):
    _, summary, _ = refiner
    ious = np.sort(_pair_ious(Path(summary["run_dir"])))
    n_gt = len(ious)
    cut = round(float((ious[n_gt // 2 - 1] + ious[n_gt // 2]) / 2), 6)
    assert ious[n_gt // 2 - 1] < cut < ious[n_gt // 2], "pair IoUs tie at the median: pick another threshold"
    kept = int((ious >= cut).sum())
    images, _ = collect_training_set(json.loads((data / "weak.json").read_text()), data / "images")
    pair_dir = _pair_files(Path(summary["run_dir"]))[0].parent
    pairs = PairSet.read(pair_dir, images, min_iou=cut)
    assert (len(pairs), pairs.dropped) == (kept, n_gt - kept) and (pairs.iou >= cut).all()
    at = PairSet.read(pair_dir, images, min_iou=float(ious[n_gt // 2]))  # a pair exactly at --min-iou is kept
    assert len(at) == n_gt - n_gt // 2
    code, out, err = run(capsys, "finetune-teacher", data / "weak.json", "--images", data / "images", "--sam",
                         tiny_sam_path, "--prompts", "refine", "--min-iou", str(cut), "--steps", "1",
                         "--batch-size", "4", "-o", tmp_path / "r.pt")
    assert code == 0, err
    assert f"refiner training pairs: {kept} kept, {n_gt - kept} dropped" in err
    assert f"{kept} / {n_gt - kept}" in out
    assert read_teacher(tmp_path / "r.pt").meta["config"]["min_iou"] == pytest.approx(cut, abs=1e-6)


def test_a_min_iou_no_pair_reaches_fails_clearly(capsys, refiner, data, tiny_sam_path, tmp_path):
    _, summary, _ = refiner
    assert _pair_ious(Path(summary["run_dir"])).max() < 1.0  # so that --min-iou 1.0 leaves nothing
    code, _, err = run(capsys, "finetune-teacher", data / "weak.json", "--images", data / "images", "--sam",
                       tiny_sam_path, "--prompts", "refine", "--min-iou", "1.0", "--steps", "1", "--batch-size", "4",
                       "-o", tmp_path / "r.pt")
    assert code == 1 and "Traceback" not in err
    assert "no training pair for the refiner" in err and "--min-iou 1.0" in err and "Lower --min-iou" in err
    assert not (tmp_path / "r.pt").exists()
    with pytest.raises(InputError, match="no training pair"):
        _train(data, tiny_sam_path, tmp_path / "api.pt", min_iou=1.0)


def test_a_resumed_refiner_run_equals_an_uninterrupted_one(refiner, data, tiny_sam_path, tmp_path):
    whole, _, _ = refiner

    class Stop(Exception):
        pass

    def stop_at_2(ev: dict) -> None:
        if ev.get("event") == "step" and ev["step"] == 2:
            raise Stop

    cut = tmp_path / "cut.pt"
    with pytest.raises(Stop):
        _train(data, tiny_sam_path, cut, on_event=stop_at_2)
    assert not cut.exists()
    stamps = {f: f.stat().st_mtime_ns for f in _pair_files(tmp_path / "cut.run")}
    with pytest.raises(JobError, match="--resume"):
        _train(data, tiny_sam_path, cut)
    summary, events = _train(data, tiny_sam_path, cut, resume=True)
    assert summary["start_step"] == 2 and [ev["step"] for ev in events if ev.get("event") == "step"] == [3, 4]
    assert {f: f.stat().st_mtime_ns for f in _pair_files(tmp_path / "cut.run")} == stamps, "pairs recomputed"
    a, b = read_teacher(whole).state, read_teacher(cut).state
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_overwrite_with_another_input_recomputes_the_pairs(data, tiny_sam_path, tmp_path):
    _train(data, tiny_sam_path, tmp_path / "r.pt", steps=1)
    coco = json.loads((data / "weak.json").read_text())  # the same images, the first GT mask gone
    first = next(a for a in coco["annotations"] if "segmentation" in a)
    coco["annotations"] = [a for a in coco["annotations"] if a["id"] != first["id"]]
    fewer = tmp_path / "fewer.json"
    fewer.write_text(json.dumps(coco))
    images, instances = collect_training_set(coco, data / "images")
    summary, _ = _train(data, tiny_sam_path, tmp_path / "r.pt", coco=fewer, steps=1, overwrite=True)
    assert summary["pairs"]["kept"] + summary["pairs"]["dropped"] == len(instances)
    by_id = {im.image_id: i for i, im in enumerate(images)}
    for path in _pair_files(tmp_path / "r.run"):
        rows = torch.load(path, weights_only=True)["index"].tolist()
        assert [instances[k].image_index for k in rows] == [by_id[int(path.stem)]] * len(rows), path


# -- the pairs -----------------------------------------------------------------------------------------


def test_each_pair_is_sams_best_multimask_output_for_a_click_in_its_gt_mask(refiner, data, tiny_sam_path):
    """Recompute each pair with segment_anything's own predictor: the click's 3 multimask outputs, the one
    with the highest IoU against the GT is the pair's mask prompt, its tight box the pair's box."""
    from segment_anything import SamPredictor

    _, summary, _ = refiner
    coco = json.loads((data / "weak.json").read_text())
    images, instances = collect_training_set(coco, data / "images")
    gts = _gt_masks(data)
    predictor = SamPredictor(load_sam(tiny_sam_path))
    by_id = {im.image_id: im for im in images}
    checked = 0
    for path in _pair_files(Path(summary["run_dir"])):
        image = by_id[int(path.stem)]
        pair = torch.load(path, weights_only=True)
        predictor.set_image(read_image_rgb(image.path))
        rows = pair["index"].tolist()
        assert [instances[k].image_index for k in rows] == [images.index(image)] * len(rows)
        for j, k in enumerate(rows):
            gt = gts[instances[k].annotation_id]
            x, y = pair["point"][j].tolist()
            assert x % 1 == 0.5 and y % 1 == 0.5 and gt[int(y), int(x)], "the click must be a pixel of the GT"
            logits, _, low = predictor.predict(point_coords=np.array([[x, y]]), point_labels=np.array([1]),
                                               multimask_output=True, return_logits=True)
            masks = logits > predictor.model.mask_threshold
            ious = np.array([(m & gt).sum() / max((m | gt).sum(), 1) for m in masks])
            # which of the 3 outputs the pair holds
            diffs = np.abs(low - pair["logits"][j].numpy()[None]).reshape(3, -1).max(axis=1)
            chosen = int(diffs.argmin())
            assert diffs[chosen] < 1e-3, diffs
            assert ious[chosen] >= ious.max() - 1e-6, (ious, chosen)
            assert float(pair["iou"][j]) == pytest.approx(ious[chosen], abs=1e-6)
            ys, xs = np.nonzero(masks[chosen])
            tight = [xs.min(), ys.min(), xs.max(), ys.max()] if len(xs) else [0, 0, 0, 0]
            np.testing.assert_array_equal(pair["box"][j].numpy(), np.array(tight, dtype=np.float64))
            checked += 1
    assert checked == len(gts)


# -- where a refiner goes ------------------------------------------------------------------------------


def test_a_refiner_takes_no_class_and_no_encoder(capsys, data, tiny_sam_path, tmp_path):
    for flag in ("--class-aware", "--train-encoder"):
        code, _, err = run(capsys, "finetune-teacher", data / "weak.json", "--images", data / "images", "--sam",
                           tiny_sam_path, "--prompts", "refine", flag, "-o", tmp_path / "r.pt")
        assert code == 1 and "Traceback" not in err, err
        assert "prompts refine" in err and flag in err
    assert list(tmp_path.iterdir()) == []


def test_a_refiner_goes_to_refiner_only(capsys, refiner, data, tiny_sam_path, tmp_path):
    out, _, _ = refiner
    common = ["pseudomask", data / "weak.json", "--images", data / "images", "--sam", tiny_sam_path,
              "--detector", "none"]
    for role in ("--teacher", "--teacher-box", "--teacher-refine"):
        code, _, err = run(capsys, *common, role, out, "-o", tmp_path / "p.json")
        assert code == 1 and "Traceback" not in err, err
        assert f"{role} {out} is a refiner" in err and "pass it as --refiner" in err
    # a teacher for prompts is not a refiner
    code, _, err = run(capsys, *common, "--refiner", EXAMPLE_TEACHER, "-o", tmp_path / "p.json")
    assert code == 1 and f"--refiner {EXAMPLE_TEACHER} is a teacher for prompts 'points+boxes'" in err
    assert "--prompts refine" in err
    # nor does a refiner start a fine-tuning run
    code, _, err = run(capsys, "finetune-teacher", data / "weak.json", "--images", data / "images", "--teacher", out,
                       "--sam", tiny_sam_path, "--prompts", "refine", "-o", tmp_path / "r.pt")
    assert code == 1 and "is a refiner" in err
    assert list(tmp_path.iterdir()) == []
