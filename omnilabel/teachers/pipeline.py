"""The omni-supervised teacher: weak annotations of one image in, COCO pseudomasks out.

The four settings of the paper (§3.5, §4.1) and their mix, all in one pass per image:

- ``boxes``: each GT box (+ class) prompts box-SAM.
- ``points``: P-SAM from each GT point → the box of its mask (B_sam) → Algorithm 1 merges B_sam with
  GDino boxes (GDino prompted with the image's classes) → BP-SAM with the merged box and the point.
  ``refine=False`` (``--no-refine``) is the paper's "Point" ablation: P-SAM's stage-1 masks are the output.
- ``tags``: GDino with only the image's classes → score threshold and NMS → box-SAM; class from GDino.
- ``none``: GDino with every dataset class → threshold and NMS → box-SAM.
- ``auto``: each annotation by its own type (the paper's future work); an image with no annotation is
  unlabelled and treated as ``none``.
- With entity proposals (``PipelineConfig.proposals``, ``pseudomask --proposals``), the tags/none consumers
  take the image's entity masks instead of detections: each is classified by CLIP's image tower and kept as it
  is, with no SAM pass (``omnilabel.teachers.proposals``); the detector, if any, still refines points.
- With a UOIS-SAM prompter (``Teachers.prompter``, ``pseudomask --prompter``), the tags/none consumers take the
  prompter's class-agnostic masks instead of detections, decoded from the image's one SAM embedding: classified
  by CLIP as entity proposals are (with ``Teachers.classifier``), else all of the category
  ``PipelineConfig.prompter_category`` (``omnilabel.teachers.prompted``); the detector, if any, still refines
  points. Each records its generated prompt (``{"point": [x, y]}``) and HDNet's adapted score Ŝ'
  (``prompter_score``); its ``score`` is Ŝ' clipped to [0, 1], times CLIP's probability of its label when
  classified (``clip_score``). ``--refiner`` is refused with a prompter (``teachers.prompted.check_prompter``).

What each image gets is decided by its ``ImagePlan`` (``omnilabel.data.weak.plan_weak``, made once for the
whole job): the weak type each annotation is used as and what the detector looks for. Annotations with a
``segmentation`` pass through untouched (``source: gt``). The image is encoded by SAM once; every SAM stage
(P-SAM, BP-SAM, box-SAM, each possibly its own fine-tuned teacher) decodes from that one embedding, and all
prompts of a stage go through the decoder in batched calls. GDino runs at most once per image (per chunk of
class names), at the lowest threshold any consumer needs (τ_c of Algorithm 1); the tags/none consumers then
keep detections ≥ ``box_threshold``.

Choices where the paper is silent:
- A pseudomask's ``score`` is SAM's predicted IoU (clipped to [0, 1]), times the detector's confidence
  when a detection made the prompt (tags, none). For points, a human click anchors the instance, so the
  score is SAM's alone even when the GDino box was used.
- B_sam, the box of a stage-1 mask, is in SAM's own convention (``segment_anything.utils.amg``'s
  ``batched_mask_to_box``: inclusive pixel indices, since SAM's prompt encoder moves coordinates to pixel
  centres). A stage-1 mask that is empty gives B_sam = a 2-px box around the point.
- One object, one annotation: a tag detection whose mask covers an object already annotated on the same
  image — a GT mask, or the pseudomask of a point or box, of the same class, at mask IoU ≥ ``dedup_iou``
  (0.5) — is dropped and counted (``duplicate``). This happens under ``auto``, where an image may carry
  tags beside masks, points or boxes. Entity proposals and classified prompter masks follow the same rule; a
  class-agnostic prompter mask (``prompter_category``) is a duplicate of an annotated object of any class.
- Crowd annotations (``iscrowd: 1``) stay crowd regions: their pseudomasks keep ``iscrowd: 1`` (pycocotools
  and the student then ignore them), and crowd points take no part in Algorithm 1's matching (their stage-2
  box is B_sam). A crowd tag only says that its class is present: its detections are ordinary instances.
- Masks with fewer than ``min_mask_area_px`` pixels are dropped from the output and counted.
- Each pseudomask records the prompts that made its final mask in ``omnilabel.prompt``, as given to SAM (in
  pixels at full precision, so that ``omnilabel uncertainty`` decodes the same mask again; a box as
  ``[x0, y0, x1 - x0, y1 - y0]``): ``{"bbox": [...]}`` for boxes and detections,
  ``{"point": [x, y], "bbox": [...]}`` for points (the click and the merged box of stage 2; the click alone
  without refinement), so ``omnilabel visualize`` can draw them.
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from omnilabel.data.weak import ImagePlan, WeakMode, WeakType, plan_image
from omnilabel.errors import InputError
from omnilabel.instances import NO_WEAK_ID, Instances
from omnilabel.ops.boxes import masks_to_prompt_boxes_xyxy
from omnilabel.ops.masks import covered_by_same_class, masks_to_rle, segmentation_to_rle
from omnilabel.ops.refine import refine_prompts
from omnilabel.teachers.prompted import agnostic_instances, check_prompter, classified_instances, prompted_extras
from omnilabel.teachers.proposals import ProposalConfig, classify_entities
from omnilabel.teachers.uncertainty import UncertaintyScorer, prompt_points

if TYPE_CHECKING:
    from omnilabel.teachers.gdino import GDinoTeacher
    from omnilabel.teachers.proposals import ClipImageClassifier
    from omnilabel.teachers.sam import ImageEmbedding, SamTeacher
    from omnilabel.teachers.uois import UoisPrompter

#: Scores are written with 6 decimals: enough to rank, and the last bits of float sums depend on thread count.
SCORE_DECIMALS = 6


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
        refine: run Algorithm 1 and stage 2 for points; False is the paper's "Point" ablation (Table 5).
        dedup_iou: a tag detection whose mask has at least this IoU with an annotated object of its class on
            the same image is dropped (one object, one annotation; 0.5, COCO's loosest match).
        proposals: label tags/none images from their entity masks with this setting instead of the detector
            (``omnilabel.teachers.proposals``; needs ``Teachers.classifier``), or None.
        prompter_category: with ``Teachers.prompter`` and no classifier, the category id of every prompter
            mask (the job declares it in the output's categories as ``object``); not a dataset class.
        prompter_clip: with ``Teachers.prompter`` and ``Teachers.classifier``, how CLIP classifies each prompter
            mask (threshold, crop margin; None: ``ProposalConfig()``).
    """

    weak: WeakMode = WeakMode.AUTO
    box_threshold: float = 0.3
    alpha: float = 5.0
    beta: float = 2.0
    tau_c: float = 0.1
    min_mask_area_px: int = 1
    refine: bool = True
    dedup_iou: float = 0.5
    proposals: ProposalConfig | None = None
    prompter_category: int | None = None
    prompter_clip: ProposalConfig | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "weak", WeakMode(self.weak))
        except ValueError:
            raise InputError(f"--weak must be one of {', '.join(m.value for m in WeakMode)}, "
                             f"got {self.weak!r}") from None
        if not 0.0 < self.dedup_iou <= 1.0:
            raise InputError(f"dedup_iou must be in (0, 1], got {self.dedup_iou}")


