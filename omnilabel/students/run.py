"""The training recipe, its presets, and the run directory: its layout, checkpoints, and loading a trained
student back from it.

Run directory layout::

    RUN_DIR/
      student.json                 model (Mask2Former config), categories, image and evaluation sizes, queries,
                                   settings
      metrics.jsonl                one JSON line per event: start, step, checkpoint, epoch (with val AP), done
      checkpoints/step_00001000.pt model + optimiser + schedule + step (the last ``keep_checkpoints`` kept)
      best.pt                      model weights of the best validation AP (with ``--val``)

Settings are merged in one place, :func:`make_configs`: a flag given on the command line wins over the
preset, which gives every other value.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from omnilabel.errors import CheckpointError, InputError
from omnilabel.io import save_torch_atomic
from omnilabel.students.mask2former import (
    BACKBONES,
    PRESETS,
    STUDENT_JSON,
    PretrainedSource,
    StudentConfig,
    build_model,
    load_weights,
)

if TYPE_CHECKING:
    from transformers import Mask2FormerForUniversalSegmentation

METRICS = "metrics.jsonl"
BEST = "best.pt"
CHECKPOINTS = "checkpoints"
_STEP_RE = re.compile(r"^step_(\d+)\.pt$")

Preset = Literal["paper", "tiny"]
#: Learning-rate schedules: ``multistep`` (detectron2's WarmupMultiStepLR, Mask2Former COCO instance) and
#: ``poly`` (detectron2's WarmupPolyLR, Mask2Former's ADE20K/Cityscapes recipes).
LrSchedule = Literal["multistep", "poly"]
LR_SCHEDULES: tuple[LrSchedule, ...] = ("multistep", "poly")


@dataclass(frozen=True)
class TrainConfig:
    """How the student is trained (defaults: Mask2Former's COCO instance recipe, R50, LSJ).

    Attributes:
        epochs: passes over the training images (Mask2Former COCO LSJ: 50).
        max_steps: if set, exactly this many optimiser steps, whatever ``epochs``.
        batch_size: images per step over all workers (Mask2Former: 32); divisible by the worker count.
        lr: AdamW learning rate (Mask2Former: 1e-4).
        weight_decay: AdamW weight decay (Mask2Former: 0.05; 0 on norms and embeddings).
        backbone_lr_mult: backbone learning-rate factor (Mask2Former: 0.1).
        lr_schedule: ``multistep``: ``lr · lr_gamma ** n`` with n the ``lr_steps`` passed (Mask2Former COCO
            instance, Base-COCO-InstanceSegmentation.yaml); ``poly``: ``lr · (1 - step / total) ** poly_power``.
            Neither has a warm-up (Mask2Former's is 10 iterations at factor 1.0, i.e. none).
        lr_steps: where ``multistep`` multiplies the lr by ``lr_gamma``, as fractions in (0, 1] of the total
            steps, increasing (Mask2Former COCO: iterations 327,778 and 355,092 of 368,750, ≈ 88.9 % and 96.3 %).
        lr_gamma: ``multistep`` factor (Mask2Former: 0.1).
        poly_power: ``poly`` exponent (detectron2's WarmupPolyLR: 0.9).
        grad_clip_norm: full-model gradient-norm clip (Mask2Former: 0.01); 0 turns it off.
        scale_range: LSJ scale range (Mask2Former COCO: 0.1-2.0).
        hflip_prob: horizontal flip probability (Mask2Former: 0.5).
        min_score: pseudomasks scoring lower are not trained on (0: all kept).
        pseudo_weight: loss weight of a pseudomask target (ground truth: 1); see ``students.loss``.
        uncertainty: weight each pseudomask's mask terms per point by its certainty ``1 - u`` (its uncertainty
            map, ``omnilabel.uncertainty``; ground truth: 1); see ``students.loss``. Off: Mask2Former's loss.
            A run cannot be resumed with the other value.
        checkpoint_every: steps between checkpoints (one is also written at each epoch end).
        keep_checkpoints: step checkpoints kept (older ones are deleted).
        log_every: steps between metrics records.
        data_workers: DataLoader processes per training worker (0: decode in the training process).
        seed: seeds the initialisation, the epoch orders and every augmentation.
    """

    epochs: int = 50
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.05
    backbone_lr_mult: float = 0.1
    lr_schedule: LrSchedule = "multistep"
    lr_steps: tuple[float, ...] = (327778 / 368750, 355092 / 368750)
    lr_gamma: float = 0.1
    poly_power: float = 0.9
    grad_clip_norm: float = 0.01
    scale_range: tuple[float, float] = (0.1, 2.0)
    hflip_prob: float = 0.5
    min_score: float = 0.0
    pseudo_weight: float = 1.0
    uncertainty: bool = False
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 20
    data_workers: int = 2
    seed: int = 0


#: ``paper``: the recipe above, from ImageNet weights. ``tiny``: the ``tiny`` model from scratch, batch 4,
#: lr 1e-3 with the poly schedule (measured on synthetic scenes: COCO AP 0.51-0.54 after 300 steps, against
#: 0.31 with 3e-4), LSJ range 0.5-1.5 on 128-px images, no DataLoader processes, a record every 10 steps, a
#: checkpoint every 200.
TRAIN_PRESETS: dict[str, tuple[TrainConfig, str]] = {
    "paper": (TrainConfig(), "auto"),
    "tiny": (TrainConfig(batch_size=4, lr=1e-3, lr_schedule="poly", scale_range=(0.5, 1.5), checkpoint_every=200,
                         log_every=10, data_workers=0), "none"),
}


@dataclass(frozen=True)
class RunSetup:
    """Everything a training worker needs besides ``student.json``; plain data, so it pickles to Ray.

    Attributes:
        run_dir: the run directory. train_json, images_dir: training data. val_json, val_images_dir: optional
        validation data. train: the recipe. source: weights a fresh run starts from (a run continues from
        the last checkpoint in ``run_dir`` when there is one). device: ``cpu`` or ``cuda``. threads: torch
        CPU threads per worker (None: torch's default). allow_outside_images: accept ``file_name``s outside
        the images folder.
    """

    run_dir: str
    train_json: str
    images_dir: str
    val_json: str | None
    val_images_dir: str | None
    train: TrainConfig
    source: PretrainedSource | None
    device: str = "cpu"
    threads: int | None = None
    allow_outside_images: bool = False


def make_configs(preset: Preset = "paper", *, backbone: str | None = None, pretrained: str | None = None,
                 num_queries: int | None = None, image_size: int | None = None, eval_min_size: int | None = None,
                 eval_max_size: int | None = None, **train_overrides: object
                 ) -> tuple[StudentConfig, TrainConfig, str]:
    """The model, the recipe and ``--pretrained``: each value from its flag if given (not None), else the preset.

    Args:
        preset: ``paper`` or ``tiny``.
        backbone, pretrained, num_queries, image_size, eval_min_size, eval_max_size: model overrides.
        train_overrides: ``TrainConfig`` fields (``epochs``, ``max_steps``, ``batch_size``, ``lr``,
            ``lr_schedule``, ``lr_steps``, …); None values are ignored.

    Raises:
        InputError: unknown preset, backbone or field, or a value out of range.
    """
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    model = dataclasses.replace(PRESETS[preset], **{k: v for k, v in {
        "backbone": backbone, "num_queries": num_queries, "image_size": image_size, "eval_min_size": eval_min_size,
        "eval_max_size": eval_max_size}.items() if v is not None})
    base, default_pretrained = TRAIN_PRESETS[preset]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(train_overrides) - fields)
    if unknown:
        raise InputError(f"unknown training settings: {', '.join(unknown)}")
    train = dataclasses.replace(base, **{k: v for k, v in train_overrides.items() if v is not None})
    if not isinstance(train.lr_steps, tuple):  # a list from a file or a flag
        train = dataclasses.replace(train, lr_steps=tuple(train.lr_steps))
    problems = _problems(model, train)
    if problems:
        raise InputError("bad training settings", problems)
    return model, train, pretrained if pretrained is not None else default_pretrained


def _problems(model: StudentConfig, train: TrainConfig) -> list[str]:
    steps = train.lr_steps
    checks = [
        (model.backbone in BACKBONES, f"--backbone: {model.backbone!r} is not one of {', '.join(BACKBONES)}"),
        (model.num_queries >= 1, f"--num-queries must be >= 1, got {model.num_queries}"),
        (model.image_size >= 32 and model.image_size % 32 == 0,
         f"--image-size must be a multiple of 32 (the backbone's stride), >= 32, got {model.image_size}"),
        (model.eval_min_size is None or model.eval_min_size >= 1,
         f"eval_min_size must be >= 1 or None, got {model.eval_min_size}"),
        (model.eval_max_size is None or (model.eval_min_size is not None
                                         and model.eval_max_size >= model.eval_min_size),
         f"eval_max_size must be None, or >= eval_min_size (which must then be set); got {model.eval_max_size} "
         f"with eval_min_size {model.eval_min_size}"),
        (train.epochs >= 1, f"--epochs must be >= 1, got {train.epochs}"),
        (train.max_steps is None or train.max_steps >= 1, f"--max-steps must be >= 1, got {train.max_steps}"),
        (train.batch_size >= 1, f"--batch-size must be >= 1, got {train.batch_size}"),
        (train.lr > 0, f"--lr must be > 0, got {train.lr}"),
        (train.lr_schedule in LR_SCHEDULES,
         f"--lr-schedule: {train.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}"),
        (all(0 < f <= 1 for f in steps) and all(a < b for a, b in zip(steps, steps[1:], strict=False)),
         f"lr_steps must be increasing fractions of the total steps in (0, 1], got {steps}"),
        (train.lr_gamma > 0, f"lr_gamma must be > 0, got {train.lr_gamma}"),
        (train.poly_power >= 0, f"poly_power must be >= 0, got {train.poly_power}"),
        (0.0 <= train.min_score <= 1.0, f"--min-score must be in [0, 1], got {train.min_score}"),
        (train.pseudo_weight >= 0, f"--pseudo-weight must be >= 0, got {train.pseudo_weight}"),
        (train.checkpoint_every >= 1, f"--checkpoint-every must be >= 1, got {train.checkpoint_every}"),
        (train.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {train.keep_checkpoints}"),
        (train.log_every >= 1, f"log_every must be >= 1, got {train.log_every}"),
        (train.data_workers >= 0, f"--data-workers must be >= 0, got {train.data_workers}"),
        (0 < train.scale_range[0] <= train.scale_range[1], f"bad LSJ scale range {train.scale_range}"),
    ]
    return [message for ok, message in checks if not ok]


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """``RUN_DIR/checkpoints/step_{step:08d}.pt``."""
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}.pt"


def step_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every step checkpoint, by step."""
    folder = Path(run_dir) / CHECKPOINTS
    found = [(int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := _STEP_RE.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The step checkpoint with the highest step, or None."""
    found = step_checkpoints(run_dir)
    return found[-1][1] if found else None


def prune_checkpoints(run_dir: str | Path, *, keep: int) -> None:
    """Delete all but the ``keep`` latest step checkpoints."""
    for _, path in step_checkpoints(run_dir)[:-keep]:
        path.unlink(missing_ok=True)


def clear_run(run_dir: str | Path) -> None:
    """Remove what a training run writes (and nothing else) from ``run_dir``."""
    run_dir = Path(run_dir)
    for _, path in step_checkpoints(run_dir):
        path.unlink()
    shutil.rmtree(run_dir / "ray" / "train", ignore_errors=True)
    for name in (STUDENT_JSON, METRICS, BEST):
        (run_dir / name).unlink(missing_ok=True)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: never a half-written checkpoint."""
    save_torch_atomic(state, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` onto the CPU.

    Raises:
        CheckpointError: the file is missing or unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a corrupt file
        raise CheckpointError(f"{path}: cannot read checkpoint ({exc})") from exc


def eval_sizes(student: dict[str, Any]) -> dict[str, int | None]:
    """The evaluation size of a student from its ``student.json``, as ``predict_images`` keywords.

    Returns:
        ``{"image_size": S, "min_size": …, "max_size": …}``; a ``student.json`` written before the evaluation
        sizes existed has none, i.e. ``min_size`` and ``max_size`` None (the longer side to S, a square).
    """
    config = student["config"]
    return {"image_size": int(config["image_size"]), "min_size": config.get("eval_min_size"),
            "max_size": config.get("eval_max_size")}


def read_student(run_dir: str | Path) -> dict[str, Any]:
    """The run directory's ``student.json`` (model config, categories, image size, training settings).

    Raises:
        CheckpointError: the file is missing or unreadable.
    """
    path = Path(run_dir) / STUDENT_JSON
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{run_dir}: not a student run directory (no {STUDENT_JSON}); train one with "
                              "`omnilabel train-student`") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from exc


def find_checkpoint(run_dir: str | Path, checkpoint: str | None = None) -> Path:
    """The checkpoint predict uses: ``checkpoint`` (``best``, ``last`` or a path); by default the best
    validation checkpoint if there is one, else the last one.

    Raises:
        CheckpointError: no such checkpoint.
    """
    run_dir = Path(run_dir)
    if checkpoint not in (None, "best", "last"):
        return Path(checkpoint)
    if checkpoint in (None, "best") and (run_dir / BEST).is_file():
        return run_dir / BEST
    last = latest_checkpoint(run_dir)
    if last is None or checkpoint == "best":
        raise CheckpointError(f"{run_dir}: no {checkpoint or 'best or last'} checkpoint; train first")
    return last


def load_student(run_dir: str | Path, *, checkpoint: str | None = None
                 ) -> tuple[Mask2FormerForUniversalSegmentation, dict[str, Any]]:
    """Rebuild a trained student from its run directory (no flags, no downloads), in eval mode on the CPU.

    Returns:
        ``(model, student)``: the model, and ``student.json`` with ``checkpoint`` set to the file used.

    Raises:
        CheckpointError: missing or mismatched files (names the keys).
    """
    student = read_student(run_dir)
    path = find_checkpoint(run_dir, checkpoint)
    model = build_model(student["mask2former"])
    load_weights(model, load_checkpoint(path)["model"], source=str(path))
    model.eval()
    return model, {**student, "checkpoint": str(path)}
