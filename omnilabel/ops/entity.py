"""E-SAM's training-free entity segmentation steps, as pure functions on arrays (digest: specs/e-sam.md).

This module holds MMG and the helpers the others share; EMR is ``omnilabel.ops.entity_refine``, USR and the
final map ``omnilabel.ops.entity_cover``.

E-SAM post-processes a frozen SAM's per-point, three-granularity masks in three stages:

- **MMG** (§2): levels by area (Eq. 1), object-level NMS θ_O = 0.8 then the best-map check γ_O = 0.6 (Eq. 2),
  density-adaptive NMS of part/subpart masks (Eq. 3-4).
- **EMR** (§3): split overlapping object masks (δ = 0.05, gallery guidance τ = 0.1, Eq. 5-6), then merge fragments
  whose superpixel centroids are feature neighbours (Eq. 7) where one gallery mask covers both (Eq. 8).
- **USR** (§4): prompts for uncovered superpixels (Eq. 9), a greedy fewest-mask cover, fusion by IoU > ρ = 0.1
  (Eq. 10).

Running SAM, Felzenszwalb and sampling encoder features belong to the teacher. Conventions: masks are
``(N, H, W)`` bool; points are SAM's continuous pixel xy (pixel (r, c) covers [c, c+1) x [r, r+1), its centre is
(c + 0.5, r + 0.5), and a point is read at (floor(y), floor(x))). Where the paper is silent the choice is a keyword
argument marked ``[ours]`` with its reason.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from omnilabel.errors import InputError
from omnilabel.ops.boxes import box_iou, masks_to_boxes_xyxy

__all__ = ["adaptive_nms", "consistency_filter", "levels_by_area", "mask_iou_matrix", "mask_nms", "stability_scores",
           "superpixel_density"]


# --- helpers -----------------------------------------------------------------------------------------------------


def checked_masks(name: str, masks: np.ndarray, hw: tuple[int, ...] | None = None) -> np.ndarray:
    m = np.asarray(masks, dtype=bool)
    if m.ndim != 3 or (hw is not None and m.shape[1:] != tuple(hw)):
        want = f"(N, {hw[0]}, {hw[1]})" if hw is not None else "(N, H, W)"
        raise InputError(f"{name} must be {want} bool, got shape {m.shape}")
    return m


def checked_vector(name: str, values: np.ndarray, n: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.shape != (n,):
        raise InputError(f"{name} must be ({n},), got shape {v.shape}")
    return v


def flat_masks(m: np.ndarray) -> np.ndarray:
    # float32 counts are exact below 2**24 pixels; larger images take float64.
    dtype = np.float32 if m.shape[1] * m.shape[2] < 2**24 else np.float64
    return m.reshape(len(m), m.shape[1] * m.shape[2]).astype(dtype)


def intersections(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.rint(flat_masks(a) @ flat_masks(b).T).astype(np.int64)


def mask_iou_matrix(masks_a: np.ndarray, masks_b: np.ndarray) -> np.ndarray:
    """Pairwise mask IoU.

    Args:
        masks_a: (N, H, W) bool. masks_b: (M, H, W) bool.

    Returns:
        (N, M) float64 in [0, 1]; 0 where both masks are empty.
    """
    a, b = checked_masks("masks_a", masks_a), checked_masks("masks_b", masks_b)
    if a.shape[1:] != b.shape[1:]:
        raise InputError(f"masks_a and masks_b differ in (H, W): {a.shape[1:]} vs {b.shape[1:]}")
    inter = intersections(a, b)
    union = a.sum(axis=(1, 2))[:, None] + b.sum(axis=(1, 2))[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def _greedy_nms(iou: np.ndarray, scores: np.ndarray, thresh: np.ndarray) -> np.ndarray:
    """Greedy NMS: the kept mask i suppresses every j with ``iou[i, j] > thresh[i]``."""
    order = np.argsort(-scores, kind="stable")
    suppressed = np.zeros(len(scores), dtype=bool)
    keep = []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > thresh[i]
    return np.asarray(keep, dtype=np.int64)


def inside_centroid(mask: np.ndarray) -> np.ndarray:
    """(2,) xy: the centroid of a non-empty (H, W) mask, moved to the nearest mask pixel centre when outside."""
    rows, cols = np.nonzero(mask)
    cx, cy = cols.mean() + 0.5, rows.mean() + 0.5
    if mask[int(cy), int(cx)]:
        return np.array([cx, cy])
    # Non-convex regions (a ring, a C) have their centroid outside; SAM would then segment the wrong thing.
    nearest = np.argmin((cols + 0.5 - cx) ** 2 + (rows + 0.5 - cy) ** 2)
    return np.array([cols[nearest] + 0.5, rows[nearest] + 0.5])


# --- MMG (§2) ----------------------------------------------------------------------------------------------------


def levels_by_area(masks: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Granularity levels of SAM's three outputs per point, by area, and the best level by score (§2.1, Eq. 1).

    Args:
        masks: (N, 3, H, W) bool, SAM's multimask output for N point prompts.
        scores: (N, 3) float confidence per output ([ours]: SAM's ``iou_predictions``).

    Returns:
        ``(order, best)``: order (N, 3) int64, the output indices by descending area, so ``order[:, 0]`` is the
        object (O), ``order[:, 1]`` the part (P), ``order[:, 2]`` the subpart (SP) output; equal areas keep the
        decoder's output order. best (N,) int64, the output index with the highest score (first on ties).
        ``masks[np.arange(N), order[:, 0]]`` is then M_O and ``masks[np.arange(N), best]`` is M_B.
    """
    m = np.asarray(masks, dtype=bool)
    if m.ndim != 4 or m.shape[1] != 3:
        raise InputError(f"masks must be (N, 3, H, W) bool, got shape {m.shape}")
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (len(m), 3):
        raise InputError(f"scores must be ({len(m)}, 3), got shape {s.shape}")
    areas = m.reshape(len(m), 3, m.shape[2] * m.shape[3]).sum(axis=2)
    order = np.argsort(-areas, axis=1, kind="stable")
    return order.astype(np.int64), np.argmax(s, axis=1).astype(np.int64)


