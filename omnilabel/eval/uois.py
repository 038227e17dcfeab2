"""UOIS metrics (UOIS-Net / UCN / UOAIS / UOIS-SAM): Overlap and Boundary P/R/F and %75, class-agnostic.

Follows ``multilabel_metrics`` of the UOIS-Net evaluation code (chrisdxie/uois, ``src/evaluation.py``), as
the UOIS-SAM spec (§6.2) describes it. Each image is scored on two (H, W) label maps, 0 = background:

* the pairwise F-measure F[j, i] = 2 |g_j ∩ c_i| / (|g_j| + |c_i|) of GT objects g_j and predicted objects
  c_i is matched one-to-one by the Hungarian algorithm (maximum total F; min(#GT, #pred) pairs, pairs of
  F = 0 included, as the reference does);
* Overlap P = Σ matched |c ∩ g| / Σ_i |c_i| and R = Σ matched |c ∩ g| / Σ_j |g_j| (unmatched predictions
  stay in P's denominator, unmatched GT in R's), F = 2PR / (P + R), 0 when P + R = 0;
* Boundary P/R/F: the same on 1-px boundary maps (:func:`boundary_map`, DAVIS ``seg2bmap``), true
  positives within a disk of radius ceil(0.003 · image diagonal) px (3 px at 640×480): precision counts
  predicted-boundary pixels inside the dilated GT boundary, recall GT-boundary pixels inside the dilated
  predicted boundary; the denominators are the boundary pixels of every predicted / GT object;
* %75: matched pairs with F **>** 0.75 (strict, as the reference), divided by the number of GT objects.

Edge cases, as the reference returns them: GT but no predictions → P = 1, R = 0, F = 0 (overlap and
boundary), %75 = 0; predictions but no GT → P = 0, R = 1, F = 0, %75 = 0; neither → everything 1.
Dataset numbers are the mean of the per-image numbers over every evaluated image (not pooled pixels).

Predictions become one label map by painting in ascending score (higher score wins where masks overlap,
spec A9); equal scores, and the GT (which has none), paint larger masks first so a smaller mask lying on a
larger one stays visible, then in list order. A mask painted over entirely is no object. Crowd GT regions
are "don't care": their pixels outside every non-crowd GT object are cleared from the predicted label map
before scoring, so predictions there count neither for nor against (as crowd regions do in COCO AP); a
prediction lying wholly inside one disappears.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from omnilabel.errors import InputError
from omnilabel.eval.coco_eval import predictions_to_results
from omnilabel.ops.masks import segmentation_to_rle

#: Boundary tolerance as a fraction of the image diagonal (reference ``bound_th=0.003``, DAVIS).
TOLERANCE_RATIO = 0.003
#: Matched Overlap F-measure an object needs (strictly more) to count in %75 (reference: 0.75).
F75_THRESH = 0.75


@dataclass(frozen=True)
class UoisScores:
    """UOIS metrics of one image; every score in [0, 1].

    Attributes:
        overlap_p / overlap_r / overlap_f: Overlap precision, recall, F-measure.
        boundary_p / boundary_r / boundary_f: Boundary precision, recall, F-measure.
        f75: share of GT objects whose matched Overlap F-measure is > 0.75.
        gt_objects: GT objects in the label map, >= 0.
        pred_objects: predicted objects in the label map (after painting and crowd clearing), >= 0.
    """

    overlap_p: float
    overlap_r: float
    overlap_f: float
    boundary_p: float
    boundary_r: float
    boundary_f: float
    f75: float
    gt_objects: int
    pred_objects: int


def paint_label_map(masks: np.ndarray | Sequence[np.ndarray], *, scores: Sequence[float] | np.ndarray | None = None,
                    height: int | None = None, width: int | None = None) -> np.ndarray:
    """Rasterise instance masks into one label map (see the module docstring for the paint order).

    Args:
        masks: (N, H, W) bool, or N (H, W) bool arrays.
        scores: (N,) float, any range; the higher wins where masks overlap. None: all equal (GT).
        height: H in pixels, needed only when N = 0.
        width: W in pixels, needed only when N = 0.

    Returns:
        (H, W) int32: 0 = background, k in 1..N = ``masks[k - 1]`` (labels of masks painted over entirely
        are absent).

    Raises:
        ValueError: masks of different or non-2-D shapes, ``scores`` of another length, or N = 0 without
            ``height`` and ``width``.
    """
    if isinstance(masks, np.ndarray) and masks.ndim == 3:
        height, width = masks.shape[1:]
    masks = [np.asarray(m, dtype=bool) for m in masks]
    if not masks:
        if height is None or width is None:
            raise ValueError("no masks: height and width are needed")
        return np.zeros((height, width), dtype=np.int32)
    shape = masks[0].shape
    if len(shape) != 2 or any(m.shape != shape for m in masks):
        raise ValueError(f"expected (H, W) masks of one shape, got {sorted({m.shape for m in masks})}")
    if scores is not None and len(scores) != len(masks):
        raise ValueError(f"expected {len(masks)} scores, got {len(scores)}")
    areas = [int(m.sum()) for m in masks]
    order = paint_order(areas, scores)
    labels = np.zeros(shape, dtype=np.int32)
    for k in order:
        labels[masks[k]] = k + 1
    return labels


def paint_order(areas_px: Sequence[int], scores: Sequence[float] | np.ndarray | None = None) -> list[int]:
    """Indices in the order masks are painted: ascending score, then descending area, then list order.

    Args:
        areas_px: (N,) int, pixels of each mask.
        scores: (N,) float or None (all equal).

    Returns:
        A permutation of ``range(N)``; the last one painted wins.
    """
    score = [0.0] * len(areas_px) if scores is None else [float(s) for s in scores]
    return sorted(range(len(areas_px)), key=lambda k: (score[k], -int(areas_px[k]), k))


def gt_label_map(masks: np.ndarray | Sequence[np.ndarray], *, iscrowd: Sequence[bool] | np.ndarray | None = None,
                 height: int | None = None, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The GT label map and the don't-care pixels of crowd regions.

    Args:
        masks: (N, H, W) bool, or N (H, W) bool arrays: the GT instance masks.
        iscrowd: (N,) bool; crowd masks become don't-care pixels, not objects. None: no crowd.
        height: H in pixels, needed only when N = 0.
        width: W in pixels, needed only when N = 0.

    Returns:
        ``(labels, ignore)``: labels (H, W) int32 of the non-crowd masks (0 = background, k = 1 + index into
        ``masks``; larger masks painted first); ignore (H, W) bool, crowd pixels outside every GT object.

    Raises:
        ValueError: as :func:`paint_label_map`, or ``iscrowd`` of another length.
    """
    if isinstance(masks, np.ndarray) and masks.ndim == 3:
        height, width = masks.shape[1:]
    masks = [np.asarray(m, dtype=bool) for m in masks]
    crowd = [False] * len(masks) if iscrowd is None else [bool(c) for c in iscrowd]
    if len(crowd) != len(masks):
        raise ValueError(f"expected {len(masks)} iscrowd flags, got {len(crowd)}")
    if masks:
        height, width = masks[0].shape[:2]
    objects = [m if not c else np.zeros_like(m) for m, c in zip(masks, crowd, strict=True)]
    labels = paint_label_map(objects, height=height, width=width)
    ignore = np.zeros(labels.shape, dtype=bool)
    for m, c in zip(masks, crowd, strict=True):
        if c:
            ignore |= m
    return labels, ignore & (labels == 0)


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """1-px boundary of a binary mask, as DAVIS' ``seg2bmap`` (same size, no resizing).

    A pixel is boundary where it differs from its east, south or south-east neighbour, so the boundary sits
    half a pixel towards the origin (outside the mask on its top and left, inside on its bottom and right).
    On the last row only the east neighbour counts, on the last column only the south one, and the
    bottom-right pixel is never boundary: a mask touching the bottom or right image edge has no boundary
    along it.

    Args:
        mask: (H, W) bool (or 0/1).

    Returns:
        (H, W) bool.
    """
    m = np.asarray(mask, dtype=bool)
    e = np.zeros_like(m)
    s = np.zeros_like(m)
    se = np.zeros_like(m)
    e[:, :-1] = m[:, 1:]
    s[:-1, :] = m[1:, :]
    se[:-1, :-1] = m[1:, 1:]
    b = (m ^ e) | (m ^ s) | (m ^ se)
    b[-1, :] = m[-1, :] ^ e[-1, :]
    b[:, -1] = m[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def boundary_tolerance_px(height: int, width: int, *, tolerance_ratio: float = TOLERANCE_RATIO) -> int:
    """Radius of the boundary tolerance disk: ceil(tolerance_ratio · image diagonal) px (3 at 640×480)."""
    return int(math.ceil(tolerance_ratio * math.hypot(height, width)))


def _disk(radius_px: int) -> np.ndarray:
    """(2r+1, 2r+1) uint8: the pixels within Euclidean distance r of the centre (skimage's ``disk``)."""
    yy, xx = np.mgrid[-radius_px:radius_px + 1, -radius_px:radius_px + 1]
    return (xx * xx + yy * yy <= radius_px * radius_px).astype(np.uint8)


def _window(box: tuple[slice, slice], shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` holding every boundary pixel of an object with bounding ``box``, plus the empty
    row and column after it, so that :func:`boundary_map` of the crop equals the full map's crop."""
    ys, xs = box
    return max(ys.start - 1, 0), min(ys.stop + 1, shape[0]), max(xs.start - 1, 0), min(xs.stop + 1, shape[1])


def _boundary_tps(pred_mask: np.ndarray, gt_mask: np.ndarray, kernel: np.ndarray) -> tuple[int, int]:
    """(precision TP, recall TP): predicted-boundary pixels within the tolerance of the GT boundary, and
    GT-boundary pixels within the tolerance of the predicted boundary."""
    pb, gb = boundary_map(pred_mask), boundary_map(gt_mask)
    # Outside the array counts as no boundary, which is exact: every boundary pixel lies in the crop.
    pd = cv2.dilate(pb.astype(np.uint8), kernel).astype(bool)
    gd = cv2.dilate(gb.astype(np.uint8), kernel).astype(bool)
    return int((pb & gd).sum()), int((gb & pd).sum())


def _compact(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels renumbered 0..n (0 stays background) and n."""
    ids = np.union1d([0], np.unique(labels))
    return np.searchsorted(ids, labels).astype(np.int32), len(ids) - 1


def _prf(tp: float, pred_total: float, gt_total: float) -> tuple[float, float, float]:
    p = tp / pred_total if pred_total else 0.0
    r = tp / gt_total if gt_total else 0.0
    return p, r, (2 * p * r / (p + r) if p + r > 0 else 0.0)


def image_metrics(pred_labels: np.ndarray, gt_labels: np.ndarray, *, ignore: np.ndarray | None = None,
                  tolerance_ratio: float = TOLERANCE_RATIO, f75_thresh: float = F75_THRESH) -> UoisScores:
    """UOIS metrics of one image (see the module docstring).

    Args:
        pred_labels: (H, W) integer, >= 0; 0 = background, each other value one predicted object.
        gt_labels: (H, W) integer, >= 0; 0 = background, each other value one GT object.
        ignore: (H, W) bool, don't-care pixels (crowd), cleared from ``pred_labels`` before scoring; None: none.
        tolerance_ratio: boundary tolerance radius as a fraction of the image diagonal, > 0.
        f75_thresh: an object counts in %75 when its matched Overlap F is strictly above this, in [0, 1].

    Returns:
        The image's :class:`UoisScores`.

    Raises:
        ValueError: the maps are not 2-D integer arrays of one shape, hold negative labels, or ``ignore``
            has another shape.
    """
    pred, gt = np.asarray(pred_labels), np.asarray(gt_labels)
    if pred.ndim != 2 or pred.shape != gt.shape:
        raise ValueError(f"expected two (H, W) label maps of one shape, got {pred.shape} and {gt.shape}")
    for name, a in (("pred_labels", pred), ("gt_labels", gt)):
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{name} must be integer labels, got dtype {a.dtype}")
        if a.size and a.min() < 0:
            raise ValueError(f"{name} must be >= 0, got {a.min()}")
    if ignore is not None:
        ignore = np.asarray(ignore, dtype=bool)
        if ignore.shape != pred.shape:
            raise ValueError(f"ignore must be {pred.shape}, got {ignore.shape}")
        pred = np.where(ignore, 0, pred)
    pred, n_pred = _compact(pred)
    gt, n_gt = _compact(gt)

    # Edge cases, as the reference returns them.
    if n_pred == 0 and n_gt == 0:
        return UoisScores(1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0, 0)
    if n_pred == 0:
        return UoisScores(1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, n_gt, 0)
    if n_gt == 0:
        return UoisScores(0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0, n_pred)

    # Contingency table of (GT label, predicted label) pixel counts, background row and column included.
    counts = np.bincount((gt.ravel().astype(np.int64) * (n_pred + 1) + pred.ravel()),
                         minlength=(n_gt + 1) * (n_pred + 1)).reshape(n_gt + 1, n_pred + 1)
    tp = counts[1:, 1:].astype(np.float64)
    gt_area = counts[1:, :].sum(axis=1).astype(np.float64)
    pred_area = counts[:, 1:].sum(axis=0).astype(np.float64)
    f_matrix = 2 * tp / (gt_area[:, None] + pred_area[None, :])
    rows, cols = linear_sum_assignment(f_matrix, maximize=True)

    overlap = _prf(float(tp[rows, cols].sum()), float(pred_area.sum()), float(gt_area.sum()))
    f75 = float((f_matrix[rows, cols] > f75_thresh).sum()) / n_gt

    # Boundaries, object by object on crops around them (exact, see _window).
    shape = (int(gt.shape[0]), int(gt.shape[1]))
    kernel = _disk(boundary_tolerance_px(*shape, tolerance_ratio=tolerance_ratio))
    gt_boxes, pred_boxes = ndimage.find_objects(gt), ndimage.find_objects(pred)
    gt_win = [_window(b, shape) for b in gt_boxes]
    pred_win = [_window(b, shape) for b in pred_boxes]
    gt_bpx = sum(int(boundary_map(gt[y0:y1, x0:x1] == k + 1).sum()) for k, (y0, y1, x0, x1) in enumerate(gt_win))
    pred_bpx = sum(int(boundary_map(pred[y0:y1, x0:x1] == k + 1).sum())
                   for k, (y0, y1, x0, x1) in enumerate(pred_win))
    prec_tp = rec_tp = 0
    for j, i in zip(rows.tolist(), cols.tolist(), strict=True):
        (gy0, gy1, gx0, gx1), (py0, py1, px0, px1) = gt_win[j], pred_win[i]
        y0, y1, x0, x1 = min(gy0, py0), max(gy1, py1), min(gx0, px0), max(gx1, px1)
        p_tp, r_tp = _boundary_tps(pred[y0:y1, x0:x1] == i + 1, gt[y0:y1, x0:x1] == j + 1, kernel)
        prec_tp, rec_tp = prec_tp + p_tp, rec_tp + r_tp
    bp = prec_tp / pred_bpx if pred_bpx else 0.0
    br = rec_tp / gt_bpx if gt_bpx else 0.0
    bf = 2 * bp * br / (bp + br) if bp + br > 0 else 0.0
    return UoisScores(*overlap, bp, br, bf, f75, n_gt, n_pred)


def mean_scores(scores: Sequence[UoisScores]) -> dict[str, Any]:
    """Dataset UOIS metrics: the mean over images of the per-image metrics (not pooled over pixels).

    Args:
        scores: one :class:`UoisScores` per image, at least one.

    Returns:
        ``{"overlap": {"P", "R", "F"}, "boundary": {"P", "R", "F"}, "f75", "images", "gt_objects",
        "pred_objects"}``: metrics are floats in [0, 1]; ``images`` is ``len(scores)`` and the object counts
        are totals over the images.

    Raises:
        ValueError: ``scores`` is empty.
    """
    if not scores:
        raise ValueError("no images to average over")
    mean = {k: float(np.mean([asdict(s)[k] for s in scores])) for k in asdict(scores[0])}
    return {"overlap": {"P": mean["overlap_p"], "R": mean["overlap_r"], "F": mean["overlap_f"]},
            "boundary": {"P": mean["boundary_p"], "R": mean["boundary_r"], "F": mean["boundary_f"]},
            "f75": mean["f75"], "images": len(scores),
            "gt_objects": sum(s.gt_objects for s in scores), "pred_objects": sum(s.pred_objects for s in scores)}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _gt_index(gt: dict[str, Any]) -> tuple[dict[int, tuple[int, int]], dict[int, list[dict[str, Any]]]]:
    """``image id -> (H, W)`` and ``image id -> annotations`` of a checked GT COCO dict."""
    if not isinstance(gt, dict) or not all(isinstance(gt.get(k), list) for k in ("images", "annotations")):
        raise InputError("ground truth is not a COCO file (needs lists 'images' and 'annotations')")
    problems: list[str] = []
    sizes: dict[int, tuple[int, int]] = {}
    for img in gt["images"]:
        if not isinstance(img, dict) or not _is_int(img.get("id")):
            problems.append(f"image {img!r:.60}: missing or invalid field 'id'")
        elif not all(_is_int(img.get(f)) and img[f] > 0 for f in ("height", "width")):
            problems.append(f"image id {img['id']}: missing or invalid field 'height' or 'width'")
        else:
            sizes[img["id"]] = (img["height"], img["width"])
    anns: dict[int, list[dict[str, Any]]] = {i: [] for i in sizes}
    for ann in gt["annotations"]:
        name = f"annotation id {ann.get('id')}" if isinstance(ann, dict) else f"annotation {ann!r:.60}"
        if not isinstance(ann, dict) or ann.get("image_id") not in anns:
            problems.append(f"{name}: field 'image_id' names no image")
        elif not ann.get("iscrowd") and not ann.get("segmentation"):
            problems.append(f"{name}: missing field 'segmentation' (needed for UOIS metrics)")
        else:
            anns[ann["image_id"]].append(ann)
    if problems:
        raise InputError(f"ground truth is malformed ({len(problems)} problems)", problems[:20])
    return sizes, anns


def _paint_rles(rles: list[dict[str, Any]], scores: list[float] | None, height: int, width: int) -> np.ndarray:
    """:func:`paint_label_map` of compressed RLEs, decoding one mask at a time."""
    labels = np.zeros((height, width), dtype=np.int32)
    areas = [int(a) for a in mask_utils.area(rles)] if rles else []
    for k in paint_order(areas, scores):
        labels[mask_utils.decode(rles[k]).astype(bool)] = k + 1
    return labels


def _gt_image(anns: list[dict[str, Any]], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`gt_label_map` of one image's GT annotations."""
    objects, ignore = [], np.zeros((height, width), dtype=bool)
    for ann in anns:
        if ann.get("iscrowd") and not ann.get("segmentation"):
            continue
        try:
            rle = segmentation_to_rle(ann["segmentation"], height, width)
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"ground truth: annotation id {ann.get('id')}: invalid field 'segmentation' "
                             f"({exc})") from exc
        if ann.get("iscrowd"):
            ignore |= mask_utils.decode(rle).astype(bool)
        else:
            objects.append(rle)
    labels = _paint_rles(objects, None, height, width)
    return labels, ignore & (labels == 0)


def evaluate_uois(pred: dict[str, Any] | list[dict[str, Any]], gt: dict[str, Any], *,
                  image_ids: Sequence[int] | None = None, tolerance_ratio: float = TOLERANCE_RATIO,
                  f75_thresh: float = F75_THRESH) -> dict[str, Any]:
    """Class-agnostic UOIS metrics of predictions against GT, averaged over images.

    Categories are ignored on both sides. Each image's predictions are painted by ``score`` (1.0 where
    missing) into one label map, its non-crowd GT masks into another, crowd regions are don't-care (see the
    module docstring), and :func:`image_metrics` scores the pair; masks are decoded one image at a time.
    Predictions without a segmentation are skipped (and logged), as for AP.

    Args:
        pred: a COCO results list, or a complete COCO file (see
            :func:`omnilabel.eval.coco_eval.predictions_to_results`).
        gt: a complete COCO file (already loaded JSON) with instance masks; not modified.
        image_ids: evaluate only these GT images (the images a pseudomask file lists); None: every GT image,
            an image without predictions scoring as all missed. Predictions on other images are not scored.
        tolerance_ratio: boundary tolerance radius as a fraction of the image diagonal, > 0.
        f75_thresh: the matched Overlap F an object must exceed to count in %75, in [0, 1].

    Returns:
        :func:`mean_scores`' dict: ``overlap`` and ``boundary`` ``{"P", "R", "F"}``, ``f75`` (floats in
        [0, 1]), ``images``, ``gt_objects``, ``pred_objects``.

    Raises:
        InputError: the GT or a prediction is malformed, a prediction names an image absent from the GT or
            has a mask of another size than its image, ``image_ids`` names an image absent from the GT, or
            there is no image to evaluate.
    """
    sizes, gt_anns = _gt_index(gt)
    results = predictions_to_results(pred, iou_type="segm", image_sizes=sizes)
    problems = sorted({f"image id {r['image_id']}: predicted but not in the ground truth"
                       for r in results if r["image_id"] not in sizes})
    problems += sorted({f"image id {r['image_id']}: predicted mask size differs from the image's (height, "
                        f"width) {sizes[r['image_id']]}" for r in results
                        if r["image_id"] in sizes and tuple(r["segmentation"]["size"]) != sizes[r["image_id"]]})
    ids = list(sizes) if image_ids is None else sorted(set(image_ids))
    problems += [f"image id {i}: to evaluate but not in the ground truth" for i in ids if i not in sizes]
    if problems:
        raise InputError(f"predictions do not match the ground truth ({len(problems)} problems)", problems[:20])
    if not ids:
        raise InputError("no images to evaluate")
    by_image: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
    for r in results:
        if r["image_id"] in by_image:
            by_image[r["image_id"]].append(r)

    scores = []
    for image_id in ids:
        height, width = sizes[image_id]
        gt_labels, ignore = _gt_image(gt_anns[image_id], height, width)
        records = by_image.pop(image_id)
        rles = [segmentation_to_rle(r["segmentation"], height, width) for r in records]
        pred_labels = _paint_rles(rles, [r["score"] for r in records], height, width)
        scores.append(image_metrics(pred_labels, gt_labels, ignore=ignore, tolerance_ratio=tolerance_ratio,
                                    f75_thresh=f75_thresh))
    return mean_scores(scores)
