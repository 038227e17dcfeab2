from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from omnilabel.errors import InputError
from omnilabel.ops.heatmap import (
    centroid_heatmap,
    class_balanced_ce,
    heatmap_peaks,
    heatmap_targets,
    instance_centroids_xy,
    scale_points_xy,
)

# --- instance_centroids_xy (§3.2: image moments) -------------------------------------------------------------


def _mask(shape: tuple[int, int], pixels_rc: list[tuple[int, int]]) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    for r, c in pixels_rc:
        m[r, c] = True
    return m


SQUARE = [(r, c) for r in range(2, 6) for c in range(3, 7)]  # rows 2..5, cols 3..6 -> x = 4.5, y = 3.5
#   col: 0 1 2 3
#   r1   . M . .
#   r2   . M . .
#   r3   . M M M      x = (1+1+1+2+3)/5 = 1.6, y = (1+2+3+3+3)/5 = 2.4
L_SHAPE = [(1, 1), (2, 1), (3, 1), (3, 2), (3, 3)]


@pytest.mark.parametrize(("pixels", "expected_xy"), [
    (SQUARE, (4.5, 3.5)),
    (L_SHAPE, (1.6, 2.4)),
    ([(7, 0)], (0.0, 7.0)),
])
def test_centroid_by_hand_and_as_cv2_moments(pixels, expected_xy):
    mask = _mask((8, 9), pixels)
    xy = instance_centroids_xy(mask[None])
    assert xy.dtype == np.float64 and xy.shape == (1, 2)
    np.testing.assert_allclose(xy[0], expected_xy, atol=1e-12)
    mom = cv2.moments(mask.astype(np.uint8), binaryImage=True)
    np.testing.assert_allclose(xy[0], (mom["m10"] / mom["m00"], mom["m01"] / mom["m00"]), atol=1e-9)


def test_empty_mask_gives_a_nan_row_and_others_are_unaffected():
    masks = np.stack([_mask((8, 9), SQUARE), np.zeros((8, 9), bool), _mask((8, 9), L_SHAPE)])
    xy = instance_centroids_xy(masks)
    np.testing.assert_allclose(xy[[0, 2]], [[4.5, 3.5], [1.6, 2.4]], atol=1e-12)
    assert np.isnan(xy[1]).all()
    assert instance_centroids_xy(np.zeros((0, 4, 5), bool)).shape == (0, 2)
    with pytest.raises(InputError, match="N, H, W"):
        instance_centroids_xy(np.zeros((4, 5), bool))


# --- centroid_heatmap (§3.2 Eq. 1, max merge) -------------------------------------------------------------------


def test_heatmap_is_one_at_the_centroid_and_exp_minus_half_at_sigma():
    sigma = 3.0
    heat = centroid_heatmap(np.array([[5.0, 7.0]]), (16, 20), sigma_px=sigma)
    assert heat.dtype == np.float32 and heat.shape == (16, 20)
    assert heat[7, 5] == 1.0 and np.unravel_index(heat.argmax(), heat.shape) == (7, 5)
    for r, c in [(7, 8), (7, 2), (10, 5), (4, 5)]:  # distance σ along each axis
        assert heat[r, c] == pytest.approx(math.exp(-0.5), abs=1e-6)
    assert heat[10, 8] == pytest.approx(math.exp(-1.0), abs=1e-6)  # distance σ·√2
    assert heat.min() >= 0.0 and heat.max() <= 1.0


def test_overlapping_gaussians_merge_by_max_not_sum():
    a, b = np.array([[10.0, 10.0]]), np.array([[14.0, 10.0]])
    both = centroid_heatmap(np.concatenate([a, b]), (24, 24), sigma_px=3.0)
    np.testing.assert_array_equal(both, np.maximum(centroid_heatmap(a, (24, 24), sigma_px=3.0),
                                                   centroid_heatmap(b, (24, 24), sigma_px=3.0)))
    assert both[10, 12] == pytest.approx(math.exp(-4.0 / 18.0), abs=1e-6)  # the max of two equal tails
    assert both.max() == 1.0


