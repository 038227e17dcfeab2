"""The pure heatmap steps of UOIS-SAM's Heatmap-based Prompt Generator (HPG), spec §3.2–3.4.

Training targets (§3.2): each visible instance gives one keypoint, the centroid of its visible mask from image
moments; a Gaussian is splatted at each keypoint and overlapping Gaussians merge by element-wise max
(CenterNet). The foreground target is the union of the masks. The foreground loss (§3.3) is UOIS-Net's
class-balanced cross-entropy. At inference (§3.4) the heatmap, masked by the predicted foreground, is reduced
to its local maxima (3×3 max-pool), thresholded, and the top K become SAM point prompts, mapped back from the
HPG input resolution to the image.

Conventions, used by every function here:

- Points are ``(x, y)`` in pixel-index coordinates: pixel (row r, column c) has ``x = c``, ``y = r``; its
  centre is the integer point. A point at ``x = -0.5`` lies on the left edge of the image.
- Resizing maps pixel centres to pixel centres of the continuous image (the ``align_corners=False``
  convention of ``cv2.resize`` and ``torch.nn.functional.interpolate``): ``x' = (x + 0.5) * W'/W - 0.5``.

Nothing here loads a model or touches the file system.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from omnilabel.errors import InputError

__all__ = [
    "centroid_heatmap",
    "class_balanced_ce",
    "heatmap_peaks",
    "heatmap_targets",
    "instance_centroids_xy",
    "scale_points_xy",
]


def _as_numpy(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _as_float(a: Any) -> np.ndarray:
    """A float array in the input's precision (float16/32/64 kept; anything else becomes float64)."""
    arr = _as_numpy(a)
    return arr if np.issubdtype(arr.dtype, np.floating) else arr.astype(np.float64)


def _size_hw(size_hw: Sequence[int], name: str) -> tuple[int, int]:
    if len(size_hw) != 2 or any(int(s) != s or s < 1 for s in size_hw):
        raise InputError(f"{name} must be two positive integers (H, W), got {tuple(size_hw)}")
    return int(size_hw[0]), int(size_hw[1])


def _points_xy(a: Any, name: str, rows: str) -> np.ndarray:
    """``a`` as (``rows``, 2) float64 xy (an empty input as (0, 2)); InputError naming ``name`` otherwise."""
    p = _as_numpy(a).astype(np.float64)
    if p.size == 0:
        p = p.reshape(0, 2)
    if p.ndim != 2 or p.shape[1] != 2:
        raise InputError(f"{name} must be ({rows}, 2), got shape {p.shape}")
    return p


def instance_centroids_xy(masks: np.ndarray) -> np.ndarray:
    """Centroid of each visible mask from its image moments, spec §3.2: ``(m10/m00, m01/m00)``.

    Equal to ``cv2.moments`` on the binary mask: the mean column and mean row of its pixels.

    Args:
        masks: (N, H, W) bool visible masks (numpy, or a torch tensor).

    Returns:
        (N, 2) float64 ``(x, y)`` in pixel-index coordinates (x = column, y = row), in
        ``[0, W-1] × [0, H-1]``; a row of NaN for an empty mask.

    Raises:
        InputError: ``masks`` is not 3-D.
    """
    m = _as_numpy(masks)
    if m.ndim != 3:
        raise InputError(f"masks must be (N, H, W), got shape {m.shape}")
    m = m.astype(bool)
    m00 = m.sum(axis=(1, 2), dtype=np.float64)
    m10 = m.sum(axis=1, dtype=np.float64) @ np.arange(m.shape[2], dtype=np.float64)  # Σ x over the pixels
    m01 = m.sum(axis=2, dtype=np.float64) @ np.arange(m.shape[1], dtype=np.float64)  # Σ y over the pixels
    out = np.full((len(m), 2), np.nan)
    seen = m00 > 0
    out[seen, 0] = m10[seen] / m00[seen]
    out[seen, 1] = m01[seen] / m00[seen]
    return out


