"""Stable-SAM's test prompts and stability score on hand-made boxes and masks."""

from __future__ import annotations

import numpy as np
import pytest

from omnilabel.ops.boxes import box_iou
from omnilabel.ops.stability import (
    PromptType,
    draw_prompts,
    instance_rng,
    noisy_boxes,
    random_points,
    stability_score,
)

BOX = np.array([40.0, 50.0, 80.0, 110.0])  # w 40, h 60, centre (60, 80)
HW = (200, 160)


def _cxcywh(b: np.ndarray) -> np.ndarray:
    return np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)


def test_noise_is_uniform_within_the_scaled_box_and_centred_on_it():
    """Far from the border (no clamping), each of cx, cy, w, h moves by U(-1, 1) x (w/2, h/2, w, h) x λ."""
    boxes = noisy_boxes(BOX, np.random.default_rng(0), 4000, scale=0.4, min_iou=None, image_hw=HW)
    delta = _cxcywh(boxes) - _cxcywh(BOX[None])
    bound = 0.4 * np.array([20.0, 30.0, 40.0, 60.0])
    assert boxes.shape == (4000, 4)
    assert (np.abs(delta) <= bound + 1e-9).all()
    # the noise reaches its bound (scale 0.4, not less) and is centred and flat (uniform: std = bound / √3)
    np.testing.assert_allclose(np.abs(delta).max(axis=0), bound, rtol=0.01)
    np.testing.assert_allclose(delta.mean(axis=0), 0.0, atol=0.03 * bound.max())
    np.testing.assert_allclose(delta.std(axis=0), bound / np.sqrt(3), rtol=0.05)


def test_the_iou_filter_keeps_only_boxes_close_enough_and_it_matters():
    rng = np.random.default_rng(1)
    free = box_iou(noisy_boxes(BOX, rng, 2000, scale=0.8, min_iou=None, image_hw=HW), BOX[None])[:, 0]
    kept = box_iou(noisy_boxes(BOX, rng, 2000, scale=0.8, min_iou=0.5, image_hw=HW), BOX[None])[:, 0]
    assert (free < 0.5).mean() > 0.2, "at scale 0.8 many raw draws fall below 0.5"
    assert (kept >= 0.5).all()


def test_boxes_at_the_border_stay_inside_the_image():
    corner = np.array([0.0, 0.0, 30.0, 20.0])
    boxes = noisy_boxes(corner, np.random.default_rng(2), 500, scale=0.4, min_iou=0.5, image_hw=(25, 35))
    assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= 35).all() and (boxes[:, [1, 3]] <= 25).all()
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    assert (box_iou(boxes, corner[None])[:, 0] >= 0.5).all()


def test_past_the_cap_a_box_keeps_its_best_draw():
    """An unreachable threshold: each box is the best of its ``max_tries`` draws; one try is the raw draw."""
    raw = noisy_boxes(BOX, np.random.default_rng(3), 200, min_iou=None, image_hw=HW)
    one_try = noisy_boxes(BOX, np.random.default_rng(3), 200, min_iou=0.999, image_hw=HW, max_tries=1)
    np.testing.assert_array_equal(one_try, raw)
    best = noisy_boxes(BOX, np.random.default_rng(3), 200, min_iou=0.999, image_hw=HW, max_tries=20)
    iou_raw, iou_best = (box_iou(b, BOX[None])[:, 0] for b in (raw, best))
    assert (iou_best >= iou_raw).all() and iou_best.mean() > iou_raw.mean() + 0.05
    assert len(best) == 200 and (iou_best < 0.999).all()


def test_the_same_generator_state_draws_the_same_boxes_and_bad_boxes_are_refused():
    a = noisy_boxes(BOX, np.random.default_rng(7), 20, image_hw=HW)
    np.testing.assert_array_equal(a, noisy_boxes(BOX, np.random.default_rng(7), 20, image_hw=HW))
    with pytest.raises(ValueError, match="x0 <= x1"):
        noisy_boxes(np.array([5.0, 0, 1, 4]), np.random.default_rng(0), 3, image_hw=HW)
    with pytest.raises(ValueError, match="scale >= 0"):
        noisy_boxes(BOX, np.random.default_rng(0), 3, scale=-0.1, image_hw=HW)
    with pytest.raises(ValueError, match="min_iou"):
        noisy_boxes(BOX, np.random.default_rng(0), 3, min_iou=1.5, image_hw=HW)


def _l_shape() -> np.ndarray:
    m = np.zeros((30, 40), dtype=bool)
    m[2:28, 3:8] = True  # the long arm
    m[23:28, 8:35] = True  # the foot
    return m


