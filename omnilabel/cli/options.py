"""The flags several commands share, defined once: the job flags (``JobOptions``) and the data flags.

Every job command declares its job flags with these aliases, so their names, help and defaults are the same
everywhere, and ``job_options`` turns them into the library's ``JobOptions`` (which validates them, in one
place). A command's own default ``--batch-size`` is given in its description.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from omnilabel.jobs.options import JobOptions

NumWorkers = Annotated[int | None, typer.Option(
    "--num-workers", show_default=False,
    help="Workers, each loading the models once: 0 runs in this process without Ray (the reference result); N "
         "runs N Ray workers (a per-image job: an actor pool; a trainer: DDP with Ray Train), one GPU each with "
         "--device cuda. [default: 0; one per GPU when --device cuda sees several; with --address, one per GPU "
         "here, at least 1]")]
Address = Annotated[str | None, typer.Option(
    "--address", show_default=False,
    help="Ray cluster to join (`auto` on a cluster node, `ray://head:10001` from outside) [default: a local Ray "
         "started here, when there are workers].")]
Device = Annotated[str, typer.Option(
    "--device", help="`cpu`, `cuda` or `cuda:N`; on Ray each worker takes one GPU with cuda.")]
BatchSize = Annotated[int | None, typer.Option(
    "--batch-size", show_default=False,
    help="The unit of work. Per-image jobs: images a worker takes at a time, the unit of resume (and of a "
         "forward pass where the model batches images). Trainers: the global batch of one step, split evenly "
         "over the workers (a multiple of --num-workers). [default: the command's, in its description]")]
JobDir = Annotated[Path | None, typer.Option(
    "--job-dir", show_default=False,
    help="Where the job keeps its resumable state [default: beside the output, named after it].")]
Overwrite = Annotated[bool, typer.Option(
    "--overwrite", help="Start again when the job directory holds another job (trainers: any earlier run).")]
Resume = Annotated[bool, typer.Option(
    "--resume", help="Continue the run in the job directory from its last checkpoint.")]

Images = Annotated[Path | None, typer.Option(
    "--images", show_default=False, help="Image folder the `file_name`s are relative to [default: the JSON's folder].")]
AllowOutsideImages = Annotated[bool, typer.Option(
    "--allow-outside-images", help="Accept absolute `file_name`s and ones that climb out of the image folder.")]


def job_options(num_workers: int | None, address: str | None, device: str, batch_size: int | None, *,
                job_dir: Path | None = None, overwrite: bool = False, resume: bool = False) -> JobOptions:
    """The job flags as ``JobOptions``.

    Raises:
        InputError: a flag out of range or contradicting another (see ``JobOptions``).
    """
    return JobOptions(num_workers=num_workers, address=address, device=device, batch_size=batch_size,
                      job_dir=job_dir, overwrite=overwrite, resume=resume)


def default_output(path: Path, suffix: str) -> Path:
    """``path`` without ``.json``, plus ``suffix``: where a command writes when no ``-o`` is given."""
    return path.with_name(path.name.removesuffix(".json") + suffix)