def test_heatmap_skips_nan_and_is_zero_without_centroids():
    np.testing.assert_array_equal(centroid_heatmap(np.zeros((0, 2)), (5, 6), sigma_px=2.0), np.zeros((5, 6)))
    with_nan = centroid_heatmap(np.array([[np.nan, np.nan], [2.0, 3.0]]), (5, 6), sigma_px=2.0)
    np.testing.assert_array_equal(with_nan, centroid_heatmap(np.array([[2.0, 3.0]]), (5, 6), sigma_px=2.0))
    with pytest.raises(InputError, match="sigma_px"):
        centroid_heatmap(np.zeros((1, 2)), (5, 6), sigma_px=0.0)
    with pytest.raises(InputError, match=r"\(N, 2\)"):
        centroid_heatmap(np.zeros((1, 3)), (5, 6), sigma_px=1.0)


def test_heatmap_targets_union_and_centroid_peaks():
    masks = np.stack([_mask((10, 12), SQUARE), _mask((10, 12), [(8, 10), (8, 11)])])
    fg, heat = heatmap_targets(masks, sigma_px=1.5)
    assert fg.dtype == bool and fg.sum() == 16 + 2 and fg[8, 10] and not fg[0, 0]
    assert heat.dtype == np.float32 and heat.shape == (10, 12)
    assert heat[8, 10] == pytest.approx(math.exp(-0.25 / 4.5), abs=1e-6)  # centroid (10.5, 8), 0.5 px away
    fg0, heat0 = heatmap_targets(np.zeros((0, 10, 12), bool), sigma_px=1.5)
    assert not fg0.any() and not heat0.any() and fg0.shape == heat0.shape == (10, 12)


# --- class_balanced_ce (§3.3, UOIS-Net CELossWeighted) -------------------------------------------------------


def _ce(logit_bg: float, logit_fg: float, label: int) -> float:
    logits = (logit_bg, logit_fg)
    return -(logits[label] - math.log(math.exp(logit_bg) + math.exp(logit_fg)))


def test_class_balanced_ce_by_hand_on_a_2x2_image():
    ln3 = math.log(3.0)
    # pixel (bg, fg) logits and labels: one foreground pixel, three background pixels
    pix = [((0.0, 0.0), 1), ((0.0, ln3), 0), ((ln3, 0.0), 0), ((0.0, 0.0), 0)]
    logits = torch.tensor([[[p[0][0] for p in pix], [p[0][1] for p in pix]]], dtype=torch.float64).reshape(1, 2, 2, 2)
    target = torch.tensor([p[1] for p in pix]).reshape(1, 2, 2)
    ce = [_ce(*lg, lab) for lg, lab in pix]  # ln2, ln4, ln(4/3), ln2
    # weights: fg 1/1, bg 1/3 each; Σw = 2
    expected = (ce[0] * 1.0 + (ce[1] + ce[2] + ce[3]) / 3.0) / 2.0
    loss = class_balanced_ce(logits, target)
    assert loss.ndim == 0 and loss.item() == pytest.approx(expected, abs=1e-12)
    # a second, all-background image adds weight 4 × 1/4 = 1 (batch normalisation, not per image)
    logits2 = torch.cat([logits, torch.zeros(1, 2, 2, 2, dtype=torch.float64)])
    logits2[1, 0] = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    target2 = torch.cat([target, torch.zeros(1, 2, 2, dtype=torch.long)])
    img2 = sum(_ce(v, 0.0, 0) for v in (1.0, 2.0, 0.0, -1.0)) / 4.0
    expected2 = (ce[0] + (ce[1] + ce[2] + ce[3]) / 3.0 + img2) / 3.0
    assert class_balanced_ce(logits2, target2).item() == pytest.approx(expected2, abs=1e-12)


