"""COCO AP of predictions against ground truth, with pycocotools' ``COCOeval`` as the judge.

Predictions come in either of the two forms omnilabel writes or reads:

* a COCO *results list* ``[{"image_id", "category_id", "segmentation", "score"}, ...]`` (what
  ``omnilabel predict`` writes and what detectron2-style tools emit), or
* a complete COCO file (a dict with ``images``, ``categories`` and ``annotations``), e.g. a pseudomask file;
  its annotations carry ``score`` (1.0 where missing).

Both go through ``COCO.loadRes`` after conversion, so ``area`` and ``bbox`` of every prediction are
recomputed from its mask exactly as the official evaluation does. Everything pycocotools prints is swallowed;
only the numbers are returned.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from omnilabel.errors import InputError
from omnilabel.ops.masks import segmentation_to_rle

logger = logging.getLogger(__name__)

IouType = Literal["segm", "bbox"]

#: Keys of :func:`evaluate_segm`'s result, in the order of ``COCOeval.stats[:6]``.
METRIC_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")

#: At most this many individual problems are listed in one InputError.
_MAX_PROBLEMS = 20


@contextlib.contextmanager
def _silent() -> Iterator[None]:
    """Swallow pycocotools' progress prints."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _raise_problems(message: str, problems: list[str]) -> None:
    if not problems:
        return
    shown = problems[:_MAX_PROBLEMS]
    if len(problems) > _MAX_PROBLEMS:
        shown.append(f"... and {len(problems) - _MAX_PROBLEMS} more")
    raise InputError(f"{message} ({len(problems)} problems)", shown)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _records(pred: dict[str, Any] | list[dict[str, Any]]) -> tuple[list[Any], bool]:
    """The prediction records and whether they come from a complete COCO file."""
    if isinstance(pred, list):
        return pred, False
    if isinstance(pred, dict):
        anns = pred.get("annotations")
        if not isinstance(anns, list):
            raise InputError("predictions: a COCO file needs an 'annotations' list")
        return anns, True
    raise InputError(f"predictions: expected a COCO results list or a COCO file, got {type(pred).__name__}")


def _image_sizes(coco: dict[str, Any]) -> dict[int, tuple[int, int]]:
    """``image id -> (H, W)`` for every image that states both."""
    sizes = {}
    for img in coco.get("images") or []:
        if isinstance(img, dict) and _is_int(img.get("id")) and _is_int(img.get("height")) \
                and _is_int(img.get("width")):
            sizes[img["id"]] = (img["height"], img["width"])
    return sizes


def _has_geometry(value: Any) -> bool:
    return value is not None and value != [] and value != {}


def _to_compressed_rle(segmentation: Any, size: tuple[int, int] | None) -> dict[str, Any]:
    """Any COCO segmentation to ``{"size": [H, W], "counts": str}``; polygons need ``size``."""
    if isinstance(segmentation, dict):
        h, w = (int(v) for v in segmentation["size"])
    elif size is None:
        raise ValueError("a polygon needs the image size, and the image states none")
    else:
        h, w = size
    rle = segmentation_to_rle(segmentation, h, w)
    counts = rle["counts"]
    return {"size": [h, w], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def _convert(pred: dict[str, Any] | list[dict[str, Any]], *, iou_type: IouType,
             image_sizes: dict[int, tuple[int, int]] | None) -> tuple[list[dict[str, Any]], int]:
    """Results list for ``COCO.loadRes`` and the number of records skipped for lack of geometry."""
    records, from_file = _records(pred)
    sizes = dict(image_sizes or {})
    if from_file:
        sizes.update(_image_sizes(pred))  # type: ignore[arg-type]
    results: list[dict[str, Any]] = []
    problems: list[str] = []
    skipped = 0
    for index, rec in enumerate(records):
        if not isinstance(rec, dict):
            problems.append(f"record #{index}: not an object")
            continue
        name = f"annotation id {rec['id']}" if from_file and "id" in rec else f"result #{index}"
        bad = [f for f in ("image_id", "category_id") if not _is_int(rec.get(f))]
        score = rec.get("score", 1.0)
        if not _is_number(score):
            bad.append("score")
        if bad:
            problems.extend(f"{name}: missing or invalid field '{f}'" for f in bad)
            continue
        out = {"image_id": rec["image_id"], "category_id": rec["category_id"], "score": float(score)}
        seg, bbox = rec.get("segmentation"), rec.get("bbox")
        try:
            if iou_type == "segm":
                if not _has_geometry(seg):
                    skipped += 1
                    continue
                out["segmentation"] = _to_compressed_rle(seg, sizes.get(rec["image_id"]))
            elif isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox):
                out["bbox"] = [float(v) for v in bbox]
            elif _has_geometry(seg):
                rle = _to_compressed_rle(seg, sizes.get(rec["image_id"]))
                out["bbox"] = [float(v) for v in mask_utils.toBbox(rle)]
            else:
                skipped += 1
                continue
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(f"{name}: invalid field 'segmentation' ({exc})")
            continue
        results.append(out)
    _raise_problems("predictions are malformed", problems)
    return results, skipped


