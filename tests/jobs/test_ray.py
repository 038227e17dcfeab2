"""The same jobs on a real local Ray: equal to in-process, and a killed driver resumes."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_runner import run_subprocess as _cli
from job_outputs import assert_same_annotations, weak_copy


@pytest.fixture(scope="module")
def job_inputs(shapes_coco, tmp_path_factory):
    root = tmp_path_factory.mktemp("rayjob")
    return root, weak_copy(shapes_coco, root, "mixed")


def _anns(path: Path) -> list[dict]:
    return json.loads(path.read_text())["annotations"]


def test_two_ray_workers_equal_in_process(job_inputs, tiny_sam_path, tiny_gdino_dir):
    root, weak = job_inputs
    common = ["pseudomask", weak, "--images", root / "data" / "images", "--sam", tiny_sam_path,
              "--detector", tiny_gdino_dir, "--batch-size", "3"]
    ref = _cli(*common, "--num-workers", "0", "-o", root / "ref.json")
    assert ref.returncode == 0, ref.stderr
    par = _cli(*common, "--num-workers", "2", "-o", root / "ray.json")
    assert par.returncode == 0, par.stderr
    assert_same_annotations(_anns(root / "ref.json"), _anns(root / "ray.json"), ignore=("score", "omnilabel"))
    assert len(list((root / "ray.job" / "shards").glob("*.jsonl"))) == 4


def test_sigkill_of_the_driver_then_resume(job_inputs, tiny_sam_path, tiny_gdino_dir):
    root, weak = job_inputs
    common = ["pseudomask", weak, "--images", root / "data" / "images", "--sam", tiny_sam_path,
              "--detector", tiny_gdino_dir, "--batch-size", "1", "--num-workers", "0"]
    ref = _cli(*common, "-o", root / "uninterrupted.json")
    assert ref.returncode == 0, ref.stderr
    out = root / "killed.json"
    shards = root / "killed.job" / "shards"
    proc = subprocess.Popen([sys.executable, "-m", "omnilabel.cli", *map(str, common), "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(shards.glob("*.jsonl"))) < 3 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(shards.glob("*.jsonl"))
    assert 3 <= len(finished) < 12, "the job should be killed part way"
    assert not out.exists()
    stamps = {p: p.stat().st_mtime_ns for p in finished}
    again = _cli(*common, "-o", out)
    assert again.returncode == 0, again.stderr
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items()), "finished shards were recomputed"
    assert out.read_bytes() == (root / "uninterrupted.json").read_bytes()


class _CrashOnceWorker:
    """Dies (hard, like a segfault or a lost node) the first time it sees shard 1's image, then works."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __call__(self, tasks):
        if tasks[0]["image_id"] == 2 and not os.path.exists(self.marker):
            Path(self.marker).write_text("crashed")
            os._exit(1)
        return [{"image_id": t["image_id"], "pid": os.getpid()} for t in tasks]


@dataclasses.dataclass
class _Task:
    image_id: int


def _identity(d):
    return d


def test_a_crashed_actor_is_restarted_and_its_shard_retried(tmp_path):
    from ray import cloudpickle

    from omnilabel.jobs.options import JobOptions
    from omnilabel.jobs.ray_runner import run_on_ray

    # test modules are not importable by Ray workers: ship this one's classes by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    shards = {i: [_Task(i + 1)] for i in range(4)}
    marker = tmp_path / "crashed"
    got = dict(run_on_ray(_CrashOnceWorker, (str(marker),), shards, decode=_identity,
                          job=JobOptions(num_workers=2)))
    assert marker.exists(), "the worker should have crashed once"
    assert sorted(got) == [0, 1, 2, 3]
    assert [r["image_id"] for r in got[1]] == [2]


class _ReportWorker:
    """Reports, per task, the threads and priority its Ray worker process runs with."""

    def __init__(self) -> None:
        pass

    def __call__(self, tasks):
        import torch

        time.sleep(1.0)  # long enough that every worker of the pool starts before the job ends
        return [{"image_id": t.image_id, "pid": os.getpid(), "torch": torch.get_num_threads(),
                 "omp": os.environ.get("OMP_NUM_THREADS"), "mkl": os.environ.get("MKL_NUM_THREADS"),
                 "nice": os.nice(0)} for t in tasks]


def _task_from_dict(d):
    return _Task(int(d["image_id"]))


@pytest.mark.parametrize("workers", [1, 2])
def test_ray_workers_share_the_cores_at_normal_priority(workers):
    from ray import cloudpickle

    from omnilabel.jobs.options import JobOptions
    from omnilabel.jobs.ray_runner import run_on_ray

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    shards = {i: [_Task(i + 1)] for i in range(6)}
    events: list[dict] = []
    got = dict(run_on_ray(_ReportWorker, (), shards, decode=_task_from_dict, job=JobOptions(num_workers=workers),
                          on_event=events.append))
    records = [r for recs in got.values() for r in recs]
    expected = max((os.cpu_count() or 1) // workers, 1)
    assert {r["torch"] for r in records} == {expected}
    assert {r["omp"] for r in records} == {r["mkl"] for r in records} == {str(expected)}
    assert {r["nice"] for r in records} == {0}, "the local Ray must run its workers at normal priority"
    started = [e for e in events if e["event"] == "worker"]
    assert len({e["pid"] for e in started}) == workers
    assert [e["threads"] for e in started] == [expected] * workers
    assert not [e for e in events if e["event"] == "warning"]
