"""Detection filtering: score threshold and non-maximum suppression on numpy boxes."""

from __future__ import annotations

import numpy as np

from omnilabel.ops.boxes import box_iou


def nms_xyxy(boxes_xyxy: np.ndarray, scores: np.ndarray, *, iou_thresh: float,
             labels: np.ndarray | None = None) -> np.ndarray:
    """Greedy non-maximum suppression.

    Args:
        boxes_xyxy: (N, 4) float.
        scores: (N,) float.
        iou_thresh: a box is dropped when its IoU with a kept, higher-scoring box exceeds this.
        labels: (N,) int; when given, boxes of different labels never suppress each other (class-wise NMS).

    Returns:
        (K,) int64 indices of kept boxes, by descending score (ties keep input order).
    """
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    if order.size == 0:
        return order.astype(np.int64)
    iou = box_iou(boxes, boxes)
    if labels is not None:
        lab = np.asarray(labels)
        iou = np.where(lab[:, None] == lab[None, :], iou, 0.0)
    suppressed = np.zeros(len(boxes), dtype=bool)
    keep = []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_thresh
    return np.asarray(keep, dtype=np.int64)


def filter_detections(boxes_xyxy: np.ndarray, scores: np.ndarray, labels: np.ndarray, *,
                      score_thresh: float, iou_thresh: float, class_wise: bool = True) -> np.ndarray:
    """Score threshold then NMS, the filtering of the none/tags settings (paper §4.1: 0.3 and 0.9).

    Returns:
        (K,) int64 indices into the inputs, by descending score.
    """
    s = np.asarray(scores, dtype=np.float64)
    above = np.flatnonzero(s >= score_thresh)
    kept = nms_xyxy(np.asarray(boxes_xyxy)[above], s[above], iou_thresh=iou_thresh,
                    labels=np.asarray(labels)[above] if class_wise else None)
    return above[kept]
