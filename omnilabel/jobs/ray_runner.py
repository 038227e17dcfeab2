"""Run any per-image job on Ray: shards stream through ``map_batches`` on an actor pool.

Each actor builds the job's worker once (models loaded once per actor: one GPU each, or CPU threads) and
labels whole shards; the driver writes each finished shard into the job directory as it arrives, so the
driver's memory does not grow with the dataset and a killed job resumes from its finished shards. Only
plain data crosses actor boundaries: a shard travels as JSON text and comes back as JSON text.

This is the only module that imports ray. Any job whose worker is ``Worker(*args)(tasks) -> records``
(``pseudomask`` and ``predict`` now; ``uncertainty`` and ``entities`` later) runs through ``run_on_ray``.

Ray on a small machine: actors that ask for every CPU leave none for Ray Data's read tasks and the job
hangs with actors pending, so on CPU each actor asks for a fraction of a CPU and sets its own torch threads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from omnilabel.errors import JobError

#: CPUs each actor reserves on a CPU-only run (a fraction, so Ray Data's own tasks can still be scheduled).
ACTOR_CPUS = 0.5


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a job runs.

    Attributes:
        address: ``None`` starts a local Ray in this process; ``auto`` or ``ray://host:port`` joins a cluster.
        num_workers: actors (each loads the models once).
        device: ``cpu`` or ``cuda``; with ``cuda`` each actor takes one GPU.
        threads_per_worker: torch CPU threads per actor.
        max_retries: times a shard is retried when its actor dies.
    """

    address: str | None = None
    num_workers: int = 1
    device: str = "cpu"
    threads_per_worker: int = 1
    max_retries: int = 2


def ray_options(num_workers: int | None, *, address: str | None, device: str) -> RayOptions | None:
    """The job flags ``--num-workers``/``--address``/``--device`` as ``RayOptions``; None means in-process.

    ``num_workers`` None: one worker per GPU with ``cuda``, else 1; each worker gets ``cores / N`` threads.

    Raises:
        InputError: a negative count, or ``--address`` with 0 workers.
    """
    from omnilabel.errors import InputError

    if num_workers == 0:
        if address is not None:
            raise InputError("--num-workers 0 runs in this process; it cannot be combined with --address")
        return None
    if num_workers is not None and num_workers < 0:
        raise InputError(f"--num-workers must be ≥ 0, got {num_workers}")
    if num_workers is None:
        import torch

        num_workers = max(torch.cuda.device_count(), 1) if device.startswith("cuda") else 1
    threads = max((os.cpu_count() or 1) // num_workers, 1)
    return RayOptions(address=address, num_workers=num_workers, device=device, threads_per_worker=threads)


def init_ray(options: RayOptions) -> None:
    """Start (or join) Ray quietly: no dashboard, no log forwarding, no Ray Data progress bars."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    try:
        if options.address is None:
            # "local": a new Ray in this process, even where RAY_ADDRESS is set or `ray start` ran here.
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 1), **kwargs)
        else:
            ray.init(address=options.address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise JobError(f"cannot start or reach Ray at {options.address or 'a local instance'}: {exc}") from exc
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
               options: RayOptions, decode: Callable[[Any], Any]) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """Label shards on a Ray actor pool; yields ``(shard index, records)`` as shards finish (any order).

    Args:
        worker_factory: ``worker_factory(*worker_args)`` builds a worker; ``worker(tasks) -> records``.
        worker_args: picklable constructor arguments.
        shards: shard index → tasks (dataclasses of plain data).
        options: Ray address, workers, device.
        decode: turns one task's JSON dict back into a task.

    Raises:
        JobError: Ray cannot start, or a shard failed after its retries.
    """
    import ray

    init_ray(options)
    if not shards:
        return
    gpu = options.device.startswith("cuda")
    rows = [{"shard": i, "tasks": json.dumps([dataclasses.asdict(t) for t in shards[i]], separators=(",", ":"))}
            for i in sorted(shards)]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    with warnings.catch_warnings():
        # Bounded restarts still go through ray_remote_args (Ray Data's own default is to retry forever).
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated", category=DeprecationWarning)
        ds = _map_shards(ds, worker_factory, worker_args, decode, options, gpu=gpu, n_rows=len(rows))
    try:
        for row in ds.iter_rows():
            yield int(row["shard"]), json.loads(row["records"])
    except ray.exceptions.RayError as exc:
        raise JobError(f"a shard failed on Ray after {options.max_retries} retries: {exc}") from exc


def _map_shards(ds: Any, worker_factory: Callable[..., Any], worker_args: tuple, decode: Callable[[Any], Any],
                options: RayOptions, *, gpu: bool, n_rows: int) -> Any:
    from ray.data import ActorPoolStrategy

    return ds.map_batches(
        _ShardActor,
        fn_constructor_args=(worker_factory, worker_args, decode, options.threads_per_worker),
        batch_size=1,
        compute=ActorPoolStrategy(size=max(1, min(options.num_workers, n_rows))),
        num_gpus=1 if gpu else 0,
        num_cpus=1 if gpu else ACTOR_CPUS,
        max_restarts=options.max_retries,
        max_task_retries=options.max_retries,
    )


def ray_executor(options: RayOptions, worker_factory: Callable[..., Any], decode: Callable[[Any], Any]
                 ) -> Callable[[tuple, dict[int, list[Any]]], Iterable[tuple[int, list[dict[str, Any]]]]]:
    """An executor (see ``omnilabel.jobs.runner``) that runs shards on Ray, for any per-image job."""

    def run(worker_args: tuple, shards: dict[int, list[Any]]) -> Iterable[tuple[int, list[dict[str, Any]]]]:
        return run_on_ray(worker_factory, worker_args, shards, options=options, decode=decode)

    return run
