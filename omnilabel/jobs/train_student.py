"""The ``train-student`` job: check the inputs, write the run directory's ``student.json``, run the training
loop in this process (0 workers, the reference) or on Ray Train workers (``omnilabel.jobs.ray_train``).

A run directory that already holds a run is continued with ``resume`` (from its last checkpoint; the model
and the categories must be the ones it was started with, the recipe may change, e.g. more steps, except
``uncertainty``, which changes the loss) or started again with ``overwrite``; anything else is refused.

With ``uncertainty`` (``--uncertainty``) every pseudomask's uncertainty map is located before anything is
written (``omnilabel.students.certainty``), so a missing one fails the job before training.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omnilabel import __version__
from omnilabel.data.coco import load_coco
from omnilabel.errors import InputError, JobError
from omnilabel.events import OnEvent
from omnilabel.io import write_json_atomic
from omnilabel.jobs.options import Dataset, JobOptions
from omnilabel.students.certainty import pseudomask_uncertainty_paths
from omnilabel.students.mask2former import STUDENT_JSON, StudentConfig, hf_config, resolve_pretrained
from omnilabel.students.run import METRICS, RunSetup, TrainConfig, clear_run, latest_checkpoint, read_student


@dataclass(frozen=True)
class StudentInputs:
    """The training data and, optionally, the validation data (GT masks: AP after every epoch, ``best.pt``)."""

    train: Dataset
    val: Dataset | None = None


@dataclass(frozen=True)
class StudentRecipe:
    """The student and how it is trained (``omnilabel.students.run.make_configs`` builds one from a preset).

    Attributes:
        model: the architecture. train: the recipe; its ``batch_size`` is replaced by the job's when given.
        pretrained: ``auto``, ``none`` or a path (see ``omnilabel.students.mask2former``).
    """

    model: StudentConfig = field(default_factory=StudentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrained: str = "auto"


def _categories(data: dict[str, Any]) -> tuple[list[int], list[str]]:
    return [c["id"] for c in data["categories"]], [c["name"] for c in data["categories"]]


def _is_resume(run_dir: Path, *, resume: bool, overwrite: bool) -> bool:
    """Whether this is a resume; refuses to mix runs. Changes nothing."""
    holds_run = (run_dir / STUDENT_JSON).exists()
    if resume:
        if not holds_run or latest_checkpoint(run_dir) is None:
            raise JobError(f"{run_dir}: nothing to resume (no {STUDENT_JSON} or no checkpoint)")
        return True
    if holds_run and not overwrite:
        raise JobError(f"{run_dir} holds a training run; pass --resume to continue it or --overwrite to "
                       "start again, or choose another output directory")
    return False


def run_train_student(inputs: StudentInputs, output: str | Path, job: JobOptions | None = None,
                      config: StudentRecipe | None = None, *, on_event: OnEvent | None = None) -> dict[str, Any]:
    """Train the Mask2Former student on ground truth plus pseudomasks.

    Args:
        inputs: training data (GT and/or an omnilabel pseudomask file) and optional validation data.
        output: the run directory (created).
        job: workers (0: this process; N: Ray Train DDP workers), address, device, global batch (default:
            the recipe's), resume, overwrite.
        config: the model, the recipe and the starting weights.
        on_event: each metrics record (``start``, ``step``, ``checkpoint``, ``epoch``, ``done``).

    Returns:
        Summary from the training loop (``steps``, ``best_ap``, ``last_checkpoint``, ``counts`` …) plus
        ``run_dir`` and ``wall_s``.

    Raises:
        InputError: bad input or settings; with ``train.uncertainty``, a pseudomask target without an existing
            uncertainty map, or no pseudomask at all. CheckpointError: weights cannot be had or do not fit.
        JobError: the run directory holds another run, a resume changes the model or ``uncertainty``, or Ray
            training failed.
    """
    t0 = time.perf_counter()
    job, config = job or JobOptions(), config or StudentRecipe()
    model, train = config.model, config.train
    if job.batch_size is not None:
        train = dataclasses.replace(train, batch_size=job.batch_size)
    job.check_global_batch(train.batch_size)
    run_dir = Path(output)
    images_dir = inputs.train.images_dir
    data = load_coco(inputs.train.coco, images_dir=images_dir, allow_outside_images=inputs.train.allow_outside_images)
    category_ids, names = _categories(data)
    if train.uncertainty:
        pseudomask_uncertainty_paths(data, inputs.train.coco, min_score=train.min_score)
    val = inputs.val
    if val is not None:
        val_data = load_coco(val.coco, allow_outside_images=val.allow_outside_images)
        extra = sorted({c["id"] for c in val_data["categories"]} - set(category_ids))
        if extra:
            raise InputError(f"{val.coco}: categories {extra} are not among the training file's categories")
    resuming = _is_resume(run_dir, resume=job.resume, overwrite=job.overwrite)
    source = None
    if resuming:
        stored = read_student(run_dir)
        # A field the stored run predates (e.g. the evaluation size) does not block its resume.
        requested = stored["requested"]
        changed = [k for k, v in dataclasses.asdict(model).items() if k in requested and requested[k] != v]
        if stored["category_ids"] != category_ids:
            changed.append("categories")
        if changed:
            raise JobError(f"{run_dir}: cannot resume with a different model (differs in: {', '.join(changed)}); "
                           "use the settings it was started with, or --overwrite")
        started_with = bool(stored.get("train", {}).get("uncertainty", False))  # runs before the flag: off
        if started_with != train.uncertainty:
            flag = "--uncertainty" if started_with else "--no-uncertainty"
            raise JobError(f"{run_dir}: cannot resume with a different uncertainty setting: the run was started with "
                           f"{flag} (the loss would change mid-run); pass {flag}, or --overwrite")
        student = {**stored, "train": dataclasses.asdict(train)}
    else:
        source = resolve_pretrained(config.pretrained, backbone=model.backbone, on_event=on_event)
        actual, m2f = hf_config(model, class_names=names, source=source)
        student = {"omnilabel": __version__, "backbone": actual.backbone, "num_classes": len(names),
                   "category_ids": category_ids, "category_names": names, "image_size": actual.image_size,
                   "num_queries": actual.num_queries, "config": dataclasses.asdict(actual),
                   "requested": dataclasses.asdict(model), "pretrained": config.pretrained,
                   "pretrained_source": dataclasses.asdict(source) if source else None,
                   "frozen_backbone_bn": source is not None, "train": dataclasses.asdict(train),
                   "mask2former": m2f.to_dict()}
    train_json = Path(inputs.train.coco).resolve()
    student["data"] = {"train_json": str(train_json), "images_dir": str(images_dir),
                       "val_json": str(Path(val.coco).resolve()) if val else None}
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resuming:
        clear_run(run_dir)  # also stray checkpoints: a fresh run starts from no checkpoint
    write_json_atomic(student, run_dir / STUDENT_JSON)
    setup = RunSetup(run_dir=str(run_dir.resolve()), train_json=str(train_json), images_dir=str(images_dir),
                     val_json=str(Path(val.coco).resolve()) if val else None,
                     val_images_dir=str(val.images_dir) if val and val.images is not None else None, train=train,
                     source=source, device=job.device,
                     threads=None if job.in_process else job.threads_per_worker(),
                     allow_outside_images=inputs.train.allow_outside_images)
    from omnilabel.students.loop import train_loop

    if job.in_process:
        summary = train_loop(setup, device=job.device, on_metrics=on_event)
    else:
        from omnilabel.jobs.ray_train import fit_on_ray

        records = fit_on_ray(train_loop, setup, job=job, name="train", run_dir=run_dir, log=run_dir / METRICS,
                             on_event=on_event)
        done = next((r for r in reversed(records) if r.get("event") == "done"), None)
        if done is None:
            raise JobError(f"training on Ray ended without finishing (see {run_dir / METRICS}); "
                           "continue with --resume")
        summary = {k: v for k, v in done.items() if k not in ("event", "time")}
    return {**summary, "run_dir": str(run_dir), "wall_s": time.perf_counter() - t0}