def test_class_balanced_ce_on_a_balanced_image_is_the_plain_mean_and_is_differentiable():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 2, 4, 6, generator=gen, requires_grad=True)
    target = torch.zeros(1, 4, 6, dtype=torch.long)
    target[0, :, :3] = 1  # 12 foreground, 12 background pixels
    loss = class_balanced_ce(logits, target)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target))
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_class_balanced_ce_rejects_bad_inputs():
    with pytest.raises(InputError, match="target values"):
        class_balanced_ce(torch.zeros(1, 2, 2, 2), torch.full((1, 2, 2), 2))
    with pytest.raises(InputError, match="B, C, H, W"):
        class_balanced_ce(torch.zeros(1, 2, 2, 2), torch.zeros(1, 3, 2, dtype=torch.long))


# --- heatmap_peaks (§3.4) ------------------------------------------------------------------------------------


def _ones(shape: tuple[int, int]) -> np.ndarray:
    return np.ones(shape, dtype=np.float32)


def test_two_separated_gaussians_give_two_peaks_at_their_centres():
    heat = centroid_heatmap(np.array([[30.0, 20.0], [10.0, 8.0]]), (32, 48), sigma_px=3.0)
    points, scores = heatmap_peaks(_ones(heat.shape), heat)
    assert points.dtype == np.float64 and scores.dtype == np.float32
    # equal values (1.0): raster order, so (10, 8) on row 8 comes first
    np.testing.assert_array_equal(points, [[10.0, 8.0], [30.0, 20.0]])
    np.testing.assert_array_equal(scores, [1.0, 1.0])


def test_a_peak_outside_the_foreground_is_dropped():
    heat = centroid_heatmap(np.array([[10.0, 8.0], [30.0, 20.0]]), (32, 48), sigma_px=3.0)
    fg = _ones(heat.shape)
    fg[10:, 19:] = 0.5  # the peak at (30, 20) lies where fg_prob <= 0.85
    points, _ = heatmap_peaks(fg, heat)
    np.testing.assert_array_equal(points, [[10.0, 8.0]])
    # Masking comes before the pool: where the foreground cuts a bump near its summit, the cut edge holds a
    # local maximum of the masked map, kept when it clears the threshold (documented in heatmap_peaks).
    fg[:] = 1.0
    fg[:, 28:] = 0.0
    points, scores = heatmap_peaks(fg, heat)
    np.testing.assert_array_equal(points, [[10.0, 8.0], [27.0, 20.0]])
    assert scores[1] == pytest.approx(math.exp(-9.0 / 18.0), abs=1e-6)


def test_masking_comes_before_the_pool_so_a_brighter_background_pixel_does_not_suppress():
    heat = np.zeros((9, 9), np.float32)
    heat[4, 4], heat[4, 5] = 0.5, 0.9
    fg = np.zeros((9, 9), np.float32)
    fg[:, :5] = 1.0  # column 5 is background
    points, scores = heatmap_peaks(fg, heat)
    np.testing.assert_array_equal(points, [[4.0, 4.0]])
    assert scores[0] == pytest.approx(0.5)


def test_peaks_at_or_below_the_threshold_are_dropped():
    heat = np.zeros((9, 9), np.float32)
    heat[2, 2], heat[6, 6], heat[2, 6] = 0.007, 0.006, 0.008
    points, scores = heatmap_peaks(_ones(heat.shape), heat)
    np.testing.assert_array_equal(points, [[6.0, 2.0]])
    assert heatmap_peaks(_ones(heat.shape), heat, peak_thresh=0.01)[0].shape == (0, 2)