@dataclass
class Teachers:
    """The models of one job. Every SAM decodes from the one image encoder of ``sam``; a role without its
    own teacher (``box_sam``, ``point_sam``, ``refine_sam``) uses ``sam``.

    Attributes:
        sam: the SAM that encodes every image (and decodes for the roles without a teacher of their own).
        detector: GDino, or None (points then use B_sam alone; tags/none images are left out).
        box_sam: decoder of box prompts and detections (box-SAM).
        point_sam: stage-1 decoder of the points setting (P-SAM).
        refine_sam: stage-2 decoder of the points setting (BP-SAM).
        refiner: SUM's refinement module; when given, every pseudomask gets an uncertainty map.
        classifier: CLIP's image and text towers, which label entity proposals (``PipelineConfig.proposals``)
            or the prompter's masks.
        prompter: UOIS-SAM's prompt generator + HDNet, decoding with ``sam``: labels the tags/none images instead
            of the detector (class-agnostic without ``classifier``), or None.
        model_ids: names recorded in each pseudomask's ``omnilabel.teacher``.
    """

    sam: SamTeacher
    detector: GDinoTeacher | None = None
    box_sam: SamTeacher | None = None
    point_sam: SamTeacher | None = None
    refine_sam: SamTeacher | None = None
    refiner: SamTeacher | None = None
    classifier: ClipImageClassifier | None = None
    prompter: UoisPrompter | None = None
    model_ids: dict[str, str] = field(default_factory=dict)


