"""Box conversions, overlaps and jitter. Boxes are float arrays in pixels; ``xyxy`` is ``[x0, y0, x1, y1]``.

Two conventions for the box of a mask: pixel edges (COCO's ``bbox``: a one-pixel mask at (x, y) gives
``[x, y, x+1, y+1]``; :func:`masks_to_boxes_xyxy`, for output fields) and inclusive pixel indices (SAM's:
``[x, y, x, y]``; :func:`masks_to_prompt_boxes_xyxy`, for SAM prompts).
"""

from __future__ import annotations

import numpy as np


def box_xywh_to_xyxy(boxes_xywh: np.ndarray) -> np.ndarray:
    """COCO ``[x, y, w, h]`` to ``[x0, y0, x1, y1]``.

    Args:
        boxes_xywh: (N, 4) or (4,) float.

    Returns:
        Same shape, float64.
    """
    b = np.asarray(boxes_xywh, dtype=np.float64)
    out = b.copy()
    out[..., 2] = b[..., 0] + b[..., 2]
    out[..., 3] = b[..., 1] + b[..., 3]
    return out


def box_xyxy_to_xywh(boxes_xyxy: np.ndarray) -> np.ndarray:
    """``[x0, y0, x1, y1]`` to COCO ``[x, y, w, h]``; (N, 4) or (4,) float → same shape, float64."""
    b = np.asarray(boxes_xyxy, dtype=np.float64)
    out = b.copy()
    out[..., 2] = b[..., 2] - b[..., 0]
    out[..., 3] = b[..., 3] - b[..., 1]
    return out


def box_area(boxes_xyxy: np.ndarray) -> np.ndarray:
    """Areas of (N, 4) xyxy boxes → (N,) float64 (0 for degenerate boxes)."""
    b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def box_iou(boxes_a_xyxy: np.ndarray, boxes_b_xyxy: np.ndarray) -> np.ndarray:
    """Pairwise IoU.

    Args:
        boxes_a_xyxy: (N, 4) float.
        boxes_b_xyxy: (M, 4) float.

    Returns:
        (N, M) float64 in [0, 1]; 0 where both boxes are empty.
    """
    a = np.asarray(boxes_a_xyxy, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b_xyxy, dtype=np.float64).reshape(-1, 4)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def points_in_boxes(points_xy: np.ndarray, boxes_xyxy: np.ndarray) -> np.ndarray:
    """Whether each point lies inside each box (borders included).

    Args:
        points_xy: (M, 2) float pixel coordinates.
        boxes_xyxy: (N, 4) float.

    Returns:
        (N, M) bool.
    """
    p = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
    b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    inside_x = (p[None, :, 0] >= b[:, None, 0]) & (p[None, :, 0] <= b[:, None, 2])
    inside_y = (p[None, :, 1] >= b[:, None, 1]) & (p[None, :, 1] <= b[:, None, 3])
    return inside_x & inside_y


def masks_to_boxes_xyxy(masks: np.ndarray) -> np.ndarray:
    """Tight boxes of boolean masks, in pixel-edge coordinates (a one-pixel mask at (x, y) gives
    ``[x, y, x+1, y+1]``, matching COCO's bbox of an RLE). For SAM prompts use
    :func:`masks_to_prompt_boxes_xyxy`.

    Args:
        masks: (N, H, W) bool.

    Returns:
        (N, 4) float64; all zeros for an empty mask.

    Raises:
        ValueError: ``masks`` is not 3-D.
    """
    out, nonempty = _mask_extents(masks)
    out[nonempty, 2:] += 1.0
    return out


def masks_to_prompt_boxes_xyxy(masks: np.ndarray) -> np.ndarray:
    """Tight boxes of boolean masks in SAM's convention, inclusive pixel indices: a one-pixel mask at
    (x, y) gives ``[x, y, x, y]``, as ``segment_anything.utils.amg.batched_mask_to_box`` (SAM's prompt
    encoder adds 0.5 to move coordinates to pixel centres).

    Args:
        masks: (N, H, W) bool.

    Returns:
        (N, 4) float64, x in [0, W - 1] and y in [0, H - 1]; all zeros for an empty mask (as SAM's).

    Raises:
        ValueError: ``masks`` is not 3-D.
    """
    return _mask_extents(masks)[0]