def count_unscorable(pred: dict[str, Any] | list[dict[str, Any]], *, iou_type: IouType = "segm") -> int:
    """Number of prediction records that carry no geometry for ``iou_type`` and are left out of AP.

    For ``segm`` that is a record without ``segmentation``; for ``bbox`` one with neither ``bbox`` nor
    ``segmentation``. Malformed records raise instead (see :func:`predictions_to_results`).
    """
    records, _ = _records(pred)
    keys = ("segmentation",) if iou_type == "segm" else ("bbox", "segmentation")
    return sum(1 for rec in records
               if isinstance(rec, dict) and not any(_has_geometry(rec.get(k)) for k in keys))


def predictions_to_results(pred: dict[str, Any] | list[dict[str, Any]], *, iou_type: IouType = "segm",
                           image_sizes: dict[int, tuple[int, int]] | None = None) -> list[dict[str, Any]]:
    """Turn predictions in either form into a results list that ``COCO.loadRes`` accepts.

    Each result keeps only ``image_id``, ``category_id``, ``score`` (1.0 where missing) and the geometry
    that ``iou_type`` scores: for ``segm`` the mask as compressed RLE (``counts`` a str), so that
    ``loadRes`` recomputes ``area`` and ``bbox`` from it (``id``, ``bbox``, ``area``, ``iscrowd`` are
    dropped); for ``bbox`` the box ``[x, y, w, h]`` (from the mask where a record has no box). Records with
    no such geometry cannot be scored: they are skipped, and their number is logged (see
    :func:`count_unscorable`).

    Args:
        pred: a COCO results list, or a complete COCO file (dict with ``annotations``).
        iou_type: ``"segm"`` or ``"bbox"``.
        image_sizes: ``image id -> (H, W)``, needed for polygon segmentations of a results list (a COCO
            file's own ``images`` take precedence).

    Returns:
        New dicts; ``pred`` is not modified.

    Raises:
        InputError: naming each record and field that is malformed (``image_id``, ``category_id``,
            ``score``, ``segmentation``).
    """
    results, skipped = _convert(pred, iou_type=iou_type, image_sizes=image_sizes)
    if skipped:
        logger.warning("%d predictions carry no %s and are not scored", skipped, iou_type)
    return results


def _prepare_gt(gt: dict[str, Any], iou_type: IouType) -> dict[str, Any]:
    """A validated shallow copy of ``gt`` whose annotations all carry ``area``, ``iscrowd`` and ``bbox``."""
    if not isinstance(gt, dict):
        raise InputError(f"ground truth: expected a COCO file (dict), got {type(gt).__name__}")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(gt.get(k), list)]
    if missing:
        raise InputError("ground truth is not a COCO file", [f"missing list '{k}'" for k in missing])
    problems: list[str] = []
    image_ids = set()
    for img in gt["images"]:
        if not isinstance(img, dict) or not _is_int(img.get("id")):
            problems.append(f"image {img!r:.60}: missing or invalid field 'id'")
            continue
        image_ids.add(img["id"])
        for f in ("height", "width"):
            if not _is_int(img.get(f)) or img[f] <= 0:
                problems.append(f"image id {img['id']}: missing or invalid field '{f}'")
    sizes = _image_sizes(gt)
    anns = []
    for ann in gt["annotations"]:
        if not isinstance(ann, dict) or not _is_int(ann.get("id")):
            problems.append(f"annotation {ann!r:.60}: missing or invalid field 'id'")
            continue
        name = f"annotation id {ann['id']}"
        if not _is_int(ann.get("image_id")) or ann["image_id"] not in image_ids:
            problems.append(f"{name}: field 'image_id' names no image ({ann.get('image_id')!r})")
            continue
        if not _is_int(ann.get("category_id")):
            problems.append(f"{name}: missing or invalid field 'category_id'")
            continue
        ann = dict(ann)
        seg, size = ann.get("segmentation"), sizes.get(ann["image_id"])
        rle = None
        if _has_geometry(seg) and size is not None:
            try:
                rle = segmentation_to_rle(seg, *size)
            except (ValueError, KeyError, TypeError) as exc:
                problems.append(f"{name}: invalid field 'segmentation' ({exc})")
                continue
        if iou_type == "segm" and not _has_geometry(seg):
            problems.append(f"{name}: missing field 'segmentation' (needed for segm AP)")
            continue
        bbox = ann.get("bbox")
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            if rle is None:
                problems.append(f"{name}: missing or invalid field 'bbox' (no 'segmentation' either)")
                continue
            ann["bbox"] = [float(v) for v in mask_utils.toBbox(rle)]
        if not _is_number(ann.get("area")):
            ann["area"] = float(mask_utils.area(rle)) if rle is not None else float(bbox[2] * bbox[3])
        ann.setdefault("iscrowd", 0)
        anns.append(ann)
    _raise_problems("ground truth is malformed", problems)
    return {**gt, "annotations": anns}


