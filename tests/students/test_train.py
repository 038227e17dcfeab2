"""Training and running the student as a user does: through the CLI, in-process and on a real local Ray
(one Ray for this module, started by the first Ray command, shut down at the end), pycocotools as the judge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_runner import run_in_process as cli
from pycocotools.coco import COCO

from omnilabel.cli import main
from omnilabel.data.images import read_image_rgb
from omnilabel.data.synthetic import make_dataset
from omnilabel.eval.coco_eval import evaluate_segm
from omnilabel.students.inference import coco_results, predict_images
from omnilabel.students.mask2former import build_model
from omnilabel.students.run import read_student

#: Steps of the in-process training run (tiny preset, batch 4, 128 px).
STEPS = 300


@pytest.fixture(scope="module")
def local_ray():
    """Ray started in this process by the first command that needs it; shut down after the module."""
    yield
    import ray

    ray.shutdown()


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """Training (96), validation (8) and test (16) scenes of 128 px, drawn from different seeds."""
    root = tmp_path_factory.mktemp("student")
    make_dataset(root / "train", n_images=96, seed=11, size_hw=(128, 128), max_objects=4)
    make_dataset(root / "val", n_images=8, seed=12, size_hw=(128, 128), max_objects=4)
    make_dataset(root / "test", n_images=16, seed=13, size_hw=(128, 128), max_objects=4)
    return root


@pytest.fixture(scope="module")
def trained(scenes, tmp_path_factory) -> Path:
    """A tiny student trained in-process for STEPS steps, validated after every epoch."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    try:
        main(["train-student", str(scenes / "train" / "coco.json"), "--images", str(scenes / "train" / "images"),
              "--val", str(scenes / "val" / "coco.json"), "--val-images", str(scenes / "val" / "images"),
              "--preset", "tiny", "--max-steps", str(STEPS), "--num-workers", "0", "-o", str(run)])
    except SystemExit as exc:
        pytest.fail(f"train-student exited with {exc.code}")
    return run


def _test_ap(model: torch.nn.Module, scenes: Path, category_ids: list[int]) -> float:
    gt = json.loads((scenes / "test" / "coco.json").read_text())
    images = [read_image_rgb(scenes / "test" / "images" / im["file_name"]) for im in gt["images"]]
    preds = predict_images(model.eval(), images, image_size=128)
    results = [r for im, (masks, scores, labels) in zip(gt["images"], preds, strict=True)
               for r in coco_results(im["id"], masks, scores, labels, category_ids=category_ids)]
    return evaluate_segm(results, gt)["AP"]


def test_run_directory(trained):
    student = read_student(trained)
    assert student["backbone"] == "tiny" and student["num_queries"] == 20 and student["image_size"] == 128
    assert student["category_names"] == ["circle", "square", "triangle", "ring"]
    events = _metrics(trained)
    steps = [e for e in events if e["event"] == "step"]
    assert steps[-1]["step"] == STEPS and steps[-1]["loss"] < steps[0]["loss"] / 2
    assert all(e["images_per_s"] > 0 and e["lr"] >= 0 for e in steps)
    epochs = [e for e in events if e["event"] == "epoch"]
    assert len(epochs) == STEPS // 24 + 1 and all("AP" in e["val"] for e in epochs)  # 24 steps per epoch
    best = torch.load(trained / "best.pt", weights_only=False)
    assert best["val"]["AP"] == max(e["val"]["AP"] for e in epochs)
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["step_00000288.pt", "step_00000300.pt"]


def test_trained_student_beats_an_untrained_one(trained, scenes):
    """Measured here (16 held-out scenes): untrained AP 0.000; trained 300 steps, AP 0.51 (seed 0) and 0.54
    (seed 1)."""
    student = read_student(trained)
    torch.manual_seed(0)
    untrained = _test_ap(build_model(student["mask2former"]), scenes, student["category_ids"])
    from omnilabel.students.run import load_student

    model, _ = load_student(trained)
    ap = _test_ap(model, scenes, student["category_ids"])
    assert untrained < 0.05
    assert ap > untrained + 0.3, (ap, untrained)


def test_predict_then_evaluate(trained, scenes, tmp_path, capsys):
    out = tmp_path / "pred.json"
    gt = scenes / "test" / "coco.json"
    code, stdout, err = cli(capsys, "predict", trained, "--coco", gt, "--images", scenes / "test" / "images",
                            "--num-workers", "0", "--batch-size", "5", "-o", out)
    assert code == 0, err
    results = json.loads(out.read_text())
    assert isinstance(results, list) and results
    assert set(results[0]) == {"image_id", "category_id", "segmentation", "score", "bbox"}
    assert isinstance(results[0]["segmentation"]["counts"], str)
    assert all(sum(1 for r in results if r["image_id"] == i) <= 100 for i in range(1, 17))
    coco_gt = COCO(str(gt))
    assert len(coco_gt.loadRes(str(out)).anns) == len(results)
    assert len(list((tmp_path / "pred.job" / "shards").glob("*.jsonl"))) == 4  # 16 images, 5 per shard
    code, stdout, _ = cli(capsys, "evaluate", out, "--gt", gt)
    assert code == 0
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert name in stdout
    # a rerun resumes: every shard is skipped and the output is the same
    before = out.read_text()
    code, stdout, _ = cli(capsys, "predict", trained, "--coco", gt, "--num-workers", "0", "--batch-size", "5",
                          "--images", scenes / "test" / "images", "-o", out)
    assert code == 0 and out.read_text() == before
    # a folder without a COCO file: ids by file name, recorded beside the output
    code, stdout, _ = cli(capsys, "predict", trained, "--images", scenes / "val" / "images", "--num-workers", "0",
                          "--score-thresh", "0.5", "--top-k", "3", "-o", tmp_path / "folder.json")
    assert code == 0
    listed = json.loads((tmp_path / "folder.images.json").read_text())
    assert [im["file_name"] for im in listed["images"]] == [f"{i:06d}.png" for i in range(8)]
    folder = json.loads((tmp_path / "folder.json").read_text())
    assert all(r["score"] >= 0.5 for r in folder)
    assert all(sum(1 for r in folder if r["image_id"] == i) <= 3 for i in range(1, 9))