def test_clicks_are_pixel_centres_inside_the_mask_distinct_and_spread_over_it():
    mask = _l_shape()
    pts = random_points(mask, np.random.default_rng(0), 400, 5)
    assert pts.shape == (400, 5, 2)
    xs, ys = pts[..., 0], pts[..., 1]
    np.testing.assert_array_equal(xs % 1, 0.5)
    np.testing.assert_array_equal(ys % 1, 0.5)
    assert mask[ys.astype(int), xs.astype(int)].all()
    assert all(len({tuple(p) for p in prompt}) == 5 for prompt in pts), "clicks of one prompt repeat"
    # uniform over pixels: the foot holds 135 of the 265 pixels
    foot = (ys >= 23) & (xs >= 8)
    assert abs(foot.mean() - 135 / 265) < 0.03


def test_a_mask_smaller_than_k_repeats_clicks_and_an_empty_one_is_refused():
    mask = np.zeros((6, 6), dtype=bool)
    mask[2, 3] = mask[4, 1] = True
    pts = random_points(mask, np.random.default_rng(0), 3, 5)
    assert {(x, y) for x, y in pts.reshape(-1, 2)} <= {(3.5, 2.5), (1.5, 4.5)}
    with pytest.raises(ValueError, match="empty mask"):
        random_points(np.zeros((4, 4), dtype=bool), np.random.default_rng(0), 2, 1)


def _masks(*rects: tuple[int, int, int, int], hw: tuple[int, int] = (10, 10)) -> np.ndarray:
    out = np.zeros((len(rects), *hw), dtype=bool)
    for m, (y0, y1, x0, x1) in zip(out, rects, strict=True):
        m[y0:y1, x0:x1] = True
    return out


@pytest.mark.parametrize(("masks", "expected"), [
    (_masks((2, 6, 2, 6), (2, 6, 2, 6), (2, 6, 2, 6)), 1.0),          # identical
    (_masks((0, 10, 0, 5), (0, 10, 5, 10)), 0.5),                      # disjoint halves
    (_masks((0, 10, 0, 10), (0, 10, 0, 5)), 0.75),                     # whole and half: (1 + 0.5) / 2
    (_masks((0, 4, 0, 4), (0, 0, 0, 0)), 0.5),                         # one prompt found nothing
    (_masks((0, 0, 0, 0), (0, 0, 0, 0)), 1.0),                         # all empty: defined as 1
    (_masks((0, 2, 0, 2)), 1.0),                                       # one mask
    (_masks((0, 4, 0, 4), (0, 4, 2, 6), (0, 4, 4, 8)), 0.5),           # sliding: each 16 px of a 32-px union
])
def test_stability_score_on_hand_made_masks(masks, expected):
    assert stability_score(masks) == pytest.approx(expected)


def test_stability_score_needs_a_stack_of_masks():
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        stability_score(np.zeros((4, 4), dtype=bool))
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        stability_score(np.zeros((0, 4, 4), dtype=bool))


def test_each_prompt_type_draws_from_its_own_generator_of_the_instance():
    mask = _l_shape()
    shapes = {p: draw_prompts(mask, p, instance_rng(0, 7, 70, p), k=4).shape for p in PromptType}
    assert shapes == {PromptType.BOX: (1, 4), PromptType.NOISY_BOX: (4, 4), PromptType.POINT_1: (4, 1, 2),
                      PromptType.POINTS_3: (4, 3, 2), PromptType.POINTS_5: (4, 5, 2), PromptType.POINTS_10: (4, 10, 2)}
    np.testing.assert_array_equal(draw_prompts(mask, PromptType.BOX, instance_rng(0, 7, 70, PromptType.BOX), k=4),
                                  [[3.0, 2.0, 34.0, 27.0]])  # inclusive pixel indices, SAM's box convention

    def clicks(seed: int, image_id: int, ann_id: int) -> np.ndarray:
        return draw_prompts(mask, PromptType.POINTS_3, instance_rng(seed, image_id, ann_id, PromptType.POINTS_3), k=4)

    np.testing.assert_array_equal(clicks(0, 7, 70), clicks(0, 7, 70))
    for other in (clicks(1, 7, 70), clicks(0, 8, 70), clicks(0, 7, 71)):
        assert not np.array_equal(other, clicks(0, 7, 70))
    one = draw_prompts(mask, PromptType.POINT_1, instance_rng(0, 7, 70, PromptType.POINT_1), k=4)
    assert not np.array_equal(one[:, 0], clicks(0, 7, 70)[:, 0]), "two types share a generator"
    with pytest.raises(ValueError, match="empty mask"):
        draw_prompts(np.zeros((3, 3), dtype=bool), PromptType.BOX, instance_rng(0, 1, 1, PromptType.BOX), k=1)