def centroid_heatmap(centroids_xy: np.ndarray, size_hw: Sequence[int], *, sigma_px: float) -> np.ndarray:
    """The ground-truth centroid heatmap, spec §3.2 Eq. 1, merged by element-wise max as in CenterNet.

    ``H_p = max_i exp(-((x_p - μx_i)² + (y_p - μy_i)²) / (2σ²))`` over every pixel ``p`` (no truncation).

    Args:
        centroids_xy: (N, 2) float ``(x, y)`` keypoints in pixel-index coordinates; rows with NaN (empty masks)
            are skipped. Keypoints may lie outside the image; their tails still count.
        size_hw: ``(H, W)`` of the map.
        sigma_px: Gaussian σ in pixels, > 0. The paper does not give it (spec A2: "a few pixels at 336×448").

    Returns:
        (H, W) float32 in [0, 1]: 1 exactly at a keypoint that falls on a pixel centre; all zeros when N = 0
        or every keypoint is NaN.

    Raises:
        InputError: bad shapes, size or σ.
    """
    height, width = _size_hw(size_hw, "size_hw")
    c = _points_xy(centroids_xy, "centroids_xy", "N")
    if not np.isfinite(sigma_px) or sigma_px <= 0:
        raise InputError(f"sigma_px must be a positive number, got {sigma_px}")
    heat = np.zeros((height, width), dtype=np.float64)
    xs = np.arange(width, dtype=np.float64)
    ys = np.arange(height, dtype=np.float64)
    inv = 1.0 / (2.0 * sigma_px * sigma_px)
    for cx, cy in c[np.isfinite(c).all(axis=1)]:
        # The 2-D Gaussian is separable: exp(-(dx² + dy²)k) = exp(-dy²k) ⊗ exp(-dx²k).
        np.maximum(heat, np.outer(np.exp(-((ys - cy) ** 2) * inv), np.exp(-((xs - cx) ** 2) * inv)), out=heat)
    return heat.astype(np.float32)


def heatmap_targets(masks: np.ndarray, *, sigma_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Both HPG training targets of one image (spec §3.2–3.3).

    Args:
        masks: (N, H, W) bool visible instance masks; N may be 0.
        sigma_px: Gaussian σ in pixels, > 0 (see :func:`centroid_heatmap`).

    Returns:
        ``(fg, heatmap)``: fg (H, W) bool, the union of the masks (the foreground class of the CE loss);
        heatmap (H, W) float32 in [0, 1], the max-merged Gaussians at the mask centroids.

    Raises:
        InputError: ``masks`` is not 3-D, or a bad σ.
    """
    m = _as_numpy(masks)
    if m.ndim != 3:
        raise InputError(f"masks must be (N, H, W), got shape {m.shape}")
    m = m.astype(bool)
    fg = m.any(axis=0)
    return fg, centroid_heatmap(instance_centroids_xy(m), m.shape[1:], sigma_px=sigma_px)


def class_balanced_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class-balanced cross-entropy of the foreground head, spec §3.3 Eq. 3, as UOIS-Net's ``CELossWeighted``.

    For each image b and each class c present in it, every pixel of class c gets the weight
    ``w = 1 / #pixels(c in b)``; ``loss = Σ_p w_p · CE_p / Σ_p w_p`` over the whole batch (the weights are
    normalised to sum 1 over the batch, not per image — the reference code's reading). A class absent from
    an image has no pixels and so contributes nothing. The weights depend on the target only: the gradient
    flows through the CE terms.

    Args:
        logits: (B, C, H, W) float logits (C = 2: background, foreground; any C >= 2 works).
        target: (B, H, W) int64 class indices in ``[0, C)``.

    Returns:
        Scalar float tensor, >= 0, differentiable with respect to ``logits``.

    Raises:
        InputError: mismatched shapes, an empty batch, or a class index out of range.
    """
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise InputError(f"logits must be (B, C, H, W) and target (B, H, W); got {tuple(logits.shape)} "
                         f"and {tuple(target.shape)}")
    n_classes = logits.shape[1]
    if target.numel() == 0 or n_classes < 2:
        raise InputError(f"need a non-empty batch and at least 2 classes, got logits {tuple(logits.shape)}")
    target = target.long()
    if int(target.min()) < 0 or int(target.max()) >= n_classes:
        raise InputError(f"target values must be in [0, {n_classes}), got [{int(target.min())}, "
                         f"{int(target.max())}]")
    ce = F.cross_entropy(logits, target, reduction="none")  # (B, H, W)
    flat = target.reshape(target.shape[0], -1)
    counts = F.one_hot(flat, n_classes).sum(dim=1)  # (B, C) pixels of each class in each image
    inv = 1.0 / counts.clamp(min=1).to(ce.dtype)  # an absent class has no pixel to read this weight
    weights = torch.gather(inv, 1, flat).reshape(target.shape)
    return (ce * weights).sum() / weights.sum()


def _max_pool(values: np.ndarray, pool_px: int) -> np.ndarray:
    """``pool_px × pool_px`` max filter, stride 1, ``-inf`` padding (so edges compare with the image only)."""
    r = pool_px // 2
    padded = np.pad(values, r, mode="constant", constant_values=-np.inf)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (pool_px, pool_px))
    return windows.max(axis=(-2, -1))


