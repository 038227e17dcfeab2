"""The ``predict`` job's driver, called as a library: any executor order gives the same bytes, a partly
finished job resumes only what is missing, a changed job is refused, a bad image is recorded.

The student is a tiny one trained for 20 steps, enough for non-empty masks: these tests are about the
job, not the predictions (the CLI and a trained student's quality are in ``tests/students/test_train.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from omnilabel.data.synthetic import make_dataset
from omnilabel.errors import InputError, JobError
from omnilabel.jobs.options import Dataset, JobOptions
from omnilabel.jobs.predict import PredictInputs, run_predict
from omnilabel.jobs.train_student import StudentInputs, StudentRecipe, run_train_student
from omnilabel.students.inference import PredictConfig
from omnilabel.students.predict import PredictTask, PredictWorker
from omnilabel.students.run import make_configs

#: 7 images in shards of 3: two full shards and a short last one.
CONFIG = PredictConfig(score_thresh=0.0, top_k=5)
JOB = JobOptions(batch_size=3)


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> tuple[Path, PredictInputs]:
    """(run directory of a 20-step tiny student, the inputs naming 7 scenes of 128 px)."""
    root = tmp_path_factory.mktemp("predict")
    coco = make_dataset(root / "scenes", n_images=7, seed=3, size_hw=(128, 128), max_objects=3)
    model, train, pretrained = make_configs("tiny", max_steps=20)
    run_train_student(StudentInputs(Dataset(coco, coco.parent / "images")), root / "run",
                      config=StudentRecipe(model, train, pretrained))
    return root / "run", PredictInputs(root / "run", coco=coco, images=coco.parent / "images")


def _reversed(worker_args: tuple, shards: dict[int, list[PredictTask]]):
    """An executor that finishes the shards last to first, as a Ray pool may."""
    worker = PredictWorker(*worker_args)
    for index in sorted(shards, reverse=True):
        yield index, worker(shards[index])


def test_any_executor_order_writes_the_same_bytes(student, tmp_path: Path) -> None:
    _, inputs = student
    ref = run_predict(inputs, tmp_path / "ref.json", JOB, CONFIG)
    rev = run_predict(inputs, tmp_path / "rev.json", JOB, CONFIG, executor=_reversed)
    assert (tmp_path / "ref.json").read_bytes() == (tmp_path / "rev.json").read_bytes()
    results = json.loads((tmp_path / "ref.json").read_text())
    assert ref["images"] == rev["images"] == 7 and ref["errors"] == 0
    assert ref["predictions"] == len(results) and 0 < len(results) <= 7 * CONFIG.top_k
    assert ref["job_dir"] == str(tmp_path / "ref.job")
    assert [r["image_id"] for r in results] == sorted(r["image_id"] for r in results)


def test_a_partly_finished_job_runs_only_what_is_missing(student, tmp_path: Path) -> None:
    _, inputs = student
    out = tmp_path / "pred.json"
    first = run_predict(inputs, out, JOB, CONFIG)
    before = out.read_bytes()
    (tmp_path / "pred.job" / "shards" / "00001.jsonl").unlink()  # as if killed before shard 1 was written
    out.unlink()
    asked: list[list[int]] = []
    progress: list[tuple[int, int]] = []

    def recording(worker_args: tuple, shards: dict[int, list[PredictTask]]):
        asked.append(sorted(shards))
        return _reversed(worker_args, shards)

    again = run_predict(inputs, out, JOB, CONFIG, executor=recording,
                        on_event=lambda ev: progress.append((ev["done"], ev["total"])))
    assert first["skipped_shards"] == 0 and again["skipped_shards"] == 2
    assert asked == [[1]] and progress == [(4, 7), (7, 7)]
    assert out.read_bytes() == before


def test_a_different_job_in_the_same_directory_is_refused(student, tmp_path: Path) -> None:
    _, inputs = student
    shared = JobOptions(batch_size=3, job_dir=tmp_path / "shared.job")
    run_predict(inputs, tmp_path / "a.json", shared, CONFIG)
    other = PredictConfig(score_thresh=0.5, top_k=5)
    with pytest.raises(JobError, match="differs in: config"):
        run_predict(inputs, tmp_path / "b.json", shared, other)
    assert not (tmp_path / "b.json").exists()
    summary = run_predict(inputs, tmp_path / "b.json", JobOptions(batch_size=3, job_dir=tmp_path / "shared.job",
                                                                  overwrite=True), other)
    assert summary["skipped_shards"] == 0
    assert all(r["score"] >= 0.5 for r in json.loads((tmp_path / "b.json").read_text()))


def test_an_unreadable_image_is_recorded_and_the_job_goes_on(student, tmp_path: Path) -> None:
    run_dir, inputs = student
    images = tmp_path / "images"
    images.mkdir()
    for i, src in enumerate(sorted(inputs.images.iterdir())[:3]):
        (images / f"{i}.png").write_bytes(src.read_bytes())
    (images / "1.png").write_bytes(b"not a png")
    out = tmp_path / "folder.json"
    summary = run_predict(PredictInputs(run_dir, images=images), out, JOB, CONFIG)
    assert summary["images"] == 3 and summary["errors"] == 1
    errors = [json.loads(line) for line in Path(summary["errors_path"]).read_text().splitlines()]
    assert [e["image_id"] for e in errors] == [2] and errors[0]["file_name"].endswith("1.png")
    results = json.loads(out.read_text())
    assert summary["predictions"] == len(results) and {r["image_id"] for r in results} <= {1, 3}
    assert summary["images_json"] == str(tmp_path / "folder.images.json")


def test_neither_images_nor_coco_is_an_input_error(student, tmp_path: Path) -> None:
    run_dir, _ = student
    with pytest.raises(InputError, match="give --images"):
        run_predict(PredictInputs(run_dir), tmp_path / "x.json", JOB, CONFIG)
    assert not (tmp_path / "x.job").exists()


def test_a_job_whose_images_all_fail_does_not_succeed(student, tmp_path: Path) -> None:
    run_dir, _ = student
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        (images / f"{i}.png").write_bytes(b"not a png")
    with pytest.raises(JobError, match="all 2 images failed"):
        run_predict(PredictInputs(run_dir, images=images), tmp_path / "out.json", JOB, CONFIG)
    assert not (tmp_path / "out.json").exists()
