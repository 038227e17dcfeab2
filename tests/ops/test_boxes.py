from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from segment_anything.utils.amg import batched_mask_to_box

from omnilabel.ops.boxes import (
    box_iou,
    box_xywh_to_xyxy,
    box_xyxy_to_xywh,
    jitter_boxes_xyxy,
    masks_to_boxes_xyxy,
    masks_to_prompt_boxes_xyxy,
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


def random_masks(seed: int, n: int, h: int, w: int) -> np.ndarray:
    """(n, h, w) bool: random rectangles with random holes, every third mask empty, one full, one pixel."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        if i % 3 == 2:
            continue
        y0, y1 = np.sort(rng.integers(0, h + 1, 2))
        x0, x1 = np.sort(rng.integers(0, w + 1, 2))
        masks[i, y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) < 0.7
    masks[0] = True
    masks[1] = False
    masks[1, h - 1, w - 1] = True
    return masks


@pytest.mark.parametrize(("seed", "n", "h", "w"), [(0, 30, 17, 23), (1, 12, 1, 9), (2, 12, 40, 1), (3, 5, 64, 48)])
def test_prompt_boxes_are_segment_anythings(seed, n, h, w):
    masks = random_masks(seed, n, h, w)
    ours = masks_to_prompt_boxes_xyxy(masks)
    assert ours.shape == (n, 4) and ours.dtype == np.float64
    np.testing.assert_array_equal(ours, batched_mask_to_box(torch.as_tensor(masks)).numpy())


def test_prompt_boxes_table():
    m = np.zeros((3, 8, 9), dtype=bool)
    m[0, 3, 4] = True  # one pixel: [x, y, x, y]
    m[2, 1:5, 2:8] = True
    np.testing.assert_array_equal(masks_to_prompt_boxes_xyxy(m), [[4, 3, 4, 3], [0, 0, 0, 0], [2, 1, 7, 4]])
    assert masks_to_prompt_boxes_xyxy(np.zeros((0, 8, 9), dtype=bool)).shape == (0, 4)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        masks_to_prompt_boxes_xyxy(m[0])


def test_pixel_edge_boxes_are_cocos_bbox():
    masks = random_masks(4, 20, 19, 26)
    expected = np.array([box_xywh_to_xyxy(mask_utils.toBbox(mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))))
                         for m in masks])
    np.testing.assert_array_equal(masks_to_boxes_xyxy(masks), expected)
    nonempty = masks.any(axis=(1, 2))
    np.testing.assert_array_equal(masks_to_boxes_xyxy(masks)[nonempty],
                                  masks_to_prompt_boxes_xyxy(masks)[nonempty] + [0, 0, 1, 1])


def test_jitter_statistics_follow_sam():
    # 10 % of the side: std 5 px in x (w = 50), 3 px in y (h = 30), far below the 20 px limit
    n = 20_000
    boxes = np.tile([100.0, 200.0, 150.0, 230.0], (n, 1))
    moved = jitter_boxes_xyxy(boxes, np.random.default_rng(0)) - boxes
    np.testing.assert_allclose(moved.std(axis=0), [5, 3, 5, 3], rtol=0.03)
    np.testing.assert_allclose(moved.mean(axis=0), 0, atol=0.1)
    # coordinates move independently
    assert abs(np.corrcoef(moved[:, 0], moved[:, 2])[0, 1]) < 0.03


def test_jitter_never_moves_beyond_the_pixel_limit():
    boxes = np.tile([100.0, 100.0, 1100.0, 700.0], (5_000, 1))  # std 100 px and 60 px: the limit bites
    moved = jitter_boxes_xyxy(boxes, np.random.default_rng(1)) - boxes
    assert np.abs(moved).max() == 20.0
    assert (np.abs(moved) == 20.0).mean() > 0.5  # P(|N(0, 100)| > 20) = 0.84, P(|N(0, 60)| > 20) = 0.74
    small = jitter_boxes_xyxy(boxes, np.random.default_rng(1), max_px=5.0) - boxes
    assert np.abs(small).max() == 5.0


def test_jittered_boxes_are_ordered_inside_bounds_and_near():
    rng = np.random.default_rng(2)
    x0, y0 = rng.uniform(0, 90, 3_000), rng.uniform(0, 60, 3_000)
    boxes = np.stack([x0, y0, x0 + rng.uniform(0, 10, 3_000), y0 + rng.uniform(0, 4, 3_000)], axis=1)
    # noise of 100 % of the side crosses many boxes; the frame is 100 x 64
    out = jitter_boxes_xyxy(boxes, np.random.default_rng(3), std_frac=1.0, bounds_wh=(100.0, 64.0))
    assert (out[:, 0] <= out[:, 2]).all() and (out[:, 1] <= out[:, 3]).all()
    assert out.min() >= 0 and out[:, [0, 2]].max() <= 100.0 and out[:, [1, 3]].max() <= 64.0
    assert np.abs(out - boxes).max() <= 20.0 + 1e-9  # (x + 20) - x in floats
    raw = jitter_boxes_xyxy(boxes, np.random.default_rng(3), std_frac=1.0)
    assert (raw[:, 0] < 0).any() and (raw[:, 2] > 100).any()  # the bounds did clip
    unordered = boxes + np.clip(np.random.default_rng(3).standard_normal(boxes.shape)
                                * np.tile(boxes[:, 2:] - boxes[:, :2], 2), -20, 20)
    assert (unordered[:, 0] > unordered[:, 2]).any()  # so the re-ordering did work
    np.testing.assert_array_equal(raw[:, [0, 2]], np.sort(unordered[:, [0, 2]], axis=1))


def test_jitter_is_a_function_of_the_generator():
    boxes = np.array([[10.0, 10.0, 60.0, 40.0], [0.0, 0.0, 5.0, 5.0]])
    a = jitter_boxes_xyxy(boxes, np.random.default_rng([7, 3, 1]))
    np.testing.assert_array_equal(a, jitter_boxes_xyxy(boxes, np.random.default_rng([7, 3, 1])))
    assert not np.array_equal(a, jitter_boxes_xyxy(boxes, np.random.default_rng([7, 3, 2])))
    # it draws exactly N x 4 standard normals, so later draws of the same generator are predictable
    rng, ref = np.random.default_rng(5), np.random.default_rng(5)
    jitter_boxes_xyxy(boxes, rng)
    ref.standard_normal((2, 4))
    assert rng.random() == ref.random()
    one = jitter_boxes_xyxy(boxes[0], np.random.default_rng([7, 3, 1]))
    assert one.shape == (4,) and np.array_equal(one, a[0])
    np.testing.assert_array_equal(jitter_boxes_xyxy(boxes, np.random.default_rng(0), std_frac=0.0), boxes)
    point_box = np.array([[4.0, 4.0, 4.0, 4.0]])  # a one-pixel mask's box has no side: it stays
    np.testing.assert_array_equal(jitter_boxes_xyxy(point_box, np.random.default_rng(0)), point_box)


@pytest.mark.parametrize("kwargs", [{"std_frac": -0.1}, {"max_px": -1.0}, {"std_frac": float("nan")}])
def test_jitter_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError, match="std_frac"):
        jitter_boxes_xyxy(np.zeros((1, 4)), np.random.default_rng(0), **kwargs)
    with pytest.raises(ValueError, match="shape"):
        jitter_boxes_xyxy(np.zeros((1, 3)), np.random.default_rng(0))
