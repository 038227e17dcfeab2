"""``train-student``: check the inputs, write the run directory's ``student.json``, run the training loop
in this process (``num_workers`` 0, the reference) or on Ray Train workers, and show its progress.

A run directory that already holds a run is continued with ``resume`` (from its last checkpoint; the model
and the categories must be the ones it was started with, the recipe may change, e.g. more epochs) or
started again with ``overwrite``; anything else is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from omnilabel import __version__
from omnilabel.data.coco import load_coco
from omnilabel.errors import InputError, JobError
from omnilabel.io import write_json_atomic
from omnilabel.students.mask2former import STUDENT_JSON, StudentConfig, hf_config, resolve_pretrained
from omnilabel.students.run import RunSetup, TrainConfig, clear_run, latest_checkpoint, read_student

OnMetrics = Callable[[dict[str, Any]], None]


def _categories(data: dict[str, Any]) -> tuple[list[int], list[str]]:
    return [c["id"] for c in data["categories"]], [c["name"] for c in data["categories"]]


def _check_val(val: dict[str, Any], category_ids: list[int], val_json: Path) -> None:
    extra = sorted({c["id"] for c in val["categories"]} - set(category_ids))
    if extra:
        raise InputError(f"{val_json}: categories {extra} are not among the training file's categories")


def _is_resume(run_dir: Path, *, resume: bool, overwrite: bool) -> bool:
    """Whether this is a resume; refuses to mix runs. Changes nothing."""
    holds_run = (run_dir / STUDENT_JSON).exists()
    if resume and overwrite:
        raise InputError("--resume continues a run and --overwrite starts it again: pass one")
    if resume:
        if not holds_run or latest_checkpoint(run_dir) is None:
            raise JobError(f"{run_dir}: nothing to resume (no {STUDENT_JSON} or no checkpoint)")
        return True
    if holds_run and not overwrite:
        raise JobError(f"{run_dir} holds a training run; pass --resume to continue it or --overwrite to "
                       "start again, or choose another output directory")
    return False


def train_student(train_json: str | Path, *, run_dir: str | Path, images_dir: str | Path | None = None,
                  val_json: str | Path | None = None, val_images_dir: str | Path | None = None,
                  model: StudentConfig | None = None, train: TrainConfig | None = None, pretrained: str = "auto",
                  device: str = "cpu", num_workers: int = 0, address: str | None = None, resume: bool = False,
                  overwrite: bool = False, allow_outside_images: bool = False,
                  on_metrics: OnMetrics | None = None) -> dict[str, Any]:
    """Train the Mask2Former student on ground truth plus pseudomasks.

    Args:
        train_json: COCO file of the training images (GT and/or an omnilabel pseudomask file).
        run_dir: the run directory (created).
        images_dir: folder of the training images (default: the JSON's folder).
        val_json: COCO file with GT masks; COCO segm AP after every epoch, and ``best.pt``.
        val_images_dir: folder of the validation images (default: ``val_json``'s folder).
        model: architecture (default: ``PRESETS["paper"]``). train: recipe (default: ``TrainConfig()``).
        pretrained: ``auto``, ``none`` or a path (see ``omnilabel.students.mask2former``).
        device: ``cpu`` or ``cuda``.
        num_workers: 0 trains in this process; N > 0 on N Ray Train workers (DDP: gloo on CPU, NCCL on GPU).
        address: Ray cluster to join (default: a local Ray).
        resume: continue the run in ``run_dir``. overwrite: start ``run_dir`` again.
        allow_outside_images: accept ``file_name``s outside the images folders.
        on_metrics: called with each metrics record as training goes.

    Returns:
        Summary from the training loop (``steps``, ``best_ap``, ``last_checkpoint``, ``counts`` …) plus
        ``run_dir`` and ``wall_s``.

    Raises:
        InputError: bad input or settings. CheckpointError: weights cannot be had or do not fit.
        JobError: the run directory holds another run, or Ray training failed.
    """
    t0 = time.perf_counter()
    model, train = model or StudentConfig(), train or TrainConfig()
    train_json, run_dir = Path(train_json), Path(run_dir)
    if num_workers < 0:
        raise InputError(f"--num-workers must be >= 0, got {num_workers}")
    if num_workers == 0 and address is not None:
        raise InputError("--num-workers 0 trains in this process; it cannot be combined with --address")
    if train.batch_size % max(num_workers, 1):
        raise InputError(f"--batch-size {train.batch_size} must be divisible by --num-workers {num_workers}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: no CUDA device is available here")
    images_dir = Path(images_dir) if images_dir is not None else train_json.parent
    data = load_coco(train_json, images_dir=images_dir, allow_outside_images=allow_outside_images)
    category_ids, names = _categories(data)
    if val_json is not None:
        val_json = Path(val_json)
        _check_val(load_coco(val_json, allow_outside_images=allow_outside_images), category_ids, val_json)
    resuming = _is_resume(run_dir, resume=resume, overwrite=overwrite)
    source = None
    if resuming:
        stored = read_student(run_dir)
        changed = [k for k, v in dataclasses.asdict(model).items() if stored["requested"].get(k) != v]
        if stored["category_ids"] != category_ids:
            changed.append("categories")
        if changed:
            raise JobError(f"{run_dir}: cannot resume with a different model (differs in: {', '.join(changed)}); "
                           "use the settings it was started with, or --overwrite")
        student = {**stored, "train": dataclasses.asdict(train)}
    else:
        source = resolve_pretrained(pretrained, backbone=model.backbone)
        actual, m2f = hf_config(model, class_names=names, source=source)
        student = {"omnilabel": __version__, "backbone": actual.backbone, "num_classes": len(names),
                   "category_ids": category_ids, "category_names": names, "image_size": actual.image_size,
                   "num_queries": actual.num_queries, "config": dataclasses.asdict(actual),
                   "requested": dataclasses.asdict(model), "pretrained": pretrained,
                   "pretrained_source": dataclasses.asdict(source) if source else None,
                   "frozen_backbone_bn": source is not None, "train": dataclasses.asdict(train),
                   "mask2former": m2f.to_dict()}
    student["data"] = {"train_json": str(train_json.resolve()), "images_dir": str(images_dir.resolve()),
                       "val_json": str(val_json.resolve()) if val_json else None}
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resuming:
        clear_run(run_dir)  # also stray checkpoints: a fresh run starts from no checkpoint
    write_json_atomic(student, run_dir / STUDENT_JSON)
    setup = RunSetup(run_dir=str(run_dir.resolve()), train_json=str(train_json.resolve()),
                     images_dir=str(images_dir.resolve()), val_json=str(val_json.resolve()) if val_json else None,
                     val_images_dir=str(Path(val_images_dir).resolve()) if val_images_dir else None, train=train,
                     source=source, device=device,
                     threads=max((os.cpu_count() or 1) // max(num_workers, 1), 1) if num_workers else None,
                     allow_outside_images=allow_outside_images)
    if num_workers == 0:
        from omnilabel.students.loop import train_loop

        summary = train_loop(setup, device=device, on_metrics=on_metrics)
    else:
        from omnilabel.jobs.train_student import fit_on_ray

        summary = fit_on_ray(setup, num_workers=num_workers, address=address, on_metrics=on_metrics)
    return {**summary, "run_dir": str(run_dir), "wall_s": time.perf_counter() - t0}


@contextlib.contextmanager
def training_display(console: Any) -> Iterator[OnMetrics]:
    """A rich live display of training (epoch, steps, loss, lr, images/s, elapsed, remaining); yields the
    ``on_metrics`` callback that feeds it. Validation results are printed as lines."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(TextColumn("[bold]train[/] epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("steps  loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[rate]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console)
    task = progress.add_task("train", total=None, epoch="-", loss="-", lr="-", rate="")
    plan = {"steps_per_epoch": 1, "epochs": 1, "shown": False}

    def epoch_of(step: int) -> str:
        return f"{min(step // plan['steps_per_epoch'] + 1, plan['epochs'])}/{plan['epochs']}"

    def on_metrics(rec: dict[str, Any]) -> None:
        event = rec.get("event")
        if event == "start":
            if not plan["shown"]:  # shown once training starts, not while inputs are checked
                progress.start()
                plan["shown"] = True
            plan.update(steps_per_epoch=rec["steps_per_epoch"], epochs=rec["epochs"])
            progress.update(task, total=rec["total_steps"], completed=rec["step"], epoch=epoch_of(rec["step"]))
            if rec.get("resumed_from"):
                progress.console.print(f"resumed from {rec['resumed_from']} (step {rec['step']})")
        elif event == "step":
            progress.update(task, completed=rec["step"], loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}",
                            rate=f"{rec['images_per_s']:.1f} img/s", epoch=epoch_of(rec["step"]))
        elif event == "epoch" and rec.get("val"):
            val = rec["val"]
            best = "  (best)" if rec["best"] else ""
            progress.console.print(f"epoch {rec['epoch'] + 1}, step {rec['step']}: val AP {val['AP']:.3f}  "
                                   f"AP50 {val['AP50']:.3f}  AP75 {val['AP75']:.3f}{best}")

    try:
        yield on_metrics
    finally:
        if plan["shown"]:
            progress.stop()
