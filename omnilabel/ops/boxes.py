"""Box conversions and overlaps. Boxes are float arrays in pixels; ``xyxy`` is ``[x0, y0, x1, y1]``."""

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
    ``[x, y, x+1, y+1]``, matching COCO's bbox of an RLE).

    Args:
        masks: (N, H, W) bool.

    Returns:
        (N, 4) float64; all zeros for an empty mask.
    """
    m = np.asarray(masks, dtype=bool)
    n = m.shape[0]
    out = np.zeros((n, 4), dtype=np.float64)
    if n == 0:
        return out
    rows = m.any(axis=2)
    cols = m.any(axis=1)
    for i in range(n):
        ys = np.flatnonzero(rows[i])
        xs = np.flatnonzero(cols[i])
        if ys.size == 0:
            continue
        out[i] = [xs[0], ys[0], xs[-1] + 1, ys[-1] + 1]
    return out
