"""Predicting with a trained student, one image task at a time: what the ``predict`` job runs on each shard.

``PredictWorker`` loads the student once and turns a shard of ``PredictTask``s into records (COCO results per
image, or an ``error`` for an unreadable image), at the evaluation size its ``student.json`` gives;
``list_images`` names the images of a folder when no COCO file does. Planning, resume, executors and the merge
live in ``omnilabel.jobs.predict``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omnilabel.errors import InputError
from omnilabel.students.inference import PredictConfig, coco_results, predict_images

if TYPE_CHECKING:
    from omnilabel.models.registry import WeightRef

#: File extensions listed as images when no COCO file names them.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class PredictTask:
    """One image to predict; plain data, so it pickles to any worker."""

    image_id: int
    path: str


def task_from_dict(d: dict[str, Any]) -> PredictTask:
    """Inverse of ``dataclasses.asdict`` for a task (how tasks travel to Ray workers)."""
    return PredictTask(int(d["image_id"]), str(d["path"]))


class PredictWorker:
    """Loads the student once, then predicts image tasks. The unit a job runs in-process or on an actor.

    Args:
        run_dir: the training run directory. checkpoint: ``best``, ``last``, a path, None (best, else last), or
            the driver's ``WeightRef`` of its file (checked to be on this worker's node, with the driver's sha256).
        config: score threshold, top-k, batch size. device: ``cpu``, ``cuda``, ``cuda:1`` …
    """

    def __init__(self, run_dir: str, checkpoint: str | WeightRef | None, config: PredictConfig, device: str) -> None:
        import torch

        from omnilabel.models.registry import WeightRef, locate
        from omnilabel.students.run import eval_sizes, load_student

        if isinstance(checkpoint, WeightRef):
            checkpoint = str(locate(checkpoint))
        self.device = torch.device(device)
        self.model, student = load_student(run_dir, checkpoint=checkpoint)
        self.model.to(self.device)
        self.category_ids = student["category_ids"]
        self.sizes = eval_sizes(student)
        self.config = config

    def __call__(self, tasks: Sequence[PredictTask]) -> list[dict[str, Any]]:
        """One record per task: ``results`` and ``seconds``, or ``error`` for an unreadable image."""
        from omnilabel.data.images import read_image_rgb

        records: list[dict[str, Any]] = []
        good: list[tuple[int, PredictTask, Any]] = []
        for task in tasks:
            try:
                good.append((len(records), task, read_image_rgb(task.path)))
                records.append({"image_id": task.image_id})
            except InputError as exc:
                records.append({"image_id": task.image_id, "file_name": task.path, "error": str(exc)})
        t0 = time.perf_counter()
        preds = predict_images(self.model, [image for _, _, image in good], **self.sizes, config=self.config,
                               device=self.device)
        seconds = (time.perf_counter() - t0) / max(len(good), 1)
        for (index, task, _), (masks, scores, labels) in zip(good, preds, strict=True):
            records[index].update(results=coco_results(task.image_id, masks, scores, labels,
                                                       category_ids=self.category_ids),
                                  seconds={"predict": seconds})
        return records


def list_images(images_dir: Path) -> list[dict[str, Any]]:
    """COCO ``images`` entries (ids 1..N, ``file_name``, ``height``, ``width``) of the image files directly in
    ``images_dir``, sorted by name (an unreadable file gets no size; predicting it records an error).

    Raises:
        InputError: the folder is missing or holds no image file.
    """
    from omnilabel.data.images import image_size

    if not images_dir.is_dir():
        raise InputError(f"--images {images_dir}: not a folder")
    files = sorted(p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise InputError(f"--images {images_dir}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    entries: list[dict[str, Any]] = []
    for i, path in enumerate(files):
        entry: dict[str, Any] = {"id": i + 1, "file_name": path.name}
        try:
            entry["height"], entry["width"] = image_size(path)
        except InputError:
            pass  # predicted as an error record; the job goes on
        entries.append(entry)
    return entries
