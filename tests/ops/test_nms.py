from __future__ import annotations

import numpy as np

from omnilabel.ops.boxes import box_iou
from omnilabel.ops.nms import filter_detections, nms_xyxy


def test_nms_drops_overlapping_lower_score():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 9.5], [20, 20, 30, 30]], dtype=float)
    keep = nms_xyxy(boxes, np.array([0.5, 0.9, 0.4]), iou_thresh=0.9)
    assert keep.tolist() == [1, 2]


def test_classwise_nms_keeps_other_classes():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], dtype=float)
    assert nms_xyxy(boxes, np.array([0.5, 0.6]), iou_thresh=0.5, labels=np.array([1, 2])).tolist() == [1, 0]
    assert nms_xyxy(boxes, np.array([0.5, 0.6]), iou_thresh=0.5).tolist() == [1]


def test_filter_detections_random_invariants():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, (40, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 30, (40, 2))], axis=1)
    scores = rng.uniform(0, 1, 40)
    labels = rng.integers(0, 3, 40)
    keep = filter_detections(boxes, scores, labels, score_thresh=0.3, iou_thresh=0.5)
    assert (scores[keep] >= 0.3).all()
    assert np.all(np.diff(scores[keep]) <= 0)
    iou = box_iou(boxes[keep], boxes[keep])
    same = labels[keep][:, None] == labels[keep][None, :]
    np.fill_diagonal(iou, 0)
    assert not ((iou > 0.5) & same).any()
    # every dropped box above the threshold is explained by a kept box of its class
    for i in set(np.flatnonzero(scores >= 0.3)) - set(keep.tolist()):
        blockers = keep[(labels[keep] == labels[i]) & (scores[keep] >= scores[i])]
        assert (box_iou(boxes[[i]], boxes[blockers]) > 0.5).any()