def test_max_peaks_keeps_the_highest_in_descending_order():
    centres = np.array([[4.0, 4.0], [14.0, 4.0], [24.0, 4.0], [4.0, 14.0], [14.0, 14.0]])
    amplitudes = [0.3, 0.9, 0.5, 0.8, 0.1]
    heat = np.max([a * centroid_heatmap(c[None], (20, 30), sigma_px=1.5) for a, c in zip(amplitudes, centres,
                                                                                      strict=True)], axis=0)
    points, scores = heatmap_peaks(_ones(heat.shape), heat, max_peaks=3)
    np.testing.assert_array_equal(points, centres[[1, 3, 2]])
    np.testing.assert_allclose(scores, [0.9, 0.8, 0.5], atol=1e-6)
    assert len(heatmap_peaks(_ones(heat.shape), heat)[0]) == 5
    assert heatmap_peaks(_ones(heat.shape), heat, max_peaks=0)[0].shape == (0, 2)


@pytest.mark.parametrize(("rows", "cols", "expected_xy"), [
    (slice(3, 6), slice(3, 6), (4.0, 4.0)),      # 3×3 plateau: its centre
    (slice(3, 7), slice(10, 15), (12.0, 4.0)),   # 4×5: mean (row 4.5, col 12); rows 4 and 5 tie -> raster first
    (slice(0, 2), slice(0, 2), (0.0, 0.0)),      # 2×2 in the corner: all four tie -> the first
])
def test_a_flat_plateau_gives_one_peak(rows, cols, expected_xy):
    heat = np.zeros((12, 18), np.float32)
    heat[rows, cols] = 0.5
    points, scores = heatmap_peaks(_ones(heat.shape), heat)
    np.testing.assert_array_equal(points, [expected_xy])
    np.testing.assert_array_equal(scores, [0.5])


def test_peaks_at_the_border_and_none_in_an_empty_map():
    heat = np.zeros((6, 7), np.float32)
    heat[0, 6] = 0.3
    np.testing.assert_array_equal(heatmap_peaks(_ones(heat.shape), heat)[0], [[6.0, 0.0]])
    points, scores = heatmap_peaks(_ones(heat.shape), np.zeros((6, 7)))
    assert points.shape == (0, 2) and scores.shape == (0,) and scores.dtype == np.float32
    with pytest.raises(InputError, match="same"):
        heatmap_peaks(_ones((6, 7)), np.zeros((6, 8)))
    with pytest.raises(InputError, match="odd"):
        heatmap_peaks(_ones((6, 7)), np.zeros((6, 7)), pool_px=2)


def test_peaks_accept_tensors_and_a_wider_pool_merges_nearby_maxima():
    heat = np.zeros((10, 10), np.float32)
    heat[2, 2], heat[2, 4] = 0.6, 0.6  # two pixels apart: distinct 3×3 maxima, one 5×5 plateau
    fg = torch.ones(10, 10)
    assert len(heatmap_peaks(fg, torch.from_numpy(heat))[0]) == 2
    np.testing.assert_array_equal(heatmap_peaks(fg, heat, pool_px=5)[0], [[2.0, 2.0]])


# --- scale_points_xy (§3.4 step 5) ---------------------------------------------------------------------------


def test_scale_points_pixel_centre_convention_and_round_trip():
    pts = np.array([[0.0, 0.0], [-0.5, -0.5], [447.5, 335.5], [223.5, 167.5]])
    out = scale_points_xy(pts, (336, 448), (480, 640))
    s = 640 / 448  # = 480 / 336
    np.testing.assert_allclose(out, [[0.5 * s - 0.5, 0.5 * s - 0.5], [-0.5, -0.5], [639.5, 479.5], [319.5, 239.5]],
                               atol=1e-9)
    gen = np.random.default_rng(0)
    rand = gen.uniform(0, [448, 336], size=(20, 2))
    there = scale_points_xy(rand, (336, 448), (375, 500))  # anisotropic
    np.testing.assert_allclose(scale_points_xy(there, (375, 500), (336, 448)), rand, atol=1e-9)
    assert scale_points_xy(np.zeros((0, 2)), (2, 2), (4, 4)).shape == (0, 2)
    with pytest.raises(InputError, match="K, 2"):
        scale_points_xy(np.zeros((3,)), (2, 2), (4, 4))
