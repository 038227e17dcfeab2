"""Run any per-image job on Ray: shards stream through ``map_batches`` on an actor pool.

Each actor builds the job's worker once (models loaded once per actor: one GPU each, or CPU threads) and
labels whole shards; the driver writes each finished shard into the job directory as it arrives, so the
driver's memory does not grow with the dataset and a killed job resumes from its finished shards. Only
plain data crosses actor boundaries: a shard travels as JSON text and comes back as JSON text.

This module and ``omnilabel.jobs.ray_train`` are the only ones that import ray. Any job whose worker is
``Worker(*args)(tasks) -> records`` (``pseudomask`` and ``predict`` now; ``uncertainty`` and ``entities``
later) runs through ``run_on_ray``.

Ray on a small machine: actors that ask for every CPU leave none for Ray Data's read tasks and the job
hangs with actors pending, so on CPU each actor asks for a fraction of a CPU (``WORKER_CPUS``) and sets its
own torch threads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from omnilabel.errors import JobError
from omnilabel.jobs.options import JobOptions

#: CPUs each Ray worker (a Ray Data actor or a Ray Train worker) reserves on a CPU-only run: a fraction, so
#: that N workers fit on N cores beside Ray's own tasks (a pool that asks for every CPU leaves none for the
#: tasks that feed it, and hangs). With ``cuda`` a worker reserves 1 CPU and 1 GPU. Threads are set apart
#: from this (``JobOptions.threads_per_worker``).
WORKER_CPUS = 0.5
#: Times a failed shard (its actor died) or a failed Ray Train worker group is retried.
MAX_RETRIES = 2


def worker_resources(job: JobOptions) -> dict[str, float]:
    """What one worker of ``job`` reserves from Ray (see ``WORKER_CPUS``)."""
    return {"CPU": 1.0, "GPU": 1.0} if job.gpu else {"CPU": WORKER_CPUS}


def init_ray(job: JobOptions) -> None:
    """Start (or join) Ray quietly: no dashboard, no log forwarding, no Ray Data progress bars."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    try:
        if job.address is None:
            # "local": a new Ray in this process, even where RAY_ADDRESS is set or `ray start` ran here.
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 1), **kwargs)
        else:
            ray.init(address=job.address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise JobError(f"cannot start or reach Ray at {job.address or 'a local instance'}: {exc}") from exc
    import logging

    from ray.data import DataContext

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # the job shows its own progress
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


class _ShardActor:
    """A Ray Data callable class: builds the worker once, labels one shard per row."""

    def __init__(self, worker_factory: Callable[..., Any], worker_args: tuple, decode: Callable[[Any], Any],
                 threads: int) -> None:
        import torch

        torch.set_num_threads(max(int(threads), 1))
        self.worker = worker_factory(*worker_args)
        self.decode = decode

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        indices, outputs = [], []
        for index, text in zip(batch["shard"], batch["tasks"], strict=True):
            tasks = [self.decode(t) for t in json.loads(str(text))]
            outputs.append(json.dumps(self.worker(tasks), separators=(",", ":")))
            indices.append(int(index))
        return {"shard": np.asarray(indices, dtype=np.int64), "records": np.asarray(outputs, dtype=object)}


def run_on_ray(worker_factory: Callable[..., Any], worker_args: tuple, shards: dict[int, list[Any]], *,
               job: JobOptions, decode: Callable[[Any], Any]) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """Label shards on a Ray actor pool; yields ``(shard index, records)`` as shards finish (any order).

    Args:
        worker_factory: ``worker_factory(*worker_args)`` builds a worker; ``worker(tasks) -> records``.
        worker_args: picklable constructor arguments.
        shards: shard index → tasks (dataclasses of plain data).
        job: Ray address, workers, device.
        decode: turns one task's JSON dict back into a task.

    Raises:
        JobError: Ray cannot start, or a shard failed after its retries.
    """
    import ray

    init_ray(job)
    if not shards:
        return
    rows = [{"shard": i, "tasks": json.dumps([dataclasses.asdict(t) for t in shards[i]], separators=(",", ":"))}
            for i in sorted(shards)]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    with warnings.catch_warnings():
        # Bounded restarts still go through ray_remote_args (Ray Data's own default is to retry forever).
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated", category=DeprecationWarning)
        ds = _map_shards(ds, worker_factory, worker_args, decode, job, n_rows=len(rows))
    try:
        for row in ds.iter_rows():
            yield int(row["shard"]), json.loads(row["records"])
    except ray.exceptions.RayError as exc:
        raise JobError(f"a shard failed on Ray after {MAX_RETRIES} retries: {exc}") from exc


def _map_shards(ds: Any, worker_factory: Callable[..., Any], worker_args: tuple, decode: Callable[[Any], Any],
                job: JobOptions, *, n_rows: int) -> Any:
    from ray.data import ActorPoolStrategy

    resources = worker_resources(job)
    return ds.map_batches(
        _ShardActor,
        fn_constructor_args=(worker_factory, worker_args, decode, job.threads_per_worker()),
        batch_size=1,
        compute=ActorPoolStrategy(size=max(1, min(job.workers, n_rows))),
        num_gpus=resources.get("GPU", 0),
        num_cpus=resources["CPU"],
        max_restarts=MAX_RETRIES,
        max_task_retries=MAX_RETRIES,
    )


def ray_executor(job: JobOptions, worker_factory: Callable[..., Any], decode: Callable[[Any], Any]
                 ) -> Callable[[tuple, dict[int, list[Any]]], Iterable[tuple[int, list[dict[str, Any]]]]]:
    """An executor (see ``omnilabel.jobs.runner``) that runs shards on Ray, for any per-image job."""

    def run(worker_args: tuple, shards: dict[int, list[Any]]) -> Iterable[tuple[int, list[dict[str, Any]]]]:
        return run_on_ray(worker_factory, worker_args, shards, job=job, decode=decode)

    return run