def _one_pixel_per_plateau(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int],
                           radius: int) -> np.ndarray:
    """Indices into ``rows``/``cols`` of one representative per group of linked candidates.

    Two candidates are linked when they lie within each other's pooling window (Chebyshev distance <=
    ``radius``): both being the max of a window that holds the other, they are equal, i.e. one plateau. A
    group's representative is its pixel nearest the group's mean position, ties going to the first pixel
    in raster order.
    """
    k = len(rows)
    index = np.full(shape, -1, dtype=np.int64)
    index[rows, cols] = np.arange(k)
    src: list[np.ndarray] = []
    dst: list[np.ndarray] = []
    for dy in range(0, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy == 0 and dx <= 0:
                continue  # each unordered offset once
            r2, c2 = rows + dy, cols + dx
            ok = (r2 < shape[0]) & (c2 >= 0) & (c2 < shape[1])
            other = np.full(k, -1, dtype=np.int64)
            other[ok] = index[r2[ok], c2[ok]]
            linked = other >= 0
            src.append(np.flatnonzero(linked))
            dst.append(other[linked])
    s, d = np.concatenate(src), np.concatenate(dst)
    graph = coo_matrix((np.ones(len(s), dtype=np.int8), (s, d)), shape=(k, k))
    n_groups, labels = connected_components(graph, directed=False)
    sizes = np.bincount(labels, minlength=n_groups).astype(np.float64)
    mean_r = np.bincount(labels, weights=rows, minlength=n_groups) / sizes
    mean_c = np.bincount(labels, weights=cols, minlength=n_groups) / sizes
    dist = (rows - mean_r[labels]) ** 2 + (cols - mean_c[labels]) ** 2
    raster = rows * shape[1] + cols
    order = np.lexsort((raster, dist, labels))
    _, first = np.unique(labels[order], return_index=True)
    return order[first]


def heatmap_peaks(fg_prob: np.ndarray, heatmap: np.ndarray, *, fg_thresh: float = 0.85,
                  peak_thresh: float = 0.007, max_peaks: int = 30,
                  pool_px: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Point prompts from the predicted heatmap, spec §3.4 steps 1–4 (CenterNet-style max-pool NMS).

    1. Foreground: ``fg_prob > fg_thresh``. The heatmap is masked by it *before* the max-pool (spec A5's
       suggested order): background pixels become ``-inf``, so they neither yield peaks nor suppress a
       foreground peak next to a brighter background value. The price of this order: where the foreground
       cuts through a bump whose summit lies outside it, the foreground pixel nearest the summit becomes a
       local maximum; it survives only when its value exceeds ``peak_thresh``.
    2. A peak is a foreground pixel equal to the ``pool_px × pool_px`` max around it and ``> peak_thresh``.
    3. Plateaus: linked peaks (within each other's pooling window, hence of equal value) form one plateau
       and give ONE peak — the plateau pixel nearest its mean position, ties to the first in raster order.
    4. The ``max_peaks`` highest by heatmap value are kept, sorted by value descending; equal values go in
       raster order (row, then column) of their pixels.

    Args:
        fg_prob: (H, W) float foreground probability in [0, 1] (softmax of the fg head, spec A4).
        heatmap: (H, W) float predicted centroid heatmap, nominally in [0, 1].
        fg_thresh: §3.4 step 1: 0.85.
        peak_thresh: §3.4 step 3: 0.007.
        max_peaks: §3.4 step 3: K = 30.
        pool_px: §3.4 step 2: 3 (a 3×3 max-pool); odd, >= 1.

    Returns:
        ``(points_xy, scores)``: (K, 2) float64 integer-valued ``(x = column, y = row)`` pixel coordinates of
        the map, and (K,) float32 heatmap values at them, K <= max_peaks; (0, 2) and (0,) when none.

    Raises:
        InputError: the maps differ in shape or are not 2-D, or a bad ``pool_px``/``max_peaks``.
    """
    fg, heat = _as_float(fg_prob), _as_float(heatmap)
    if heat.ndim != 2 or fg.shape != heat.shape:
        raise InputError(f"fg_prob and heatmap must be the same (H, W), got {fg.shape} and {heat.shape}")
    if pool_px < 1 or pool_px % 2 == 0:
        raise InputError(f"pool_px must be odd and >= 1, got {pool_px}")
    if max_peaks < 0:
        raise InputError(f"max_peaks must be >= 0, got {max_peaks}")
    empty = (np.zeros((0, 2), dtype=np.float64), np.zeros(0, dtype=np.float32))
    # Thresholds in the maps' own precision: a float32 0.007 is not above the threshold 0.007.
    inside = fg > fg.dtype.type(fg_thresh)
    masked = np.where(inside, heat, -np.inf).astype(heat.dtype)
    is_peak = inside & (masked == _max_pool(masked, pool_px)) & (masked > heat.dtype.type(peak_thresh))
    rows, cols = np.nonzero(is_peak)  # raster order
    if len(rows) == 0 or max_peaks == 0:
        return empty
    keep = _one_pixel_per_plateau(rows, cols, heat.shape, pool_px // 2)
    rows, cols = rows[keep], cols[keep]
    values = heat[rows, cols]
    order = np.lexsort((rows * heat.shape[1] + cols, -values))[:max_peaks]
    points = np.stack([cols[order], rows[order]], axis=1).astype(np.float64)
    return points, values[order].astype(np.float32)


def scale_points_xy(points_xy: np.ndarray, from_hw: Sequence[int], to_hw: Sequence[int]) -> np.ndarray:
    """Map points between two resolutions of one image, spec §3.4 step 5 (336×448 → the original size).

    Pixel centres map to pixel centres of the continuous image: ``x' = (x + 0.5) · W_to / W_from - 0.5`` and
    likewise y with the heights (``align_corners=False``, as ``cv2.resize`` and ``F.interpolate`` resample).
    The map is affine per axis, so ``scale_points_xy(scale_points_xy(p, a, b), b, a) == p`` up to rounding.

    Args:
        points_xy: (K, 2) float ``(x, y)`` in pixel-index coordinates of an image of size ``from_hw``.
        from_hw: ``(H, W)`` the points are in.
        to_hw: ``(H, W)`` to map them to.

    Returns:
        (K, 2) float64 ``(x, y)`` in pixel-index coordinates of ``to_hw``.

    Raises:
        InputError: ``points_xy`` is not (K, 2), or a bad size.
    """
    fh, fw = _size_hw(from_hw, "from_hw")
    th, tw = _size_hw(to_hw, "to_hw")
    p = _points_xy(points_xy, "points_xy", "K")
    scale = np.array([tw / fw, th / fh])
    return (p + 0.5) * scale - 0.5