def _coco_from_dict(dataset: dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with _silent():
        coco.createIndex()
    return coco


def _check_against_gt(results: list[dict[str, Any]], gt: dict[str, Any]) -> None:
    """Every result names a GT image and category, and its mask has that image's size."""
    sizes = _image_sizes(gt)
    category_ids = {c.get("id") for c in gt["categories"] if isinstance(c, dict)}
    bad_images = sorted({r["image_id"] for r in results if r["image_id"] not in sizes})
    problems = [f"image id {i}: predicted but not in the ground truth" for i in bad_images]
    bad_cats = sorted({r["category_id"] for r in results if r["category_id"] not in category_ids})
    problems += [f"category id {c}: predicted but not among the ground truth's categories" for c in bad_cats]
    wrong_size = sorted({r["image_id"] for r in results if r["image_id"] in sizes and "segmentation" in r
                         and tuple(r["segmentation"]["size"]) != sizes[r["image_id"]]})
    problems += [f"image id {i}: predicted mask size differs from the image's (height, width) "
                 f"{sizes[i]}" for i in wrong_size]
    _raise_problems("predictions do not match the ground truth", problems)


def evaluate_segm(pred: dict[str, Any] | list[dict[str, Any]], gt: dict[str, Any], *,
                  iou_type: IouType = "segm", image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """COCO AP of predictions against ground truth (pycocotools ``COCOeval``, 100 detections per image).

    Every image of ``gt`` (or of ``image_ids``) is evaluated, so an image with ground truth but no prediction
    counts as missed.
    With no predictions at all the APs are 0.0 (pycocotools' ``loadRes`` cannot take an empty list; an
    empty results set is built instead). As in pycocotools, a size range with no ground-truth instance
    reports -1.0.

    Args:
        pred: a COCO results list, or a complete COCO file (see :func:`predictions_to_results`).
        gt: a complete COCO file (already loaded JSON); not modified. Annotations lacking ``area`` or
            ``iscrowd`` get them from their mask (or box) and 0.
        iou_type: ``"segm"`` (mask AP) or ``"bbox"`` (box AP).
        image_ids: evaluate only these GT images (e.g. those a pseudomask file covers); None: all of them.

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}``, floats in [0, 1], or -1.0 where undefined.

    Raises:
        InputError: ``iou_type`` unknown; the GT is malformed (an annotation without ``segmentation``
            for segm names its id and the field); a prediction is malformed, names an image id or a
            category id absent from the GT, or has a mask whose size is not its image's.
    """
    if iou_type not in ("segm", "bbox"):
        raise InputError(f"unknown iou_type {iou_type!r}; expected 'segm' or 'bbox'")
    gt_clean = _prepare_gt(gt, iou_type)
    results = predictions_to_results(pred, iou_type=iou_type, image_sizes=_image_sizes(gt_clean))
    _check_against_gt(results, gt_clean)
    coco_gt = _coco_from_dict(gt_clean)
    if results:
        with _silent():
            coco_dt = coco_gt.loadRes(results)
    else:
        coco_dt = _coco_from_dict({"images": list(gt_clean["images"]),
                                   "categories": list(gt_clean["categories"]), "annotations": []})
    evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
    if image_ids is not None:
        unknown = sorted(set(image_ids) - set(coco_gt.getImgIds()))
        _raise_problems("images to evaluate are not in the ground truth",
                        [f"image id {i}: not in the ground truth" for i in unknown])
        evaluator.params.imgIds = sorted(set(image_ids))
    with _silent():
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(evaluator.stats[i]) for i, name in enumerate(METRIC_NAMES)}