def _mask_extents(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(boxes (N, 4) float64 of inclusive pixel indices, zeros where empty; nonempty (N,) bool)``."""
    m = np.asarray(masks, dtype=bool)
    if m.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {m.shape}")
    n, h, w = m.shape
    out = np.zeros((n, 4), dtype=np.float64)
    if m.size == 0:
        return out, np.zeros(n, dtype=bool)
    rows = m.any(axis=2)  # (N, H)
    cols = m.any(axis=1)  # (N, W)
    nonempty = rows.any(axis=1)
    # argmax finds the first True; on the reversed axis, the last one
    out[:, 0] = cols.argmax(axis=1)
    out[:, 1] = rows.argmax(axis=1)
    out[:, 2] = w - 1 - cols[:, ::-1].argmax(axis=1)
    out[:, 3] = h - 1 - rows[:, ::-1].argmax(axis=1)
    out[~nonempty] = 0.0
    return out, nonempty


def jitter_boxes_xyxy(boxes_xyxy: np.ndarray, rng: np.random.Generator, *, std_frac: float = 0.1,
                      max_px: float = 20.0, bounds_wh: tuple[float, float] | np.ndarray | None = None) -> np.ndarray:
    """Boxes with SAM's training noise (SAM paper, appendix "Training algorithm": noise of standard deviation
    10 % of the box sidelength, to a maximum of 20 pixels).

    Each x coordinate moves by N(0, (std_frac·w)²), each y coordinate by N(0, (std_frac·h)²), the move
    clipped to ±``max_px``; then each box is re-ordered (x0 ≤ x1, y0 ≤ y1) and clipped to ``bounds_wh``.
    Every coordinate stays within ``max_px`` of where it was (when the input lies inside the bounds).

    Args:
        boxes_xyxy: (N, 4) or (4,) float, x0 ≤ x1 and y0 ≤ y1, in the frame the pixel limit is meant in.
        rng: the source of the draws: exactly N x 4 standard normals, in row-major order.
        std_frac: noise std as a fraction of the box's width (x) or height (y), >= 0.
        max_px: largest move of a coordinate, in pixels, >= 0.
        bounds_wh: (W, H): clip x to [0, W] and y to [0, H]; None: no clipping.

    Returns:
        Same shape as ``boxes_xyxy``, float64.

    Raises:
        ValueError: a box that is not 4 numbers, or a negative ``std_frac`` or ``max_px``.
    """
    b = np.asarray(boxes_xyxy, dtype=np.float64)
    if b.shape[-1:] != (4,) or b.ndim > 2:
        raise ValueError(f"boxes_xyxy must be (N, 4) or (4,), got shape {b.shape}")
    if not (std_frac >= 0 and max_px >= 0):
        raise ValueError(f"need std_frac >= 0 and max_px >= 0, got {std_frac}, {max_px}")
    flat = b.reshape(-1, 4)
    side = np.clip(flat[:, 2:] - flat[:, :2], 0.0, None)  # (N, 2): w, h
    std = std_frac * np.concatenate([side, side], axis=1)
    noise = np.clip(rng.standard_normal(flat.shape) * std, -max_px, max_px)
    moved = flat + noise
    out = np.concatenate([np.minimum(moved[:, :2], moved[:, 2:]), np.maximum(moved[:, :2], moved[:, 2:])], axis=1)
    if bounds_wh is not None:
        bw, bh = (float(v) for v in np.asarray(bounds_wh, dtype=np.float64).reshape(2))
        out = np.clip(out, 0.0, [bw, bh, bw, bh])
    return out.reshape(b.shape)
