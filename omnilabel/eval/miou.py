"""Teacher quality per weak type: mask IoU and Boundary IoU of pseudomasks against ground truth.

This is the metric of the omni-supervised paper's Table 5 (pseudo-label mIoU per kind of weak label),
with Boundary IoU (Cheng et al., CVPR 2021) beside it, since a 1-px error on a large mask barely moves mask
IoU but shows on its boundary.

A pseudomask is scored when its ``omnilabel.weak_id`` names a ground-truth annotation that has a mask:
the pair is (pseudomask, that annotation's mask). Pseudomasks of the ``tags`` and ``none`` settings are
detections with no ``weak_id`` (nothing says which ground-truth instance they should match), so they are
not scored here; their quality is what COCO AP (``omnilabel.eval.coco_eval``) measures. Annotations that
passed through untouched (``omnilabel.source == "gt"``) are skipped. mIoU is the mean over scored
pseudomasks of their per-instance IoU (not a dataset-wide intersection over union); a weak annotation
with several pseudomasks contributes each of them.

:func:`image_miou` scores one image for ``omnilabel visualize``: by provenance as above where it can, else by
a greedy one-to-one matching of same-category masks, so student predictions get a score too.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from omnilabel.errors import InputError
from omnilabel.instances import NO_WEAK_ID
from omnilabel.ops.masks import segmentation_to_rle

#: Group of :func:`teacher_miou`'s result that pools every weak type.
ALL_GROUP = "all"

#: Boundary IoU's default band width as a fraction of the image diagonal (Cheng et al. 2021: 2%).
DEFAULT_DILATION_RATIO = 0.02


def boundary_width_px(height: int, width: int, *, dilation_ratio: float = DEFAULT_DILATION_RATIO) -> int:
    """Boundary band width d = max(1, round(dilation_ratio * image diagonal)) in pixels."""
    return max(1, int(round(dilation_ratio * math.hypot(height, width))))


def _disk_kernel(radius_px: int) -> np.ndarray:
    """(2r+1, 2r+1) uint8 structuring element of the pixels within Euclidean distance r of the centre."""
    yy, xx = np.mgrid[-radius_px:radius_px + 1, -radius_px:radius_px + 1]
    return (xx * xx + yy * yy <= radius_px * radius_px).astype(np.uint8)


def _inner_boundary(mask: np.ndarray, radius_px: int) -> np.ndarray:
    """Mask minus its erosion by a disk; outside the array counts as background, so a mask cut by the
    image border has a boundary there too (as in the reference implementation)."""
    padded = np.pad(mask.astype(np.uint8), radius_px)
    eroded = cv2.erode(padded, _disk_kernel(radius_px))
    eroded = eroded[radius_px:-radius_px, radius_px:-radius_px].astype(bool)
    return mask & ~eroded


def _boundary_iou_px(mask_a: np.ndarray, mask_b: np.ndarray, radius_px: int) -> float:
    a_any, b_any = bool(mask_a.any()), bool(mask_b.any())
    if not a_any and not b_any:
        return 1.0
    if not a_any or not b_any:
        return 0.0
    band_a = _inner_boundary(mask_a, radius_px)
    band_b = _inner_boundary(mask_b, radius_px)
    return float((band_a & band_b).sum() / (band_a | band_b).sum())


def _check_pair(mask_a: np.ndarray, mask_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(mask_a, dtype=bool), np.asarray(mask_b, dtype=bool)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"expected two (H, W) masks of one shape, got {a.shape} and {b.shape}")
    return a, b


def boundary_iou(mask_a: np.ndarray, mask_b: np.ndarray, *,
                 dilation_ratio: float = DEFAULT_DILATION_RATIO) -> float:
    """Boundary IoU of two masks (Cheng et al., "Boundary IoU", CVPR 2021).

    Each mask's boundary is the band of its pixels within d = max(1, round(dilation_ratio * diagonal))
    pixels of the background: the mask minus its erosion by a disk of radius d, with everything outside
    the image counted as background. The result is the IoU of the two bands. The paper defines the band by
    distance to the contour; its reference code erodes d times by a 3x3 square (chessboard distance);
    here the disk keeps the Euclidean distance the paper states.

    Args:
        mask_a: (H, W) bool (any dtype; nonzero is foreground).
        mask_b: (H, W) bool, same shape.
        dilation_ratio: band width as a fraction of the image diagonal, > 0.

    Returns:
        Float in [0, 1]; 1.0 when both masks are empty, 0.0 when exactly one is.

    Raises:
        ValueError: the masks are not 2-D of one shape, or ``dilation_ratio`` is not positive.
    """
    a, b = _check_pair(mask_a, mask_b)
    if not dilation_ratio > 0:
        raise ValueError(f"dilation_ratio must be > 0, got {dilation_ratio}")
    return _boundary_iou_px(a, b, boundary_width_px(*a.shape, dilation_ratio=dilation_ratio))


def _mask_and_boundary_iou(mask_a: np.ndarray, mask_b: np.ndarray, radius_px: int) -> tuple[float, float]:
    """Both IoUs of two full-image masks, computed on the bounding box of their union.

    Erosion sees everything outside the crop as background, which it is (in the image, or beyond its
    border), so the bands equal those of the full image.
    """
    union = mask_a | mask_b
    rows, cols = np.flatnonzero(union.any(axis=1)), np.flatnonzero(union.any(axis=0))
    if rows.size == 0:
        return 1.0, 1.0
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    a, b = mask_a[y0:y1, x0:x1], mask_b[y0:y1, x0:x1]
    mask_iou = float((a & b).sum() / union[y0:y1, x0:x1].sum())
    return mask_iou, _boundary_iou_px(a, b, radius_px)


def _weak_id(ann: Any) -> int | None:
    """The input annotation a pseudomask came from, or None (a detection, a passthrough, no provenance)."""
    if not isinstance(ann, dict):
        return None
    info = ann.get("omnilabel")
    if not isinstance(info, dict) or info.get("source") == "gt":
        return None
    weak_id = info.get("weak_id")
    if not isinstance(weak_id, int) or isinstance(weak_id, bool) or weak_id == NO_WEAK_ID:
        return None
    return weak_id


def _annotations(coco: Any, what: str) -> list[Any]:
    if not isinstance(coco, dict) or not isinstance(coco.get("annotations"), list):
        raise InputError(f"{what}: expected a COCO file with an 'annotations' list")
    return coco["annotations"]


def has_weak_ids(pred: dict[str, Any]) -> bool:
    """Whether any pseudomask of a COCO file (not a ``source == "gt"`` passthrough) names its ``weak_id``,
    i.e. whether :func:`teacher_miou` has anything to score.

    Raises:
        InputError: ``pred`` is not a COCO file with an ``annotations`` list.
    """
    return any(_weak_id(ann) is not None for ann in _annotations(pred, "predictions"))


def teacher_miou(pred: dict[str, Any], gt: dict[str, Any], *,
                 dilation_ratio: float = DEFAULT_DILATION_RATIO) -> dict[str, dict[str, float]]:
    """Mean mask IoU and Boundary IoU of pseudomasks against the GT masks of their weak annotations.

    Args:
        pred: a complete COCO file of pseudomasks (``omnilabel pseudomask`` output), whose annotations carry
            ``omnilabel: {"source", "weak", "weak_id"}``. Scored: annotations whose ``weak_id`` is the id of
            a ``gt`` annotation with a ``segmentation``; others are ignored (see the module docstring).
        gt: the complete COCO file holding the full masks; image sizes come from its ``images``.
        dilation_ratio: Boundary IoU band width as a fraction of the image diagonal.

    Returns:
        ``{weak: {"miou": float in [0, 1], "boundary_iou": float in [0, 1], "count": int}}`` per weak type
        (``omnilabel.weak``, e.g. ``"points"``, ``"boxes"``; ``"unknown"`` where absent) and ``"all"``
        pooling every scored pseudomask; an empty dict when nothing is scored.

    Raises:
        InputError: a file is not COCO; a scored pseudomask lacks ``segmentation``, lies on another image
            than its weak annotation, or has a mask size other than that image's; a GT image lacks its size.
    """
    pred_anns, gt_anns = _annotations(pred, "predictions"), _annotations(gt, "ground truth")
    sizes = {img["id"]: (img.get("height"), img.get("width"))
             for img in gt.get("images") or [] if isinstance(img, dict) and "id" in img}
    gt_by_id = {a["id"]: a for a in gt_anns
                if isinstance(a, dict) and "id" in a and a.get("segmentation") not in (None, [], {})}
    scores: dict[str, list[tuple[float, float]]] = defaultdict(list)
    problems: list[str] = []
    for ann in pred_anns:
        weak_id = _weak_id(ann)
        if weak_id is None or weak_id not in gt_by_id:
            continue
        target = gt_by_id[weak_id]
        name = f"annotation id {ann.get('id')} (weak_id {weak_id})"
        h, w = sizes.get(target.get("image_id"), (None, None))
        if not isinstance(h, int) or not isinstance(w, int):
            problems.append(f"ground-truth image id {target.get('image_id')}: missing 'height' or 'width'")
            continue
        if ann.get("image_id") != target.get("image_id"):
            problems.append(f"{name}: on image {ann.get('image_id')}, its weak annotation on image "
                            f"{target.get('image_id')}")
            continue
        seg = ann.get("segmentation")
        if seg in (None, [], {}):
            problems.append(f"{name}: missing field 'segmentation'")
            continue
        try:
            rle_pred, rle_gt = segmentation_to_rle(seg, h, w), segmentation_to_rle(target["segmentation"], h, w)
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(f"{name}: invalid field 'segmentation' ({exc})")
            continue
        if tuple(rle_pred["size"]) != (h, w):
            problems.append(f"{name}: mask size {tuple(rle_pred['size'])} differs from the image's {(h, w)}")
            continue
        mask_pred = mask_utils.decode(rle_pred).astype(bool)
        mask_gt = mask_utils.decode(rle_gt).astype(bool)
        radius = boundary_width_px(h, w, dilation_ratio=dilation_ratio)
        weak = str(ann["omnilabel"].get("weak", "unknown"))
        scores[weak].append(_mask_and_boundary_iou(mask_pred, mask_gt, radius))
    if problems:
        raise InputError(f"cannot score pseudomasks ({len(problems)} problems)", problems[:20])
    if not scores:
        return {}
    scores[ALL_GROUP] = [pair for weak in sorted(scores) for pair in scores[weak]]
    out = {}
    for weak in [*sorted(k for k in scores if k != ALL_GROUP), ALL_GROUP]:
        arr = np.asarray(scores[weak], dtype=np.float64)
        out[weak] = {"miou": float(arr[:, 0].mean()), "boundary_iou": float(arr[:, 1].mean()),
                     "count": len(arr)}
    return out


def image_miou(pred_anns: Sequence[dict[str, Any]], gt_anns: Sequence[dict[str, Any]], *,
               image: dict[str, Any]) -> float | None:
    """Mean mask IoU of one image's predictions against its ground-truth masks.

    Two ways to pair, chosen per image:

    - by provenance, when some prediction's ``omnilabel.weak_id`` names a GT annotation of this image with
      a mask: the mean IoU of those pairs, exactly as ``omnilabel.eval.miou.teacher_miou`` scores
      pseudomasks (passthrough GT annotations and detections without a ``weak_id`` are not scored);
    - otherwise (student predictions, detections of the tags setting, a fully annotated image): each GT
      mask (crowd regions excluded) is matched one-to-one to a prediction mask of the same category,
      greedily by descending IoU, and the IoUs are averaged over the GT masks, an unmatched GT mask
      counting 0. A prediction never matches two GT masks, so duplicates do not inflate the score.

    Args:
        pred_anns: COCO annotations of this image (those without a ``segmentation`` are ignored).
        gt_anns: ground-truth annotations of this image.
        image: the COCO image record (``id``, ``height``, ``width``).

    Returns:
        Float in [0, 1]; None when the image has no GT mask to score against.

    Raises:
        InputError: a paired prediction has no mask or a mask of another size (see ``teacher_miou``).
    """
    height, width = image["height"], image["width"]
    by_weak_id = teacher_miou({"annotations": list(pred_anns)},
                              {"images": [image], "annotations": list(gt_anns)})
    if by_weak_id:
        return by_weak_id[ALL_GROUP]["miou"]
    gts = [a for a in gt_anns if a.get("segmentation") not in (None, [], {}) and not a.get("iscrowd")]
    if not gts:
        return None
    preds = [a for a in pred_anns if a.get("segmentation") not in (None, [], {})]
    if not preds:
        return 0.0
    ious = np.asarray(mask_utils.iou([segmentation_to_rle(a["segmentation"], height, width) for a in preds],
                                     [segmentation_to_rle(a["segmentation"], height, width) for a in gts],
                                     [0] * len(gts)), dtype=np.float64).reshape(len(preds), len(gts))
    same_class = np.array([[p.get("category_id") == g.get("category_id") for g in gts] for p in preds])
    ious = np.where(same_class, ious, 0.0)
    free_pred, free_gt, total = set(range(len(preds))), set(range(len(gts))), 0.0
    for flat in np.argsort(-ious, axis=None, kind="stable"):
        p, g = divmod(int(flat), len(gts))
        if ious[p, g] <= 0.0:
            break
        if p in free_pred and g in free_gt:
            free_pred.discard(p)
            free_gt.discard(g)
            total += float(ious[p, g])
    return total / len(gts)
