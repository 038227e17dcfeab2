"""Build the teacher models a setting needs, from registry names or local paths.

A model is loaded only when the setting needs it: no GDino for ``boxes`` or with ``--detector none``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omnilabel.errors import InputError
from omnilabel.teachers.pipeline import Teachers


@dataclass(frozen=True)
class TeacherSpec:
    """Which models to load, as the user named them (registry names or paths; picklable).

    Attributes:
        sam: SAM checkpoint name or path (default ``vit_h``, the paper's).
        detector: GDino name or directory, or ``"none"``.
        device: torch device string.
        box_threshold: GDino confidence for tags/none (paper §4.1: 0.3).
        nms_iou: GDino NMS IoU (paper §4.1: 0.9).
        multimask_single_point: keep the best-IoU of SAM's 3 masks for a lone point (SAM's convention).
    """

    sam: str = "vit_h"
    detector: str = "grounding-dino-tiny"
    device: str = "cpu"
    box_threshold: float = 0.3
    nms_iou: float = 0.9
    multimask_single_point: bool = True

    @property
    def has_detector(self) -> bool:
        return self.detector.lower() != "none"


def model_id(name_or_path: str) -> str:
    """How a model is named in outputs: the registry name, or the file or folder name of a path."""
    p = Path(name_or_path)
    return p.name if (p.exists() or "/" in name_or_path) else name_or_path


def resolve_paths(spec: TeacherSpec, *, load_detector: bool) -> dict[str, Path]:
    """Local paths of every model the job needs, downloading named ones first (before any image is read).

    Raises:
        CheckpointError: a model is missing and cannot be downloaded (the message says what to do).
    """
    from omnilabel.models.registry import resolve

    paths = {"sam": resolve(spec.sam, kind="sam")}
    if load_detector and spec.has_detector:
        paths["detector"] = resolve(spec.detector, kind="gdino")
    return paths


def load_teachers(spec: TeacherSpec, paths: dict[str, Path]) -> Teachers:
    """Load the models at ``paths`` (from ``resolve_paths``) onto ``spec.device``."""
    import torch

    from omnilabel.models.sam_loader import load_sam
    from omnilabel.teachers.gdino import GDinoConfig, GDinoTeacher
    from omnilabel.teachers.sam import SamTeacher, SamTeacherConfig

    if spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {spec.device}: no CUDA device is available here; use --device cpu")
    sam = SamTeacher(load_sam(paths["sam"], device=spec.device),
                     config=SamTeacherConfig(multimask_single_point=spec.multimask_single_point),
                     device=spec.device)
    ids = {"sam": model_id(spec.sam)}
    detector = None
    if "detector" in paths:
        detector = GDinoTeacher(paths["detector"], device=spec.device,
                                config=GDinoConfig(box_threshold=spec.box_threshold, nms_iou=spec.nms_iou))
        ids["detector"] = model_id(spec.detector)
    return Teachers(sam=sam, detector=detector, model_ids=ids)
