"""The skeleton every per-image job shares: skip finished shards, run the rest, write each one as it arrives.

A per-image command (``pseudomask``, ``predict``; ``uncertainty`` and ``entities`` the same way) plans its
images into shards of tasks, opens its ``JobDir`` with a manifest of everything that decides the output,
calls ``run_unfinished_shards``, then merges the shard files into its output. The driver's memory holds the
plan and one shard's records at a time, whatever the dataset size.

The executor protocol::

    executor(worker_args, {shard index: tasks}) -> iterable of (shard index, records)

- ``worker_args``: a picklable tuple; the executor builds the job's worker from it once per process or actor,
  ``Worker(*worker_args)``, and calls ``worker(tasks) -> records`` once per shard.
- tasks: dataclasses of plain data (they travel to other processes as JSON).
- It yields every shard it was given exactly once, as soon as that shard is finished, in any order; its
  records are one dict per task, in task order (``image_id``, then the job's own fields, or ``error`` for an
  image that failed; a failed image does not stop the job).

``run_shards_in_process`` is the reference executor: one worker in this process, shards in index order.
``omnilabel.jobs.ray_runner.ray_executor`` runs the same workers on a Ray actor pool and must give the same
records; since each shard is written to its own file and the merge reads them in index order, the merged
output does not depend on which executor ran or in which order its shards finished.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from omnilabel.errors import JobError
from omnilabel.jobs.jobdir import JobDir

T = TypeVar("T")

#: ``executor(worker_args, {shard index: tasks}) -> iterable of (shard index, records)`` (module docstring).
Executor = Callable[[tuple, dict[int, list[Any]]], Iterable[tuple[int, list[dict[str, Any]]]]]

#: ``on_progress(images done, images total)``.
OnProgress = Callable[[int, int], None]


def default_job_dir(output: str | Path) -> Path:
    """The job directory a command uses when none is given: beside ``output``, ``.json`` swapped for ``.job``
    (``pred.json`` → ``pred.job``; a name without ``.json`` gets ``.job`` appended)."""
    output = Path(output)
    return output.with_name(output.name.removesuffix(".json") + ".job")


def run_unfinished_shards(job: JobDir, shards: Sequence[Sequence[T]], *, worker_args: Callable[[], tuple],
                          executor: Executor, on_progress: OnProgress | None = None) -> int:
    """Run ``executor`` over the shards ``job`` has not finished and write each one as it comes back.

    Args:
        job: an opened job directory (``JobDir.open`` with this plan's manifest).
        shards: the whole plan, shard index → tasks; the finished ones are skipped.
        worker_args: returns the workers' constructor arguments; called once, and only when a shard is left
            to run, so that a fully finished job needs no model (resolving model paths may download).
        executor: runs shards (see the module docstring).
        on_progress: called with (images done, images total), first with the images of resumed shards, then
            after every shard written.

    Returns:
        The number of shards skipped because an earlier run finished them.

    Raises:
        JobError: the executor returned a shard that was not asked for, or the wrong number of records.
        Whatever ``worker_args`` and ``executor`` raise (``CheckpointError`` for a model that cannot be had,
        ``JobError`` from Ray); the shards written until then stay.
    """
    done = job.finished(len(shards))
    todo = {i: list(shards[i]) for i in range(len(shards)) if i not in done}
    n_total = sum(len(shard) for shard in shards)
    n_done = sum(len(shards[i]) for i in done)
    if on_progress:
        on_progress(n_done, n_total)
    if not todo:
        return len(done)
    pending = set(todo)
    for index, records in executor(worker_args(), todo):
        if index not in pending:
            raise JobError(f"the executor returned shard {index}, which was not asked for or came back twice")
        if len(records) != len(todo[index]):
            raise JobError(f"the executor returned {len(records)} records for shard {index} of "
                           f"{len(todo[index])} images")
        pending.discard(index)
        job.write_shard(index, records)
        n_done += len(records)
        if on_progress:
            on_progress(n_done, n_total)
    if pending:
        raise JobError(f"the executor finished without shards {sorted(pending)}; rerun the job to finish them")
    return len(done)


def run_shards_in_process(worker_factory: Callable[..., Callable[[list[T]], list[dict[str, Any]]]],
                          worker_args: tuple, shards: dict[int, list[T]]
                          ) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """The reference executor: one worker, ``worker_factory(*worker_args)``, in this process; shards in order.

    A job's own in-process executor binds its worker class:
    ``run_shards_in_process(PredictWorker, worker_args, shards)``.
    """
    worker = worker_factory(*worker_args)
    for index in sorted(shards):
        yield index, worker(shards[index])
