"""Training on Ray Train, for every trainer (``finetune-teacher``, ``train-student``): one driver.

A ``TorchTrainer`` runs the trainer's loop on ``JobOptions.workers`` workers with DDP (NCCL with one GPU each
under ``cuda``, gloo on CPUs); each worker reserves ``ray_runner.worker_resources`` (a fraction of a CPU on
CPU-only runs, so that N workers fit on N cores beside Ray's own tasks) and runs as many torch threads as its
own node's cores shared by the workers on that node. Worker 0 appends one JSON line per event to the run's log
(``metrics.jsonl``, ``log.jsonl``); the driver follows that file and hands each record to ``on_event``, so a
person sees the same display as in-process. Ray Train's own bookkeeping goes under ``RUN_DIR/ray``. A failed
worker group is restarted ``MAX_RETRIES`` times and the loop continues from the last checkpoint; after that
the run fails with the worker's own error, and ``--resume`` continues it later.

The loop is any ``loop(setup, *, rank, world_size, device)`` that knows nothing of Ray: the process group
exists when ``world_size`` > 1.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omnilabel.errors import JobError, OmnilabelError
from omnilabel.events import OnEvent
from omnilabel.io import JsonlFollower
from omnilabel.jobs.options import JobOptions
from omnilabel.jobs.ray_runner import MAX_RETRIES, init_ray, one_line, worker_resources

#: Seconds between two reads of the run's log by the driver.
POLL_S = 0.5

#: ``loop(setup, rank=…, world_size=…, device=…)``: one rank of a trainer.
Loop = Callable[..., Any]


def _worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: one rank of the loop, on this worker's device."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    device = str(ray.train.torch.get_device()) if config["gpu"] else "cpu"
    setup = config["setup"]
    if dataclasses.is_dataclass(setup) and getattr(setup, "threads", None):
        # This node's cores shared by the workers on this node (the driver's machine may be another).
        threads = max((os.cpu_count() or 1) // max(ctx.get_local_world_size(), 1), 1)
        setup = dataclasses.replace(setup, threads=threads)
    config["loop"](setup, rank=ctx.get_world_rank(), world_size=ctx.get_world_size(), device=device)


def fit_on_ray(loop: Loop, setup: Any, *, job: JobOptions, name: str, run_dir: str | Path, log: str | Path,
               on_event: OnEvent | None = None) -> list[dict[str, Any]]:
    """Run ``loop(setup, …)`` on the job's Ray Train workers; blocks until training ends.

    Args:
        loop: the trainer's loop (picklable: a module-level function).
        setup: its first argument (plain data: it travels to every worker).
        job: workers (≥ 1), address, device.
        name: the Ray Train run's name.
        run_dir: the run directory (Ray Train's files go to ``RUN_DIR/ray``).
        log: the JSON-lines file worker 0 appends to; followed from its current end.
        on_event: gets each record appended to ``log`` while training runs.

    Returns:
        Every record appended to ``log`` during this run, in order.

    Raises:
        JobError: Ray cannot start, or the workers failed after their restarts (the message carries the
            worker's own error). An ``OmnilabelError`` a worker raised is raised as is.
    """
    init_ray(job)
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        _worker,
        train_loop_config={"loop": loop, "setup": setup, "gpu": job.gpu},
        scaling_config=ScalingConfig(num_workers=job.workers, use_gpu=job.gpu,
                                     resources_per_worker=worker_resources(job)),
        torch_config=TorchConfig(backend="nccl" if job.gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=str((Path(run_dir) / "ray").resolve()),
                             failure_config=FailureConfig(max_failures=MAX_RETRIES)),
    )
    follower = JsonlFollower(log)
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the driver thread below
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="omnilabel-ray-train", daemon=True)
    thread.start()
    records: list[dict[str, Any]] = []
    while True:
        thread.join(POLL_S)
        for record in follower.read():
            records.append(record)
            if on_event is not None:
                on_event(record)
        if not thread.is_alive():
            break
    if "error" in outcome:
        exc = outcome["error"]
        cause = _root(exc)
        if isinstance(cause, OmnilabelError):
            raise cause
        raise JobError(f"training on Ray failed: {one_line(cause)}; continue with --resume") from exc
    return records


def _root(exc: BaseException) -> BaseException:
    """The innermost error a Ray failure carries."""
    seen = exc
    while seen.__cause__ is not None:
        seen = seen.__cause__
    return seen
