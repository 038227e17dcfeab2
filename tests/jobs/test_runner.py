"""The shard skeleton every per-image job runs on: resume, progress, executor order, and executor faults."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from omnilabel.errors import JobError
from omnilabel.jobs.jobdir import JobDir
from omnilabel.jobs.options import JobOptions
from omnilabel.jobs.runner import run_shards_in_process, run_unfinished_shards


@dataclass(frozen=True)
class Task:
    image_id: int


class SquareWorker:
    """A stand-in worker: one record per task; counts how often it is built."""

    built = 0

    def __init__(self, offset: int) -> None:
        SquareWorker.built += 1
        self.offset = offset

    def __call__(self, tasks: list[Task]) -> list[dict]:
        return [{"image_id": t.image_id, "value": t.image_id ** 2 + self.offset} for t in tasks]


def _shards(n_images: int, size: int) -> list[list[Task]]:
    tasks = [Task(i) for i in range(1, n_images + 1)]
    return [tasks[i:i + size] for i in range(0, n_images, size)]


def _job(tmp_path: Path) -> JobDir:
    job = JobDir(tmp_path / "x.job")
    job.open({"command": "test"})
    return job


def _in_process(worker_args: tuple, shards: dict[int, list[Task]]):
    return run_shards_in_process(SquareWorker, worker_args, shards)


def _records(job: JobDir, n_shards: int) -> list[dict]:
    return [rec for i in range(n_shards) for rec in job.read_shard(i)]


@pytest.mark.parametrize(("output", "suffix", "expected"), [
    ("out/pred.json", ".job", "out/pred.job"),
    ("pseudo.json", ".job", "pseudo.job"),
    ("results", ".job", "results.job"),
    ("a.json.json", ".job", "a.json.job"),
    ("teachers/bp.pt", ".run", "teachers/bp.run"),
])
def test_default_job_dir_is_beside_the_output(output: str, suffix: str, expected: str) -> None:
    assert JobOptions().job_dir_for(output, suffix) == Path(expected)
    assert JobOptions(job_dir=Path("elsewhere")).job_dir_for(output, suffix) == Path("elsewhere")


def _progress(into: list) -> callable:
    def on_event(ev: dict) -> None:
        assert ev["event"] == "progress" and ev["unit"] == "images"
        into.append((ev["done"], ev["total"]))
    return on_event


def test_fresh_job_runs_every_shard_and_reports_progress(tmp_path: Path) -> None:
    job, shards, progress = _job(tmp_path), _shards(7, 3), []
    SquareWorker.built = 0
    skipped = run_unfinished_shards(job, shards, worker_args=lambda: (10,), executor=_in_process,
                                    on_event=_progress(progress))
    assert skipped == 0 and SquareWorker.built == 1
    assert progress == [(0, 7), (3, 7), (6, 7), (7, 7)]
    assert _records(job, 3) == [{"image_id": i, "value": i * i + 10} for i in range(1, 8)]


def test_resumed_shards_are_skipped_and_counted(tmp_path: Path) -> None:
    job, shards, progress, asked = _job(tmp_path), _shards(7, 3), [], []
    job.write_shard(1, [{"image_id": 0, "value": -1}] * 3)  # finished by an earlier run: kept as it is

    def executor(worker_args: tuple, todo: dict[int, list[Task]]):
        asked.append(sorted(todo))
        return _in_process(worker_args, todo)

    skipped = run_unfinished_shards(job, shards, worker_args=lambda: (0,), executor=executor,
                                    on_event=_progress(progress))
    assert skipped == 1 and asked == [[0, 2]]
    assert progress == [(3, 7), (6, 7), (7, 7)]
    assert [r["value"] for r in job.read_shard(1)] == [-1, -1, -1]


def test_a_finished_job_builds_no_worker(tmp_path: Path) -> None:
    job, shards = _job(tmp_path), _shards(4, 2)
    run_unfinished_shards(job, shards, worker_args=lambda: (0,), executor=_in_process)

    def no_models() -> tuple:
        raise AssertionError("worker arguments resolved for a finished job")

    def no_executor(worker_args: tuple, todo: dict) -> list:
        raise AssertionError("executor called for a finished job")

    progress: list[tuple[int, int]] = []
    skipped = run_unfinished_shards(job, shards, worker_args=no_models, executor=no_executor,
                                    on_event=_progress(progress))
    assert skipped == 2 and progress == [(4, 4)]


def test_shards_finishing_out_of_order_give_the_same_files(tmp_path: Path) -> None:
    shards = _shards(10, 3)
    ref = JobDir(tmp_path / "ref.job")
    ref.open({"command": "test"})
    run_unfinished_shards(ref, shards, worker_args=lambda: (1,), executor=_in_process)

    def reversed_executor(worker_args: tuple, todo: dict[int, list[Task]]):
        worker = SquareWorker(*worker_args)
        for index in sorted(todo, reverse=True):
            yield index, worker(todo[index])

    job = _job(tmp_path)
    run_unfinished_shards(job, shards, worker_args=lambda: (1,), executor=reversed_executor)
    for i in range(len(shards)):
        assert job.shard_path(i).read_bytes() == ref.shard_path(i).read_bytes()


def _yielding(*items):
    def executor(worker_args: tuple, todo: dict[int, list[Task]]):
        yield from items
    return executor


@pytest.mark.parametrize(("executor", "message"), [
    (_yielding((0, [{"image_id": 1}, {"image_id": 2}]), (5, [])), "shard 5, which was not asked for"),
    (_yielding((0, [{"image_id": 1}, {"image_id": 2}]), (0, [{"image_id": 1}, {"image_id": 2}])),
     "shard 0, which was not asked for or came back twice"),
    (_yielding((0, [{"image_id": 1}])), "1 records for shard 0 of 2 images"),
    (_yielding((0, [{"image_id": 1}, {"image_id": 2}])), "without shards [1]"),
])
def test_an_executor_that_breaks_the_protocol_fails_the_job(tmp_path: Path, executor, message: str) -> None:
    job = _job(tmp_path)
    with pytest.raises(JobError, match=re.escape(message)):
        run_unfinished_shards(job, _shards(4, 2), worker_args=lambda: (), executor=executor)
    assert not job.shard_path(1).exists()  # nothing is made up for a shard that did not come back