def test_run_directory_is_not_reused_by_accident(trained, scenes, capsys):
    code, _, err = cli(capsys, "train-student", scenes / "train" / "coco.json", "--images", scenes / "train" / "images",
                       "--preset", "tiny", "--max-steps", "1", "--num-workers", "0", "-o", trained)
    assert code == 1 and "--resume" in err and "--overwrite" in err
    code, _, err = cli(capsys, "train-student", scenes / "train" / "coco.json", "--images", scenes / "train" / "images",
                       "--preset", "tiny", "--num-queries", "10", "--resume", "--num-workers", "0", "-o", trained)
    assert code == 1 and "num_queries" in err


def test_ray_train_two_workers_then_resume(scenes, tmp_path, capsys, local_ray):
    run = tmp_path / "ray_run"
    common = ["train-student", scenes / "train" / "coco.json", "--images", scenes / "train" / "images",
              "--preset", "tiny", "--num-workers", "2", "--checkpoint-every", "2", "-o", run]
    val = ["--val", scenes / "val" / "coco.json", "--val-images", scenes / "val" / "images"]
    code, _, err = cli(capsys, *common, *val, "--max-steps", "4")
    assert code == 0, err[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002.pt", "step_00000004.pt"]
    start = next(e for e in _metrics(run) if e["event"] == "start")
    assert start["workers"] == 2 and start["resumed_from"] is None
    # validation: each worker predicts half of the 8 images, worker 0 scores them all
    epoch = next(e for e in _metrics(run) if e["event"] == "epoch")
    assert epoch["step"] == 4 and 0 <= epoch["val"]["AP"] <= 1 and (run / "best.pt").is_file()
    code, _, err = cli(capsys, *common, *val, "--max-steps", "8", "--resume")
    assert code == 0, err[-3000:]
    starts = [e for e in _metrics(run) if e["event"] == "start"]
    assert starts[-1]["step"] == 4 and starts[-1]["resumed_from"].endswith("step_00000004.pt")
    steps = [e["step"] for e in _metrics(run) if e["event"] == "step"]
    assert steps[-1] == 8 and all(s > 4 for s in steps[steps.index(4) + 1:])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000006.pt", "step_00000008.pt"]
    ckpt = torch.load(run / "checkpoints" / "step_00000008.pt", weights_only=False)
    assert ckpt["step"] == 8 and ckpt["scheduler"]["last_epoch"] == 8


def test_predict_on_ray_equals_in_process(trained, scenes, tmp_path, capsys, local_ray):
    gt, images = scenes / "test" / "coco.json", scenes / "test" / "images"
    code, _, err = cli(capsys, "predict", trained, "--coco", gt, "--images", images, "--num-workers", "0",
                       "--batch-size", "4", "-o", tmp_path / "ref.json")
    assert code == 0, err
    code, _, err = cli(capsys, "predict", trained, "--coco", gt, "--images", images, "--num-workers", "2",
                       "--batch-size", "4", "-o", tmp_path / "ray.json")
    assert code == 0, err[-3000:]
    assert len(list((tmp_path / "ray.job" / "shards").glob("*.jsonl"))) == 4
    ref, par = json.loads((tmp_path / "ref.json").read_text()), json.loads((tmp_path / "ray.json").read_text())
    assert len(ref) == len(par)
    for a, b in zip(ref, par, strict=True):
        assert (a["image_id"], a["category_id"], a["segmentation"]) == (b["image_id"], b["category_id"],
                                                                        b["segmentation"])
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)


@pytest.mark.parametrize("lr_schedule", ["poly", "multistep"])
def test_in_process_resume_ends_where_an_uninterrupted_run_does(scenes, tmp_path, lr_schedule):
    from omnilabel.jobs.options import Dataset, JobOptions
    from omnilabel.jobs.train_student import StudentInputs, StudentRecipe, run_train_student
    from omnilabel.students.run import checkpoint_path, make_configs

    run = tmp_path / "run"
    # multistep over 6 steps: x 0.1 from step 5 and again from step 6, after the resume point (step 3)
    recipe = StudentRecipe(*make_configs("tiny", max_steps=6, checkpoint_every=3, lr_schedule=lr_schedule))
    inputs = StudentInputs(Dataset(scenes / "train" / "coco.json", scenes / "train" / "images"))
    run_train_student(inputs, run, JobOptions(num_workers=0), recipe)
    straight = torch.load(checkpoint_path(run, 6), weights_only=False)
    checkpoint_path(run, 6).unlink()  # as if the run had been killed after step 3's checkpoint
    summary = run_train_student(inputs, run, JobOptions(num_workers=0, resume=True), recipe)
    assert summary["resumed_from"].endswith("step_00000003.pt") and summary["steps"] == 6
    resumed = torch.load(checkpoint_path(run, 6), weights_only=False)
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    lrs = [e["lr"] for e in _metrics(run) if e["event"] == "step"]  # logged after each step: the next step's lr
    assert lrs[-1] == pytest.approx(1e-3 * (0.01 if lr_schedule == "multistep" else 0.0))
