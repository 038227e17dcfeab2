"""The training loop under Ray Train: a ``TorchTrainer`` runs ``train_loop`` on N workers with DDP.

The process group uses NCCL on GPUs (one GPU per worker) and gloo on CPUs (one CPU reserved per worker for
scheduling, or a fraction where the cluster has fewer CPUs than workers; each worker runs ``cores / N``
torch threads). Worker 0 writes the run directory (checkpoints, ``metrics.jsonl``); the driver follows
``metrics.jsonl`` to feed the progress display, so what a person sees is the same as in-process. Ray
Train's own bookkeeping goes under ``RUN_DIR/ray``. A failed worker group is restarted (twice) and
continues from the last checkpoint; after that the run fails, and ``--resume`` continues it later.

Ray is imported lazily, inside functions; ray imports live only in ``omnilabel.jobs``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omnilabel.errors import JobError, OmnilabelError
from omnilabel.students.run import METRICS, RunSetup

#: Seconds between two reads of ``metrics.jsonl`` by the driver.
POLL_S = 0.5
#: Times a failed worker group is restarted; the restarted workers continue from the last checkpoint.
MAX_FAILURES = 2


def _worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    from omnilabel.students.loop import train_loop

    ctx = ray.train.get_context()
    train_loop(config["setup"], device=ray.train.torch.get_device(), rank=ctx.get_world_rank(),
               world_size=ctx.get_world_size())


class _Follower:
    """Reads the lines appended to a JSON-lines file since it was created."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path) as f:
            f.seek(self.offset)
            text = f.read()
        complete = text[:text.rfind("\n") + 1]  # a line still being written waits for the next read
        self.offset += len(complete.encode())
        return [json.loads(line) for line in complete.splitlines() if line.strip()]


def fit_on_ray(setup: RunSetup, *, num_workers: int, address: str | None,
               on_metrics: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run ``train_loop`` on ``num_workers`` Ray Train workers; blocks until training ends.

    Returns:
        The loop's closing summary (the ``done`` record of ``metrics.jsonl``).

    Raises:
        JobError: Ray cannot start, or a worker failed (the message carries the worker's error).
    """
    from omnilabel.jobs.ray_runner import RayOptions, init_ray

    init_ray(RayOptions(address=address))
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    gpu = setup.device.startswith("cuda")
    run_dir = Path(setup.run_dir)
    # A whole CPU per worker where the cluster has them; less where it does not, so the workers always fit.
    cpus = min(1.0, float(ray.cluster_resources().get("CPU", 1.0)) / num_workers)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"setup": setup},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=gpu,
                                     resources_per_worker={"CPU": cpus} | ({"GPU": 1} if gpu else {})),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=RunConfig(name="train", storage_path=str((run_dir / "ray").resolve()),
                             failure_config=FailureConfig(max_failures=MAX_FAILURES)),
    )
    follower = _Follower(run_dir / METRICS)
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the driver thread below
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="omnilabel-ray-train", daemon=True)
    thread.start()
    done: dict[str, Any] | None = None
    while True:
        thread.join(POLL_S)
        for record in follower.read():
            if record.get("event") == "done":
                done = record
            if on_metrics is not None:
                on_metrics(record)
        if not thread.is_alive():
            break
    if "error" in outcome:
        exc = outcome["error"]
        if isinstance(exc, OmnilabelError):
            raise exc
        raise JobError(f"training on Ray failed: {_root_message(exc)}; continue with --resume") from exc
    if done is None:
        raise JobError(f"training on Ray ended without finishing (see {run_dir / METRICS}); continue with --resume")
    return {k: v for k, v in done.items() if k not in ("event", "time")}


def _root_message(exc: BaseException) -> str:
    """The innermost error a Ray failure carries, on one line."""
    seen = exc
    while seen.__cause__ is not None:
        seen = seen.__cause__
    text = str(seen).strip().splitlines()
    return f"{type(seen).__name__}: {text[-1] if text else ''}"