@dataclass
class ImageResult:
    """What the teacher made of one image.

    Attributes:
        annotations: output COCO annotations without ``id`` (assigned at merge), in a fixed order.
        counts: pseudomasks written per weak type, plus ``"gt"`` passed through, ``"empty"`` masks and
            ``"duplicate"`` detections dropped.
        seconds: wall time per stage (encode, detect, decode, refine, encode_rle, uncertainty).
        maps: with a refiner, the uncertainty map of each pseudomask ((H, W) uint16 ``round(u · 65535)``), keyed by
            its position in ``annotations`` (its ``omnilabel.uncertainty_mean`` is already set; the caller
            writes the map and sets ``omnilabel.uncertainty``).
    """

    annotations: list[dict[str, Any]]
    counts: Counter = field(default_factory=Counter)
    seconds: Counter = field(default_factory=Counter)
    maps: dict[int, np.ndarray] = field(default_factory=dict)


@dataclass
class _Part:
    """Pseudomasks of one kind, before filtering: instances and one metadata dict each, and for the refiner
    the low-res logits that made each mask and its prompt point (``teachers.uncertainty.prompt_points``)."""

    inst: Instances
    extras: list[dict[str, Any]]
    crowd: np.ndarray
    logits: np.ndarray
    points: np.ndarray

    def __getitem__(self, keep: np.ndarray) -> _Part:
        return _Part(self.inst[keep], [e for e, k in zip(self.extras, keep, strict=True) if k], self.crowd[keep],
                     self.logits[keep], self.points[keep])


def _crowd(anns: Sequence[Mapping[str, Any]]) -> np.ndarray:
    return np.array([int(a.get("iscrowd") or 0) == 1 for a in anns], dtype=bool)


#: One image for ``label_images``: (H, W, 3) uint8 RGB, its input annotations, its plan (or None).
LabelItem = tuple[np.ndarray, Sequence[Mapping[str, Any]], ImagePlan | None]


@dataclass
class _Prepared:
    """One image between detection and the SAM encoder."""

    image_rgb: np.ndarray
    plan: ImagePlan
    result: ImageResult
    by_kind: dict[WeakType, list[Mapping[str, Any]]]
    points: Instances
    points_crowd: np.ndarray
    boxes: Instances
    detections: Instances
    tag_dets: Instances
    proposed: _Part | None = None
    prompt_classes: list[int] | None = None

    @property
    def needs_sam(self) -> bool:
        """Whether any prompt is left for SAM (else the image is done: GT passthrough only); the prompter's
        prompts (``prompt_classes`` not None: the classes its masks may take) are made after the encode."""
        return bool(len(self.points) or len(self.boxes) or len(self.tag_dets) or self.prompt_classes is not None)


def _memory_error(exc: BaseException) -> MemoryError:
    """Out of memory as one type: ``MemoryError`` as is, ``torch.OutOfMemoryError`` wrapped (after giving the
    CUDA allocator's cached blocks back, so that the next image starts with what is free)."""
    if isinstance(exc, MemoryError):
        return exc
    _free_cached_memory()
    err = MemoryError(str(exc))
    err.__cause__ = exc
    return err