def stability_scores(logits: np.ndarray, *, threshold: float = 0.0, offset: float = 1.0) -> np.ndarray:
    """SAM AMG's stability score: IoU of the masks ``logits > threshold + offset`` and ``> threshold - offset``.

    The first mask lies inside the second, so the IoU is the ratio of their areas; a mask whose second area is
    0 scores 1 (as in ``segment_anything.utils.amg.calculate_stability_score``, which divides 0 by 0 only when
    both are empty; here that is defined).

    Args:
        logits: (..., H, W) float mask logits.
        threshold: the mask threshold (SAM: 0). offset: AMG's ``stability_score_offset`` (1.0).

    Returns:
        (...,) float64 in [0, 1].
    """
    lg = np.asarray(logits, dtype=np.float32)
    if lg.ndim < 2:
        raise InputError(f"logits must be (..., H, W), got shape {lg.shape}")
    inner = (lg > threshold + offset).sum(axis=(-2, -1))
    outer = (lg > threshold - offset).sum(axis=(-2, -1))
    return np.where(outer > 0, inner / np.maximum(outer, 1), 1.0)


def mask_nms(masks: np.ndarray, scores: np.ndarray, *, iou_thresh: float = 0.8,
             overlap: Literal["mask", "box"] = "mask") -> np.ndarray:
    """Greedy NMS by score, E-SAM's "naive NMS" of the object level (§2.2 step 1, θ_O = 0.8).

    ``overlap="mask"`` (default, [ours]; the paper does not say which IoU): SAM's three outputs of one point and
    the outputs of nearby points are often nested (a shirt inside a person) or interlocked (an L-shaped floor around
    a table), with near-identical boxes but low mask IoU. Box IoU would suppress such distinct entities, which is
    the under-segmentation E-SAM sets out to fix. ``overlap="box"`` reproduces SAM AMG's box NMS.

    Args:
        masks: (N, H, W) bool.
        scores: (N,) float; higher is kept first.
        iou_thresh: a mask is dropped when its IoU with a kept, higher-scoring mask is **greater** than this
            (as ``torchvision.ops.nms`` and ``nms_xyxy``).
        overlap: which IoU decides suppression.

    Returns:
        (K,) int64 indices of kept masks by descending score (ties keep input order).
    """
    m = checked_masks("masks", masks)
    s = checked_vector("scores", scores, len(m))
    if overlap == "mask":
        iou = mask_iou_matrix(m, m)
    elif overlap == "box":
        boxes = masks_to_boxes_xyxy(m)
        iou = box_iou(boxes, boxes)
    else:
        raise InputError(f"overlap must be 'mask' or 'box', got {overlap!r}")
    return _greedy_nms(iou, s, np.full(len(m), float(iou_thresh)))


