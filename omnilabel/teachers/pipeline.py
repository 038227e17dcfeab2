"""The omni-supervised teacher: weak annotations of one image in, COCO pseudomasks out.

The four settings of the paper (§3.5, §4.1) and their mix, all in one pass per image:

- ``boxes``: each GT box (+ class) prompts box-SAM.
- ``points``: P-SAM from each GT point → the box of its mask (B_sam) → Algorithm 1 merges B_sam with
  GDino boxes (GDino prompted with the image's classes) → BP-SAM with the merged box and the point.
- ``tags``: GDino with only the image's classes → score threshold and NMS → box-SAM; class from GDino.
- ``none``: GDino with every dataset class → threshold and NMS → box-SAM.
- ``auto``: each annotation by its own type (the paper's future work); an image with no annotation is
  unlabelled and treated as ``none``.

Annotations with a ``segmentation`` pass through untouched (``source: gt``), and an image that has one is
fully annotated: no detection runs on it. The image is encoded by SAM once; every SAM stage (P-SAM,
BP-SAM, box-SAM) decodes from that one embedding, and all prompts of a stage go through the decoder in
batched calls. GDino runs at most once per image (per chunk of class names), at the lowest threshold any
consumer needs (τ_c of Algorithm 1); the tags/none consumers then keep detections ≥ ``box_threshold``.

Choices where the paper is silent:
- A pseudomask's ``score`` is SAM's predicted IoU (clipped to [0, 1]), times the detector's confidence
  when a detection made the prompt (tags, none). For points, a human click anchors the instance, so the
  score is SAM's alone even when the GDino box was used.
- A stage-1 mask that is empty gives B_sam = a 2-px box around the point.
- Masks with fewer than ``min_mask_area_px`` pixels are dropped from the output and counted.
- Each pseudomask records the prompts that made its final mask in ``omnilabel.prompt`` (COCO conventions,
  pixels): ``{"bbox": [x, y, w, h]}`` for boxes and detections, ``{"point": [x, y], "bbox": [...]}`` for
  points (the click and the merged box of stage 2), so ``omnilabel visualize`` can draw them.
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from omnilabel.data.weak import WeakType, weak_type_of
from omnilabel.errors import InputError
from omnilabel.instances import NO_WEAK_ID, Instances
from omnilabel.ops.boxes import masks_to_boxes_xyxy
from omnilabel.ops.refine import refine_prompts

if TYPE_CHECKING:
    from omnilabel.teachers.gdino import GDinoTeacher
    from omnilabel.teachers.sam import ImageEmbedding, SamTeacher

WeakMode = Literal["none", "tags", "points", "boxes", "auto"]
WEAK_MODES: tuple[str, ...] = ("none", "tags", "points", "boxes", "auto")
#: Scores are written with 6 decimals: enough to rank, and the last bits of float sums depend on thread count.
SCORE_DECIMALS = 6
#: Prompt coordinates (``omnilabel.prompt``) are written in pixels with 2 decimals.
PROMPT_DECIMALS = 2


@dataclass(frozen=True)
class PipelineConfig:
    """Settings of the teacher pipeline.

    Attributes:
        weak: which weak labels to use (see the module docstring).
        box_threshold: GDino confidence kept for the tags/none settings (paper §4.1: 0.3).
        alpha: Algorithm 1 class/point mismatch cost (paper: α = 5).
        beta: Algorithm 1 weight of the detection confidence (paper: β = 2).
        tau_c: Algorithm 1 lowest usable detection confidence (paper: τc = 0.1).
        min_mask_area_px: smaller pseudomasks are dropped (1: only empty masks).
    """

    weak: WeakMode = "auto"
    box_threshold: float = 0.3
    alpha: float = 5.0
    beta: float = 2.0
    tau_c: float = 0.1
    min_mask_area_px: int = 1

    def __post_init__(self) -> None:
        if self.weak not in WEAK_MODES:
            raise InputError(f"--weak must be one of {', '.join(WEAK_MODES)}, got {self.weak!r}")


@dataclass
class Teachers:
    """The models of one job. ``point_sam`` (P-SAM) and ``refine_sam`` (BP-SAM) default to ``sam``
    (box-SAM, also the encoder): fine-tuned decoders share the frozen encoder's embedding.

    Attributes:
        sam: the SAM that encodes every image and decodes box prompts.
        detector: GDino, or None (points then use B_sam alone; tags/none are refused).
        point_sam: stage-1 decoder of the points setting.
        refine_sam: stage-2 decoder of the points setting.
        model_ids: names recorded in each pseudomask's ``omnilabel.teacher``.
    """

    sam: SamTeacher
    detector: GDinoTeacher | None = None
    point_sam: SamTeacher | None = None
    refine_sam: SamTeacher | None = None
    model_ids: dict[str, str] = field(default_factory=dict)


@dataclass
class ImageResult:
    """What the teacher made of one image.

    Attributes:
        annotations: output COCO annotations without ``id`` (assigned at merge), in a fixed order.
        counts: pseudomasks written per weak type, plus ``"gt"`` passed through and ``"empty"`` dropped.
        seconds: wall time per stage (encode, detect, decode, refine, encode_rle).
    """

    annotations: list[dict[str, Any]]
    counts: Counter = field(default_factory=Counter)
    seconds: Counter = field(default_factory=Counter)


def effective_weak_type(ann: Mapping[str, Any], mode: WeakMode) -> WeakType:
    """The weak type an annotation is used as under ``mode`` (``FULL`` always passes through)."""
    kind = weak_type_of(dict(ann))
    if kind is WeakType.FULL or mode == "auto":
        return kind
    if mode in ("tags", "none"):
        return WeakType.TAG
    return kind


def check_mode(data: Mapping[str, Any], mode: WeakMode, *, source: str, has_detector: bool,
               max_problems: int = 20) -> None:
    """Check before any model loads that every annotation fits ``mode`` and that needed models exist.

    Raises:
        InputError: an annotation lacks the geometry ``mode`` needs (named by file, id and field), or the
            setting needs a detector and there is none.
    """
    problems = []
    for ann in data["annotations"]:
        kind = effective_weak_type(ann, mode)
        if mode in ("points", "boxes") and kind not in (WeakType.FULL, WeakType(mode)):
            field_name = "point" if mode == "points" else "bbox"
            problems.append(f"{source}: annotation id={ann['id']}: {field_name}: --weak {mode} needs a {field_name} "
                            f"on every annotation without a segmentation (this one is {kind.value}); "
                            "use --weak auto for mixed files")
    if problems:
        shown = problems[:max_problems] + ([f"... and {len(problems) - max_problems} more"]
                                           if len(problems) > max_problems else [])
        raise InputError(f"{source}: {len(problems)} annotation(s) do not fit --weak {mode}", shown)
    if has_detector or mode in ("points", "boxes"):
        return
    # Without a detector, `auto` leaves out the images that need one; it is refused only if that is all of them.
    needing = images_needing_detector(data, mode)
    if mode in ("tags", "none") or (needing and needing == {int(im["id"]) for im in data["images"]}):
        raise InputError(f"--weak {mode}: this file has image-level tags or unlabelled images, which need a "
                         "detector; drop `--detector none` (or use --weak points/boxes)")


def images_needing_detector(data: Mapping[str, Any], mode: WeakMode) -> set[int]:
    """Ids of the images that only a detector can label under ``mode``.

    Under ``tags``/``none`` that is every image without a full mask; under ``auto``, every image with an
    image-level tag or with no annotation at all (with ``--detector none`` such images are left out of the
    output whole, since their other labels alone would teach a student that the tagged objects are
    background). ``points`` and ``boxes`` need none.
    """
    if mode in ("points", "boxes"):
        return set()
    kinds: dict[int, set[WeakType]] = {int(im["id"]): set() for im in data["images"]}
    for ann in data["annotations"]:
        kinds.setdefault(int(ann["image_id"]), set()).add(effective_weak_type(ann, mode))
    if mode in ("tags", "none"):
        return {i for i, k in kinds.items() if WeakType.FULL not in k}
    return {i for i, k in kinds.items() if not k or WeakType.TAG in k}


class PseudomaskPipeline:
    """Runs the teacher on one image at a time; holds models, no per-dataset state.

    Args:
        teachers: the loaded models.
        categories: COCO category id → name, of the whole dataset.
        config: the setting and its thresholds.
    """

    def __init__(self, teachers: Teachers, categories: Mapping[int, str], *,
                 config: PipelineConfig | None = None) -> None:
        self.teachers = teachers
        self.categories = dict(categories)
        self.config = config or PipelineConfig()

    def label_image(self, image_rgb: np.ndarray, annotations: Sequence[Mapping[str, Any]]) -> ImageResult:
        """Pseudomasks of one image.

        Args:
            image_rgb: (H, W, 3) uint8.
            annotations: this image's validated input annotations.

        Returns:
            ``ImageResult``: GT annotations first (input order), then pseudomasks from points, boxes,
            then detections, each in input (or score) order.
        """
        cfg = self.config
        h, w = image_rgb.shape[:2]
        result = ImageResult(annotations=[])
        by_kind: dict[WeakType, list[Mapping[str, Any]]] = {k: [] for k in WeakType}
        for ann in annotations:
            by_kind[effective_weak_type(ann, cfg.weak)].append(ann)
        for ann in by_kind[WeakType.FULL]:
            result.annotations.append(_passthrough(ann))
        result.counts["gt"] += len(by_kind[WeakType.FULL])
        fully_annotated = bool(by_kind[WeakType.FULL])

        points = Instances.from_coco(list(by_kind[WeakType.POINT]), (h, w))
        boxes = Instances.from_coco(list(by_kind[WeakType.BOX]), (h, w))
        tag_classes = sorted({int(a["category_id"]) for a in by_kind[WeakType.TAG]})
        if cfg.weak == "none" or (cfg.weak == "auto" and not annotations):
            tag_classes = [] if fully_annotated else sorted(self.categories)
        if cfg.weak in ("tags", "none") and fully_annotated:
            tag_classes = []

        detector = self.teachers.detector
        det_classes = set(tag_classes)
        if detector is not None and len(points):
            det_classes |= {int(c) for c in points.category_ids}
        detections = Instances.empty((h, w))
        if det_classes and detector is not None:
            t0 = time.perf_counter()
            ids = sorted(det_classes)
            detections = detector.detect(image_rgb, [self.categories[c] for c in ids], category_ids=ids,
                                         box_threshold=min(cfg.tau_c, cfg.box_threshold))
            result.seconds["detect"] += time.perf_counter() - t0

        tag_dets = detections[np.isin(detections.category_ids, tag_classes)
                              & (detections.scores >= cfg.box_threshold)]
        if not (len(points) or len(boxes) or len(tag_dets)):
            return result

        t0 = time.perf_counter()
        emb = self.teachers.sam.encode(image_rgb)
        result.seconds["encode"] += time.perf_counter() - t0

        parts: list[tuple[Instances, str, list[dict[str, Any]]]] = []
        if len(points):
            parts.append(self._points(emb, points, detections, result))
        box_prompts = Instances.cat([boxes, tag_dets])
        if len(box_prompts):
            t0 = time.perf_counter()
            out = self.teachers.sam.predict(emb, boxes_xyxy=box_prompts.boxes_xyxy,
                                            prompt_data={"category_ids": box_prompts.category_ids})
            result.seconds["decode"] += time.perf_counter() - t0
            scores = np.clip(out.iou_scores.astype(np.float64), 0, 1)
            n_box = len(boxes)
            scores[n_box:] *= box_prompts.scores[n_box:]
            inst = Instances((h, w), masks=out.masks, scores=scores, category_ids=box_prompts.category_ids,
                             weak_ids=box_prompts.weak_ids)
            kinds = [WeakType.BOX.value] * n_box + [("none" if cfg.weak == "none" or not annotations else "tags")] * (
                len(box_prompts) - n_box)
            extras = [{"weak": k, "prompt": {"bbox": _xywh(b)}} for k, b in zip(kinds, box_prompts.boxes_xyxy,
                                                                                 strict=True)]
            for i in range(n_box, len(box_prompts)):
                extras[i]["detector_score"] = round(float(box_prompts.scores[i]), SCORE_DECIMALS)
            parts.append((inst, "box", extras))

        t0 = time.perf_counter()
        for inst, _, extras in parts:
            areas = inst.masks_bool().reshape(len(inst), -1).sum(axis=1)
            keep = areas >= cfg.min_mask_area_px
            result.counts["empty"] += int((~keep).sum())
            kept = inst[keep]
            meta = [self._meta(e, int(wid)) for e, wid, k in zip(extras, inst.weak_ids, keep, strict=True) if k]
            for ann in kept.to_coco(image_id=0, extra=[{"omnilabel": m} for m in meta]):
                ann.pop("id")
                ann.pop("image_id")
                ann["score"] = round(ann["score"], SCORE_DECIMALS)
                result.annotations.append(ann)
                result.counts[ann["omnilabel"]["weak"]] += 1
        result.seconds["encode_rle"] += time.perf_counter() - t0
        return result

    def _points(self, emb: ImageEmbedding, points: Instances, detections: Instances,
                result: ImageResult) -> tuple[Instances, str, list[dict[str, Any]]]:
        """Stage 1 (P-SAM) → Algorithm 1 → stage 2 (BP-SAM), all on one embedding."""
        cfg = self.config
        point_sam = self.teachers.point_sam or self.teachers.sam
        refine_sam = self.teachers.refine_sam or self.teachers.sam
        prompt_data = {"category_ids": points.category_ids}
        t0 = time.perf_counter()
        stage1 = point_sam.predict(emb, points_xy=points.points_xy, prompt_data=prompt_data)
        result.seconds["decode"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        boxes_sam = masks_to_boxes_xyxy(stage1.masks)
        empty = ~stage1.masks.reshape(len(points), -1).any(axis=1)
        px = points.points_xy
        boxes_sam[empty] = np.stack([px[empty, 0] - 1, px[empty, 1] - 1, px[empty, 0] + 1, px[empty, 1] + 1], axis=1)
        if self.teachers.detector is not None:
            refined = refine_prompts(boxes_dino_xyxy=detections.boxes_xyxy, scores_dino=detections.scores,
                                     labels_dino=detections.category_ids, points_gt_xy=px,
                                     boxes_sam_xyxy=boxes_sam, labels_gt=points.category_ids,
                                     alpha=cfg.alpha, beta=cfg.beta, tau_c=cfg.tau_c)
            merged, from_dino = refined.boxes_merged_xyxy, refined.from_dino
        else:
            merged, from_dino = boxes_sam, np.zeros(len(points), dtype=bool)
        result.seconds["refine"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        stage2 = refine_sam.predict(emb, points_xy=px, boxes_xyxy=merged, prompt_data=prompt_data)
        result.seconds["decode"] += time.perf_counter() - t0
        inst = Instances(points.image_size, masks=stage2.masks,
                         scores=np.clip(stage2.iou_scores.astype(np.float64), 0, 1),
                         category_ids=points.category_ids, weak_ids=points.weak_ids)
        extras = [{"weak": WeakType.POINT.value, "prompt_box": "gdino" if d else "sam",
                   "prompt": {"point": [round(float(v), PROMPT_DECIMALS) for v in p], "bbox": _xywh(b)}}
                  for d, p, b in zip(from_dino, px, merged, strict=True)]
        return inst, "point", extras

    def _meta(self, extra: dict[str, Any], weak_id: int) -> dict[str, Any]:
        meta: dict[str, Any] = {"source": "pseudo", "weak": extra["weak"],
                                "weak_id": None if weak_id == NO_WEAK_ID else weak_id,
                                "teacher": dict(self.teachers.model_ids)}
        meta.update({k: v for k, v in extra.items() if k != "weak"})
        return meta


def _xywh(box_xyxy: np.ndarray) -> list[float]:
    """A prompt box as COCO ``[x, y, w, h]``, rounded for the output file."""
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    return [round(v, PROMPT_DECIMALS) for v in (x0, y0, x1 - x0, y1 - y0)]


def _passthrough(ann: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(ann))
    out.pop("id", None)
    out.pop("image_id", None)
    meta = dict(out.get("omnilabel") or {})
    meta.update({"source": "gt", "weak": WeakType.FULL.value, "weak_id": int(ann["id"])})
    out["omnilabel"] = meta
    out.setdefault("score", 1.0)
    out.setdefault("iscrowd", 0)
    return out