def _free_cached_memory() -> None:
    """Give the CUDA caching allocator's free blocks back before a smaller retry."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class PseudomaskPipeline:
    """Runs the teacher on images, one at a time or with batched encoder passes; holds models, no per-dataset
    state.

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
        self.scorer = None if teachers.refiner is None else UncertaintyScorer(teachers.refiner)
        if self.config.proposals is not None and (teachers.classifier is None or self.scorer is not None):
            raise InputError("entity proposals need a CLIP classifier and no refiner (entity masks have no SAM "
                             "logits to refine)")
        if teachers.prompter is not None:
            if teachers.prompter.sam is not teachers.sam:
                raise InputError("the prompter must decode with Teachers.sam, the SAM that encodes every image")
            check_prompter(self.config, categories=self.categories, has_refiner=self.scorer is not None,
                           has_classifier=teachers.classifier is not None)

    def plan(self, annotations: Sequence[Mapping[str, Any]]) -> ImagePlan:
        """The plan of one image on its own (a job plans every image once, with ``plan_weak``).

        Raises:
            InputError: an annotation does not fit the mode.
        """
        labeller = self.teachers.detector or self.teachers.prompter  # what labels the tags/none images
        plan, problems = plan_image([dict(a) for a in annotations], self.config.weak, has_detector=labeller is not None)
        if problems:
            raise InputError(f"{len(problems)} annotation(s) do not fit --weak {self.config.weak.value}", problems)
        return plan

    def label_image(self, image_rgb: np.ndarray, annotations: Sequence[Mapping[str, Any]],
                    plan: ImagePlan | None = None) -> ImageResult:
        """Pseudomasks of one image (``label_images`` of one item).

        Args:
            image_rgb: (H, W, 3) uint8.
            annotations: this image's validated input annotations, in file order.
            plan: its plan (default: ``self.plan(annotations)``).

        Returns:
            ``ImageResult``: GT annotations first (input order), then pseudomasks from points, boxes,
            then detections, each in input (or score) order.

        Raises:
            InputError: the plan does not fit the annotations. MemoryError: the image cannot be labelled in
                the memory available (see ``label_images``).
        """
        (out,) = self.label_images([(image_rgb, annotations, plan)])
        if isinstance(out, MemoryError):
            raise out
        return out

    def label_images(self, items: Sequence[LabelItem], *, encoder_batch: int = 1,
                     proposals: Sequence[Sequence[Mapping[str, Any]] | None] | None = None
                     ) -> list[ImageResult | MemoryError]:
        """Pseudomasks of several images, their SAM encoder passes batched.

        The detector runs on each image first (it decides whether an image needs SAM at all); the images
        that do are encoded in chunks of ``encoder_batch`` per encoder pass (``SamTeacher.encode_many``), and
        each is then decoded on its own, as ``label_image`` does. The output does not depend on
        ``encoder_batch``; a chunk's encode time is split evenly across its images in ``seconds``.

        Out of memory is per image: if a batched encode runs out of memory, its images are encoded one at a
        time; an image that cannot be detected, encoded alone or decoded (down to one prompt, see
        ``SamTeacher.predict``) in the memory available gets a ``MemoryError`` in its place, and the others
        go on.

        Args:
            items: ``(image_rgb, annotations, plan)`` per image: (H, W, 3) uint8, its validated input
                annotations in file order, its ``ImagePlan`` (None: ``self.plan(annotations)``).
            encoder_batch: images per SAM encoder pass, >= 1 (a memory and speed knob).
            proposals: with ``config.proposals``, per item its entities (``{"entity_id", "segmentation"}``,
                ``teachers.proposals.read_proposals``), required for the items whose plan detects.

        Returns:
            One ``ImageResult`` (as ``label_image`` returns) or ``MemoryError`` per item, in input order.

        Raises:
            InputError: ``encoder_batch`` < 1, a plan does not fit its annotations, or an item that needs
                proposals has none.
        """
        if encoder_batch < 1:
            raise InputError(f"encoder_batch must be >= 1, got {encoder_batch}")
        out: list[ImageResult | MemoryError | None] = [None] * len(items)
        waiting: list[tuple[int, _Prepared]] = []
        for i, (image_rgb, anns, plan) in enumerate(items):
            try:
                prep = self._prepare(image_rgb, anns, plan, None if proposals is None else proposals[i])
                if not prep.needs_sam:
                    out[i] = prep.result if prep.proposed is None else self._finish(prep, None)
                    continue
            except (torch.OutOfMemoryError, MemoryError) as exc:
                out[i] = _memory_error(exc)
                continue
            waiting.append((i, prep))
        for start in range(0, len(waiting), encoder_batch):
            chunk = waiting[start : start + encoder_batch]
            encoded = self._encode_chunk([prep.image_rgb for _, prep in chunk])
            for (i, prep), (emb, seconds) in zip(chunk, encoded, strict=True):
                if isinstance(emb, MemoryError):
                    out[i] = emb
                    continue
                prep.result.seconds["encode"] += seconds
                try:
                    out[i] = self._finish(prep, emb)
                except (torch.OutOfMemoryError, MemoryError) as exc:
                    out[i] = _memory_error(exc)
            del encoded
        return out  # type: ignore[return-value]

    def _encode_chunk(self, images_rgb: list[np.ndarray]) -> list[tuple[ImageEmbedding | MemoryError, float]]:
        """Encode a chunk in one pass, or one image at a time if the pass runs out of memory.

        Returns:
            ``(embedding or MemoryError, encode seconds)`` per image.
        """
        sam = self.teachers.sam
        t0 = time.perf_counter()
        try:
            embs = sam.encode_many(images_rgb)
        except torch.OutOfMemoryError as exc:
            if len(images_rgb) == 1:
                return [(_memory_error(exc), 0.0)]
            _free_cached_memory()
        else:
            share = (time.perf_counter() - t0) / len(images_rgb)
            return [(emb, share) for emb in embs]
        alone: list[tuple[ImageEmbedding | MemoryError, float]] = []
        for image_rgb in images_rgb:
            t0 = time.perf_counter()
            try:
                (emb,) = sam.encode_many([image_rgb])
            except torch.OutOfMemoryError as exc:
                alone.append((_memory_error(exc), 0.0))
                continue
            alone.append((emb, time.perf_counter() - t0))
        return alone

    def _prepare(self, image_rgb: np.ndarray, annotations: Sequence[Mapping[str, Any]],
                 plan: ImagePlan | None, entities: Sequence[Mapping[str, Any]] | None = None) -> _Prepared:
        """Everything before SAM: GT passthrough, the weak prompts, detection (or classified entities)."""
        cfg = self.config
        plan = plan if plan is not None else self.plan(annotations)
        if len(plan.kinds) != len(annotations):
            raise InputError(f"image id={plan.image_id}: its plan has {len(plan.kinds)} annotations, "
                             f"the image {len(annotations)}")
        h, w = image_rgb.shape[:2]
        result = ImageResult(annotations=[])
        by_kind: dict[WeakType, list[Mapping[str, Any]]] = {k: [] for k in WeakType}
        for ann, kind in zip(annotations, plan.kinds, strict=True):
            by_kind[kind].append(ann)
        for ann in by_kind[WeakType.FULL]:
            result.annotations.append(_passthrough(ann))
        result.counts["gt"] += len(by_kind[WeakType.FULL])

        points = Instances.from_coco(list(by_kind[WeakType.POINT]), (h, w))
        points_crowd = _crowd(by_kind[WeakType.POINT])
        boxes = Instances.from_coco(list(by_kind[WeakType.BOX]), (h, w))
        tag_classes: list[int] = []
        if plan.detect is WeakType.TAG:
            tag_classes = sorted({int(a["category_id"]) for a in by_kind[WeakType.TAG]})
        elif plan.detect is WeakType.NONE:
            tag_classes = sorted(self.categories)

        proposed, prompt_classes = None, None
        if self.teachers.prompter is not None and plan.detect is not None:
            prompt_classes, tag_classes = tag_classes, []  # the detector looks for the points' classes only
        if cfg.proposals is not None and plan.detect is not None:
            proposed = self._propose(image_rgb, entities, tag_classes, plan, result)
            tag_classes = []  # the detector looks for the points' classes only
        detector = self.teachers.detector
        det_classes = set(tag_classes)
        if detector is not None and cfg.refine and len(points):
            det_classes |= {int(c) for c in points.category_ids[~points_crowd]}
        detections = Instances.empty((h, w))
        if det_classes and detector is not None:
            t0 = time.perf_counter()
            ids = sorted(det_classes)
            detections = detector.detect(image_rgb, [self.categories[c] for c in ids], category_ids=ids,
                                         box_threshold=min(cfg.tau_c, cfg.box_threshold))
            result.seconds["detect"] += time.perf_counter() - t0

        tag_dets = detections[np.isin(detections.category_ids, tag_classes)
                              & (detections.scores >= cfg.box_threshold)]
        return _Prepared(image_rgb=image_rgb, plan=plan, result=result, by_kind=by_kind, points=points,
                         points_crowd=points_crowd, boxes=boxes, detections=detections, tag_dets=tag_dets,
                         proposed=proposed, prompt_classes=prompt_classes)

    def _propose(self, image_rgb: np.ndarray, entities: Sequence[Mapping[str, Any]] | None, allowed: list[int],
                 plan: ImagePlan, result: ImageResult) -> _Part | None:
        """The image's entities that CLIP gives an allowed class, as the detections part (no SAM logits)."""
        classifier, config, kind = self.teachers.classifier, self.config.proposals, plan.detect
        assert classifier is not None and config is not None and kind is not None
        if entities is None:
            raise InputError(f"image id={plan.image_id}: its {kind.value} need entity proposals, and none were given")
        t0 = time.perf_counter()
        inst, counts = classify_entities(classifier, image_rgb, entities, allowed_ids=allowed,
                                         categories=self.categories, config=config)
        result.seconds["classify"] += time.perf_counter() - t0
        result.counts.update({k: v for k, v in counts.items() if v})
        if not len(inst):
            return None
        extras = [{"weak": kind.value, "prompt": {"entity_id": int(k)}, "clip_score": round(float(s), SCORE_DECIMALS)}
                  for k, s in zip(inst.data.pop("entity_id"), inst.scores, strict=True)]
        n = len(inst)
        return _Part(inst, extras, np.zeros(n, dtype=bool), np.zeros((n, 0), dtype=np.float32), np.full((n, 2), np.nan))

    def _finish(self, prep: _Prepared, emb: ImageEmbedding | None) -> ImageResult:
        """Everything after the encoder: the SAM stages, duplicates, empty masks, COCO records (``emb`` is None
        for an image whose only prompts are entity proposals)."""
        cfg = self.config
        result, by_kind = prep.result, prep.by_kind
        parts: list[_Part] = []
        if len(prep.points):
            parts.append(self._points(emb, prep.points, prep.points_crowd, prep.detections, result))
        box_prompts = Instances.cat([prep.boxes, prep.tag_dets])
        if len(box_prompts):
            parts += self._boxes(emb, box_prompts, len(prep.boxes), _crowd(by_kind[WeakType.BOX]), prep.plan,
                                 result)
        if prep.proposed is not None:
            parts.append(prep.proposed)
        prompted = None if prep.prompt_classes is None else self._prompted(prep, emb, result)
        if prompted is not None:
            parts.append(prompted)
        if len(prep.tag_dets) or prep.proposed is not None or prompted is not None:
            self._drop_duplicates(parts, by_kind[WeakType.FULL], result,
                                  any_class=prompted is not None and self.teachers.classifier is None)

        for part in parts:
            areas = part.inst.masks_bool().sum(axis=(1, 2))
            keep = areas >= cfg.min_mask_area_px
            result.counts["empty"] += int((~keep).sum())
            kept = part[keep]
            scores: list[tuple[np.ndarray, float]] = []
            if self.scorer is not None and len(kept.inst):
                t0 = time.perf_counter()
                scores = self.scorer.score(emb, kept.logits, kept.points)
                result.seconds["uncertainty"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            more = [{"omnilabel": self._meta(e, int(wid))} | ({"iscrowd": 1} if crowd else {})
                    for e, wid, crowd in zip(kept.extras, kept.inst.weak_ids, kept.crowd, strict=True)]
            for k, ann in enumerate(kept.inst.to_coco(image_id=0, extra=more)):
                ann.pop("id")
                ann.pop("image_id")
                ann["score"] = round(ann["score"], SCORE_DECIMALS)
                if scores:
                    result.maps[len(result.annotations)] = scores[k][0]
                    ann["omnilabel"]["uncertainty_mean"] = round(scores[k][1], SCORE_DECIMALS)
                result.annotations.append(ann)
                result.counts[ann["omnilabel"]["weak"]] += 1
            result.seconds["encode_rle"] += time.perf_counter() - t0
        return result

    def _boxes(self, emb: ImageEmbedding, prompts: Instances, n_box: int, box_crowd: np.ndarray, plan: ImagePlan,
               result: ImageResult) -> list[_Part]:
        """Box-SAM on the weak boxes and the tag detections, in one batched call; one part each."""
        box_sam = self.teachers.box_sam or self.teachers.sam
        t0 = time.perf_counter()
        out = box_sam.predict(emb, boxes_xyxy=prompts.boxes_xyxy, prompt_data={"category_ids": prompts.category_ids})
        result.seconds["decode"] += time.perf_counter() - t0
        scores = np.clip(out.iou_scores.astype(np.float64), 0, 1)
        scores[n_box:] *= prompts.scores[n_box:]
        inst = Instances(prompts.image_size, masks=out.masks, scores=scores, category_ids=prompts.category_ids,
                         weak_ids=prompts.weak_ids)
        det_kind = plan.detect.value if plan.detect is not None else WeakType.TAG.value
        extras = [{"weak": WeakType.BOX.value if i < n_box else det_kind, "prompt": {"bbox": _xywh(b)}}
                  for i, b in enumerate(prompts.boxes_xyxy)]
        for i in range(n_box, len(prompts)):
            extras[i]["detector_score"] = round(float(prompts.scores[i]), SCORE_DECIMALS)
        part = _Part(inst, extras, np.concatenate([box_crowd, np.zeros(len(prompts) - n_box, dtype=bool)]),
                     out.low_res_logits, prompt_points(np.full((len(prompts), 2), np.nan), prompts.boxes_xyxy))
        first = np.arange(len(prompts)) < n_box
        return [part[m] for m in (first, ~first) if m.any()]

    def _drop_duplicates(self, parts: list[_Part], gt_anns: Sequence[Mapping[str, Any]], result: ImageResult, *,
                         any_class: bool = False) -> None:
        """One object, one annotation: drop the detections (the last part) that repeat an annotated object (of
        their class; of any class for class-agnostic masks, ``any_class``)."""
        dets = parts[-1]
        if not dets.extras or dets.extras[0]["weak"] not in (WeakType.TAG.value, WeakType.NONE.value):
            return
        h, w = dets.inst.image_size
        refs = [segmentation_to_rle(a["segmentation"], h, w) for a in gt_anns]
        ref_classes = [int(a["category_id"]) for a in gt_anns]
        for part in parts[:-1]:
            refs += masks_to_rle(part.inst.masks_bool())
            ref_classes += [int(c) for c in part.inst.category_ids]
        if not refs:
            return
        if any_class:
            ref_classes = [int(dets.inst.category_ids[0])] * len(refs)
        dup = covered_by_same_class(masks_to_rle(dets.inst.masks_bool()), dets.inst.category_ids, refs,
                                    np.asarray(ref_classes, dtype=np.int64), iou_thresh=self.config.dedup_iou)
        if dup.any():
            result.counts["duplicate"] += int(dup.sum())
            keep = ~dup
            parts[-1] = dets[keep]

    def _prompted(self, prep: _Prepared, emb: ImageEmbedding, result: ImageResult) -> _Part | None:
        """The prompter's masks of a tags/none image (``omnilabel.teachers.prompted``), as the detections part."""
        prompter, classifier, kind = self.teachers.prompter, self.teachers.classifier, prep.plan.detect
        assert prompter is not None and prep.prompt_classes is not None and kind is not None
        t0 = time.perf_counter()
        found = prompter.segment(prep.image_rgb, emb)
        result.seconds["prompter"] += time.perf_counter() - t0
        if classifier is None:
            assert self.config.prompter_category is not None
            inst = agnostic_instances(found, category_id=self.config.prompter_category)
        else:
            t0 = time.perf_counter()
            inst, counts = classified_instances(classifier, prep.image_rgb, found, allowed_ids=prep.prompt_classes,
                                                categories=self.categories,
                                                config=self.config.prompter_clip or ProposalConfig())
            result.seconds["classify"] += time.perf_counter() - t0
            result.counts.update({k: v for k, v in counts.items() if v})
        if not len(inst):
            return None
        n = len(inst)
        return _Part(inst, prompted_extras(inst, weak=kind.value, decimals=SCORE_DECIMALS), np.zeros(n, dtype=bool),
                     np.zeros((n, 0), dtype=np.float32), inst.points_xy)

    def _points(self, emb: ImageEmbedding, points: Instances, crowd: np.ndarray, detections: Instances,
                result: ImageResult) -> _Part:
        """Stage 1 (P-SAM) → Algorithm 1 → stage 2 (BP-SAM), all on one embedding; stage 1 alone without
        refinement."""
        cfg = self.config
        point_sam = self.teachers.point_sam or self.teachers.sam
        refine_sam = self.teachers.refine_sam or self.teachers.sam
        prompt_data = {"category_ids": points.category_ids}
        px = points.points_xy
        t0 = time.perf_counter()
        stage1 = point_sam.predict(emb, points_xy=px, prompt_data=prompt_data)
        result.seconds["decode"] += time.perf_counter() - t0
        if not cfg.refine:
            inst = Instances(points.image_size, masks=stage1.masks,
                             scores=np.clip(stage1.iou_scores.astype(np.float64), 0, 1),
                             category_ids=points.category_ids, weak_ids=points.weak_ids)
            extras = [{"weak": WeakType.POINT.value, "prompt": {"point": _listed(p)}} for p in px]
            return _Part(inst, extras, crowd, stage1.low_res_logits, px)

        t0 = time.perf_counter()
        boxes_sam = masks_to_prompt_boxes_xyxy(stage1.masks)
        empty = ~stage1.masks.reshape(len(points), -1).any(axis=1)
        boxes_sam[empty] = np.stack([px[empty, 0] - 1, px[empty, 1] - 1, px[empty, 0] + 1, px[empty, 1] + 1], axis=1)
        merged, from_dino = boxes_sam.copy(), np.zeros(len(points), dtype=bool)
        matched = ~crowd  # crowd points take no part in the matching: their box is B_sam
        if self.teachers.detector is not None and matched.any():
            refined = refine_prompts(boxes_dino_xyxy=detections.boxes_xyxy, scores_dino=detections.scores,
                                     labels_dino=detections.category_ids, points_gt_xy=px[matched],
                                     boxes_sam_xyxy=boxes_sam[matched], labels_gt=points.category_ids[matched],
                                     alpha=cfg.alpha, beta=cfg.beta, tau_c=cfg.tau_c)
            merged[matched], from_dino[matched] = refined.boxes_merged_xyxy, refined.from_dino
        result.seconds["refine"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        stage2 = refine_sam.predict(emb, points_xy=px, boxes_xyxy=merged, prompt_data=prompt_data)
        result.seconds["decode"] += time.perf_counter() - t0
        inst = Instances(points.image_size, masks=stage2.masks,
                         scores=np.clip(stage2.iou_scores.astype(np.float64), 0, 1),
                         category_ids=points.category_ids, weak_ids=points.weak_ids)
        extras = [{"weak": WeakType.POINT.value, "prompt_box": "gdino" if d else "sam",
                   "prompt": {"point": _listed(p), "bbox": _xywh(b)}}
                  for d, p, b in zip(from_dino, px, merged, strict=True)]
        return _Part(inst, extras, crowd, stage2.low_res_logits, px)

    def _meta(self, extra: dict[str, Any], weak_id: int) -> dict[str, Any]:
        meta: dict[str, Any] = {"source": "pseudo", "weak": extra["weak"],
                                "weak_id": None if weak_id == NO_WEAK_ID else weak_id,
                                "teacher": {k: v for k, v in self.teachers.model_ids.items() if k != "refiner"}}
        meta.update({k: v for k, v in extra.items() if k != "weak"})
        return meta


def _listed(point_xy: np.ndarray) -> list[float]:
    return [float(v) for v in point_xy]


def _xywh(box_xyxy: np.ndarray) -> list[float]:
    """A prompt box as COCO ``[x, y, w, h]``, at full precision (``x0 + w`` gives back ``x1`` to the last
    bit of float64, far below the float32 SAM reads prompts in)."""
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    return [x0, y0, x1 - x0, y1 - y0]


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
