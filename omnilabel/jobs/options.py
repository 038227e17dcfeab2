"""How every job runs: ``JobOptions``, the one shape of the job flags, validated in one place.

Every job command — the per-image jobs (``pseudomask``, ``predict``, …) and the trainers
(``finetune-teacher``, ``train-student``) — takes the same flags, and they mean the same everywhere:

- ``num_workers``: 0 runs in this process, without Ray (the reference result); N ≥ 1 runs N Ray workers
  (an actor pool for per-image jobs, DDP workers under Ray Train for trainers), each loading its models
  once, one GPU each with ``cuda``. Default: 0, unless ``device`` is ``cuda`` and this machine sees several
  GPUs (then one worker per GPU) or ``address`` names a cluster (then one worker per local GPU, at least 1).
- ``address``: the Ray cluster to join (``auto``, ``ray://head:10001``); None starts a local Ray.
- ``device``: ``cpu``, ``cuda`` or ``cuda:N``; a worker under Ray takes one GPU with ``cuda``.
- ``batch_size``: the unit of work; None is the job's own default. A per-image job gives each worker
  ``batch_size`` images at a time (the unit of resume, and of a forward pass where a model batches images).
  A trainer takes it as the global batch of one optimiser step, split evenly over its workers.
- ``job_dir``: where the job keeps its resumable state; None is beside the output, named after it.
- ``overwrite``: start again when the job directory holds another job (trainers: any earlier run).
- ``resume``: trainers only: continue the run in the job directory from its last checkpoint (a per-image
  job always resumes a job directory that holds the same job).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from omnilabel.errors import InputError

_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class Dataset:
    """A COCO file and the folder its ``file_name``s are relative to.

    Attributes:
        coco: the COCO JSON file.
        images: the image folder; None is the JSON's folder.
        allow_outside_images: accept ``file_name``s that are absolute or climb out of the folder.
    """

    coco: Path
    images: Path | None = None
    allow_outside_images: bool = False

    @property
    def images_dir(self) -> Path:
        """The image folder, absolute (Ray workers do not run in the driver's working directory)."""
        return (Path(self.images) if self.images is not None else Path(self.coco).parent).resolve()


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@dataclass(frozen=True)
class JobOptions:
    """Where and how a job runs (see the module docstring for each field). Validated on construction.

    Raises:
        InputError: a negative count, ``address`` with 0 workers, a device that is not ``cpu``/``cuda[:N]``,
            CUDA asked for where this machine has none (and no cluster is named), a batch size below 1,
            ``resume`` with ``overwrite``, or a job directory that is a file.
    """

    num_workers: int | None = None
    address: str | None = None
    device: str = "cpu"
    batch_size: int | None = None
    job_dir: Path | None = None
    overwrite: bool = False
    resume: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.num_workers is not None and self.num_workers < 0:
            problems.append(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.num_workers == 0 and self.address is not None:
            problems.append("--num-workers 0 runs in this process; it cannot be combined with --address")
        if self.batch_size is not None and self.batch_size < 1:
            problems.append(f"--batch-size must be >= 1, got {self.batch_size}")
        if not _DEVICE.match(self.device):
            problems.append(f"--device must be cpu, cuda or cuda:N, got {self.device!r}")
        elif self.gpu and self.address is None and _local_gpus() == 0:
            problems.append(f"--device {self.device}: no CUDA device is available here; use --device cpu")
        elif self.gpu and ":" in self.device and self.address is None \
                and int(self.device.split(":")[1]) >= _local_gpus():
            problems.append(f"--device {self.device}: this machine has {_local_gpus()} CUDA device(s)")
        if self.resume and self.overwrite:
            problems.append("--resume continues a run and --overwrite starts it again: pass one")
        if self.job_dir is not None and Path(self.job_dir).is_file():
            problems.append(f"--job-dir {self.job_dir} is a file; give a directory")
        if problems:
            raise InputError(problems[0] if len(problems) == 1 else "bad job options",
                             problems if len(problems) > 1 else None)

    @property
    def gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def workers(self) -> int:
        """``num_workers`` with its default resolved (0: in this process)."""
        if self.num_workers is not None:
            return self.num_workers
        gpus = _local_gpus() if self.gpu else 0
        if self.address is not None:
            return max(gpus, 1)
        return gpus if gpus > 1 else 0

    @property
    def in_process(self) -> bool:
        return self.workers == 0

    def threads_per_worker(self) -> int:
        """Torch CPU threads of each worker (or of this process): this machine's cores shared evenly."""
        return max((os.cpu_count() or 1) // max(self.workers, 1), 1)

    def unit(self, default: int) -> int:
        """``batch_size``, or the job's ``default`` when none was given."""
        return self.batch_size if self.batch_size is not None else int(default)

    def check_global_batch(self, batch_size: int) -> None:
        """A trainer's global batch must split evenly over its workers.

        Raises:
            InputError: it does not.
        """
        if batch_size % max(self.workers, 1):
            raise InputError(f"--batch-size {batch_size} is the global batch: it must be a multiple of "
                             f"--num-workers {self.workers}")

    def job_dir_for(self, output: str | Path, suffix: str = ".job") -> Path:
        """``job_dir``, or the default beside ``output``: its name without ``.json``/``.pt`` plus ``suffix``."""
        if self.job_dir is not None:
            return Path(self.job_dir)
        output = Path(output)
        name = output.name
        for ext in (".json", ".pt"):
            name = name.removesuffix(ext)
        return output.with_name(name + suffix)