def consistency_filter(objects: np.ndarray, best: np.ndarray, *, gamma: float = 0.6,
                       object_point_ids: np.ndarray | None = None,
                       best_point_ids: np.ndarray | None = None) -> np.ndarray:
    """Best-map consistency check (§2.2 step 2, Eq. 2): keep an object mask iff max IoU with a best mask ≥ γ_O.

    Args:
        objects: (N, H, W) bool object-level masks (after ``mask_nms``).
        best: (M, H, W) bool best-level masks M_B of all points.
        gamma: γ_O = 0.6 (paper, Table 4).
        object_point_ids, best_point_ids: (N,) and (M,) int, the prompt point each mask came from. [ours] When both
            are given, a mask's match with its own point's best mask is ignored. Default None: self-matches count,
            the literal Eq. 2 (an object mask that is its point's most confident output then always passes).

    Returns:
        (N,) bool keep.
    """
    o = checked_masks("objects", objects)
    b = checked_masks("best", best, o.shape[1:])
    if len(o) == 0 or len(b) == 0:
        return np.zeros(len(o), dtype=bool)
    iou = mask_iou_matrix(o, b)
    if object_point_ids is not None and best_point_ids is not None:
        same = np.asarray(object_point_ids).reshape(-1, 1) == np.asarray(best_point_ids).reshape(1, -1)
        iou = np.where(same, 0.0, iou)
    return iou.max(axis=1) >= gamma


def superpixel_density(superpixels: np.ndarray, *, ref_area_px: float | None = None) -> np.ndarray:
    """Density map M_D (§2.3, Eq. 3): ``M_D(x) = Σ_k w_k 1_{S_k}(x)``, constant on each superpixel.

    The paper does not give w_k. [ours] ``w_k = a / (|S_k| + a)`` with a = ``ref_area_px``: Felzenszwalb makes small
    superpixels where the image is busy, so 1 / |S_k| is the local number of superpixels per pixel, and w_k is that
    density squashed into (0, 1), the range of the IoU thresholds it is compared with in Eq. 4. A superpixel of area
    a gets 0.5; one of a / 3 gets 0.75 (above N_t = 0.7, so adaptive NMS keeps more masks there). Default a: the
    median superpixel area, which makes the map independent of the image's resolution.

    Args:
        superpixels: (H, W) int superpixel labels (any values, e.g. ``skimage.segmentation.felzenszwalb``).
        ref_area_px: a > 0 in pixels, or None for the median superpixel area.

    Returns:
        (H, W) float64 in (0, 1).
    """
    sp = np.asarray(superpixels)
    if sp.ndim != 2 or not np.issubdtype(sp.dtype, np.integer):
        raise InputError(f"superpixels must be (H, W) int labels, got {sp.dtype} of shape {sp.shape}")
    _, inverse, counts = np.unique(sp, return_inverse=True, return_counts=True)
    a = float(np.median(counts)) if ref_area_px is None else float(ref_area_px)
    if a <= 0:
        raise InputError(f"ref_area_px must be > 0, got {ref_area_px}")
    return (a / (counts + a))[inverse.reshape(-1)].reshape(sp.shape)


def adaptive_nms(masks: np.ndarray, scores: np.ndarray, density: np.ndarray, *, base_thresh: float = 0.7,
                 reduce: Literal["mean", "max"] = "mean") -> np.ndarray:
    """Density-adaptive NMS of part / subpart masks (§2.3, Eq. 4; Adaptive NMS, Liu et al. [29]).

    The current top mask 𝓜 suppresses neighbours with IoU > ``N_𝓜 = max(N_t, M_D(𝓜))`` ([29]'s rule; strict ">" so
    that a density below N_t gives exactly ``mask_nms(iou_thresh=N_t)``).

    Args:
        masks: (N, H, W) bool. scores: (N,) float.
        density: (H, W) float map M_D (``superpixel_density``).
        base_thresh: N_t; not given by the paper. [ours] 0.7, SAM AMG's ``box_nms_thresh``.
        reduce: how M_D(𝓜) is read from the map. [ours] "mean" over the mask's pixels: the mask's whole region
            decides, so one tiny busy superpixel on its border cannot switch NMS off for a large smooth mask, as
            "max" would. An empty mask reads 0.

    Returns:
        (K,) int64 indices of kept masks by descending score.
    """
    m = checked_masks("masks", masks)
    s = checked_vector("scores", scores, len(m))
    d = np.asarray(density, dtype=np.float64)
    if d.shape != m.shape[1:]:
        raise InputError(f"density must be {m.shape[1:]}, got shape {d.shape}")
    if reduce not in ("mean", "max"):
        raise InputError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    flat = m.reshape(len(m), m.shape[1] * m.shape[2])
    area = flat.sum(axis=1)
    if reduce == "mean":
        dens = (flat.astype(np.float64) @ d.reshape(-1)) / np.maximum(area, 1)
    else:
        dens = np.where(flat, d.reshape(1, -1), -np.inf).max(axis=1, initial=-np.inf)
    dens = np.where(area > 0, dens, 0.0)
    return _greedy_nms(mask_iou_matrix(m, m), s, np.maximum(base_thresh, dens))
