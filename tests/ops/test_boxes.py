from __future__ import annotations

import numpy as np
import pytest

from omnilabel.ops.boxes import (
    box_iou,
    box_xywh_to_xyxy,
    box_xyxy_to_xywh,
    masks_to_boxes_xyxy,
    points_in_boxes,
)


def test_xywh_xyxy_roundtrip():
    b = np.array([[1.0, 2.0, 3.0, 4.0], [0, 0, 10, 5]])
    np.testing.assert_array_equal(box_xywh_to_xyxy(b), [[1, 2, 4, 6], [0, 0, 10, 5]])
    np.testing.assert_array_equal(box_xyxy_to_xywh(box_xywh_to_xyxy(b)), b)


@pytest.mark.parametrize(
    ("a", "b", "iou"),
    [
        ([0, 0, 2, 2], [0, 0, 2, 2], 1.0),
        ([0, 0, 2, 2], [1, 0, 3, 2], 2 / 6),
        ([0, 0, 2, 2], [2, 2, 4, 4], 0.0),
        ([0, 0, 0, 0], [0, 0, 0, 0], 0.0),
    ],
)
def test_box_iou_table(a, b, iou):
    assert box_iou(np.array([a]), np.array([b]))[0, 0] == pytest.approx(iou)


def test_points_in_boxes_border_inclusive():
    boxes = np.array([[0, 0, 10, 10], [5, 5, 6, 6]])
    pts = np.array([[10, 10], [5.5, 5.5], [11, 0]])
    np.testing.assert_array_equal(points_in_boxes(pts, boxes), [[True, True, False], [False, True, False]])


def test_masks_to_boxes_matches_pixel_edges():
    m = np.zeros((2, 8, 9), dtype=bool)
    m[0, 3, 4] = True
    np.testing.assert_array_equal(masks_to_boxes_xyxy(m), [[4, 3, 5, 4], [0, 0, 0, 0]])
