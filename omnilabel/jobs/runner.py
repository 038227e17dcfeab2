"""The skeleton every per-image job shares: skip finished shards, run the rest, write each one as it arrives.

A per-image command (``pseudomask``, ``predict``; ``uncertainty`` and ``entities`` the same way) plans its
images into shards of tasks, checks that its image files exist (``check_images_exist``), opens its ``JobDir``
with a manifest of everything that decides the output, calls ``run_unfinished_shards`` with the executor its
``JobOptions`` ask for (``executor_for``), then merges the shard files into its output. The driver's memory
holds the plan and one shard's records at a time, whatever the dataset size. A job whose images all failed
raises (``check_not_all_failed``): it did nothing, so it must not look like a success.

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

from omnilabel.errors import InputError, JobError
from omnilabel.events import OnEvent, emit
from omnilabel.jobs.jobdir import JobDir
from omnilabel.jobs.options import JobOptions

T = TypeVar("T")

#: ``executor(worker_args, {shard index: tasks}) -> iterable of (shard index, records)`` (module docstring).
Executor = Callable[[tuple, dict[int, list[Any]]], Iterable[tuple[int, list[dict[str, Any]]]]]



def executor_for(job: JobOptions, worker_factory: Callable[..., Any], decode: Callable[[Any], Any],
                 on_event: OnEvent | None = None) -> Executor:
    """The executor ``job`` asks for: in this process with 0 workers, else a Ray actor pool of its workers.

    Args:
        job: the job options.
        worker_factory: the job's worker class, ``worker_factory(*worker_args)(tasks) -> records``.
        decode: turns one task's JSON dict back into a task (how tasks travel to Ray actors).
        on_event: gets the executor's ``warning`` events (on Ray: a lost worker, a niced one).
    """
    if job.in_process:
        def in_process(worker_args: tuple, shards: dict[int, list[Any]]) -> Iterable[tuple[int, list[dict]]]:
            return run_shards_in_process(worker_factory, worker_args, shards)

        return in_process
    from omnilabel.jobs.ray_runner import ray_executor

    return ray_executor(job, worker_factory, decode, on_event)


def check_images_exist(paths: Sequence[str | Path], *, images_dir: Path, source: str,
                       on_event: OnEvent | None = None) -> int:
    """Before any model loads: stat every image path (no decoding).

    Returns:
        How many are missing; each is then recorded as a failed image and the job goes on (a ``warning``
        event says how many).

    Raises:
        InputError: none of them exists (the job would do nothing): the message names the folder looked
            in and how ``--images`` and ``file_name`` relate, with the likely folder where there is one.
    """
    missing = [Path(p) for p in paths if not Path(p).is_file()]
    if paths and len(missing) == len(paths):
        first = missing[0]
        hint = ""
        try:
            rel = first.relative_to(images_dir)
        except ValueError:
            rel = None
        for candidate in (images_dir / "images", images_dir.parent / "images"):
            if rel is not None and (candidate / rel).is_file():
                hint = f"; they are in {candidate}: pass --images {candidate}"
                break
        raise InputError(f"{source}: none of its {len(paths)} images exists under {images_dir} (the first "
                         f"would be {first}). `file_name`s are relative to --images, which defaults to the JSON's "
                         f"folder; a COCO file beside an images/ folder needs --images DIR/images{hint}")
    if missing:
        emit(on_event, "warning", message=f"{len(missing)} of {len(paths)} images do not exist (the first is "
                                          f"{missing[0]}); they are recorded as failed and the job goes on")
    return len(missing)


def check_not_all_failed(n_images: int, n_errors: int, *, errors_path: Path) -> None:
    """Raises JobError when every image of a non-empty job failed: such a job did nothing.

    Raises:
        JobError: ``n_images > 0`` and ``n_errors == n_images``.
    """
    if n_images and n_errors == n_images:
        raise JobError(f"all {n_images} images failed, nothing was written (see {errors_path})")


def run_unfinished_shards(job: JobDir, shards: Sequence[Sequence[T]], *, worker_args: Callable[[], tuple],
                          executor: Executor, on_event: OnEvent | None = None) -> int:
    """Run ``executor`` over the shards ``job`` has not finished and write each one as it comes back.

    Args:
        job: an opened job directory (``JobDir.open`` with this plan's manifest).
        shards: the whole plan, shard index → tasks; the finished ones are skipped.
        worker_args: returns the workers' constructor arguments; called once, and only when a shard is left
            to run, so that a fully finished job needs no model (resolving model paths may download).
        executor: runs shards (see the module docstring).
        on_event: gets a ``progress`` event (images done, total), first with the images of resumed shards,
            then after every shard written.

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
    emit(on_event, "progress", done=n_done, total=n_total, unit="images")
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
        emit(on_event, "progress", done=n_done, total=n_total, unit="images")
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


def per_image(tasks: Sequence[T], work: Callable[[Any, T], dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per task of a per-image worker: ``work(image_rgb, task)``, or, for an image that is missing,
    unreadable, bad (``InputError``) or too large (``MemoryError``), ``{"image_id", "file_name", "error"}`` and
    the shard goes on. Tasks have ``image_id`` and ``path``."""
    from omnilabel.data.images import read_image_rgb

    records = []
    for task in tasks:
        try:
            records.append(work(read_image_rgb(task.path), task))  # type: ignore[attr-defined]
        except (InputError, MemoryError) as e:
            records.append({"image_id": task.image_id, "file_name": task.path, "error": str(e)})  # type: ignore[attr-defined]
    return records


def checked_size(image_rgb: Any, task: Any) -> tuple[int, int]:
    """``(H, W)`` of a task's decoded image, which must be the size its COCO entry gives (``task.height``,
    ``task.width``): masks decoded from the file are made at that size.

    Raises:
        InputError: naming the image id, its file and both sizes.
    """
    h, w = image_rgb.shape[:2]
    if (h, w) != (task.height, task.width):
        raise InputError(f"image id={task.image_id}: the file {task.path} is {w} x {h} px, its COCO entry says "
                         f"{task.width} x {task.height}")
    return int(h), int(w)
