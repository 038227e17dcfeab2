from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from omnilabel.ops.point_sampling import dice_loss_at_points
from omnilabel.ops.uncertainty import (
    certainty_weighted_point,
    ua_dice_loss_at_points,
    ua_focal_loss_at_points,
    uncertainty_from_logits,
    uncertainty_mean,
)

LN3 = math.log(3.0)  # sigmoid(ln 3) = 3 / 4, sigmoid(-ln 3) = 1 / 4


# --- uncertainty_from_logits (Eq. 3) ---------------------------------------------------------------------------


def test_uncertainty_from_logits_known_values():
    s = torch.tensor([0.0, 20.0, 0.0, LN3, -LN3], dtype=torch.float64)
    r = torch.tensor([0.0, -20.0, LN3, -LN3, LN3], dtype=torch.float64)
    u = uncertainty_from_logits(s, r)
    assert u.dtype == torch.float32 and u.shape == (5,)
    # |0.5 - 0.5| = 0; |~1 - ~0| = ~1; |0.5 - 0.75| = 0.25; |0.75 - 0.25| = 0.5; |0.25 - 0.75| = 0.5
    torch.testing.assert_close(u, torch.tensor([0.0, 1.0, 0.25, 0.5, 0.5]), atol=1e-6, rtol=0)
    assert uncertainty_from_logits(torch.zeros(2, 3, 4), torch.ones(2, 3, 4)).shape == (2, 3, 4)


def test_uncertainty_from_logits_shape_mismatch_raises():
    with pytest.raises(ValueError):
        uncertainty_from_logits(torch.zeros(2, 3), torch.zeros(3, 2))


# --- uncertainty_mean --------------------------------------------------------------------------------------------


def _tiny_l_shape() -> tuple[np.ndarray, np.ndarray]:
    # 5 x 7 grid, mask (y, x) = (1, 1), (1, 2), (2, 1):
    #   . . . . . . .        band 1 = union of the 3x3 squares around each mask pixel:
    #   . M M . . . .          around (1,1): rows 0-2, cols 0-2;  around (1,2): rows 0-2, cols 1-3;
    #   . M . . . . .          around (2,1): rows 1-3, cols 0-2
    #   . . . . . . .        -> rows 0-2 x cols 0-3 (12 px) + row 3 x cols 0-2 (3 px) = 15 px
    #   . . . . . . .
    mask = np.zeros((5, 7), dtype=bool)
    mask[1, 1] = mask[1, 2] = mask[2, 1] = True
    u = np.zeros((5, 7), dtype=np.float32)
    u[1, 1] = 0.5  # a mask pixel
    u[2, 3] = 1.0  # band: diagonal neighbour of (1, 2), Chebyshev distance 1
    u[3, 3] = 1.0  # outside: Chebyshev distance 2 from (2, 1), (1, 2) and (1, 1)
    u[0, 6] = 1.0  # far outside
    return u, mask


def test_uncertainty_mean_counts_band_by_hand():
    u, mask = _tiny_l_shape()
    # band 1: (0.5 + 1.0) / 15 = 0.1
    assert uncertainty_mean(u, mask, band_px=1) == pytest.approx(0.1)
    # band 0: the 3 mask pixels, 0.5 / 3
    assert uncertainty_mean(u, mask, band_px=0) == pytest.approx(0.5 / 3)
    # band 2, 5x5 squares clipped at the top and left: (1,1) -> rows 0-3 x cols 0-3, (1,2) -> rows 0-3 x cols 0-4,
    # (2,1) -> rows 0-4 x cols 0-3; union = rows 0-3 x cols 0-4 (20 px) + row 4 x cols 0-3 (4 px) = 24 px,
    # now holding (3, 3) too but not (4, 4) -> (0.5 + 1 + 1) / 24
    assert uncertainty_mean(u, mask, band_px=2) == pytest.approx(2.5 / 24)
    # default band is 3: rows 0-4 (all) x cols 0-5 = 30 px, (0, 6) still outside -> 2.5 / 30
    assert uncertainty_mean(u, mask) == pytest.approx(2.5 / 30)


def test_uncertainty_mean_empty_mask_and_bad_input():
    u = np.ones((4, 4), dtype=np.float32)
    assert uncertainty_mean(u, np.zeros((4, 4), dtype=bool)) == 0.0
    with pytest.raises(ValueError):
        uncertainty_mean(u, np.zeros((4, 5), dtype=bool))
    with pytest.raises(ValueError):
        uncertainty_mean(u, np.ones((4, 4), dtype=bool), band_px=-1)


def _brute_force_mean(u: np.ndarray, mask: np.ndarray, band: int) -> float:
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return 0.0
    gy, gx = np.mgrid[: mask.shape[0], : mask.shape[1]]
    cheb = np.maximum(np.abs(gy[..., None] - ys), np.abs(gx[..., None] - xs)).min(axis=-1)
    return float(u[cheb <= band].mean())


@pytest.mark.parametrize("band", [0, 1, 2, 3, 4, 5, 7, 12])
def test_uncertainty_mean_matches_brute_force_chebyshev(band):
    rng = np.random.default_rng(band)
    u = rng.random((23, 31))
    mask = rng.random((23, 31)) < 0.04
    mask[0, 30] = True  # touches a corner, so the band is clipped there
    assert uncertainty_mean(u, mask, band_px=band) == pytest.approx(_brute_force_mean(u, mask, band), abs=1e-12)


def test_uncertainty_mean_on_a_large_image_with_a_hole():
    rng = np.random.default_rng(0)
    u = rng.random((3000, 4000), dtype=np.float32)
    mask = np.zeros((3000, 4000), dtype=bool)
    mask[10:2990, 5:3990] = True
    mask[500:600, 700:800] = False  # a hole of 100 x 100; band 3 eats 3 px of it on each side: 94 x 94 left out
    value = uncertainty_mean(u, mask, band_px=3)
    region = np.zeros_like(mask)
    region[7:2993, 2:3993] = True
    region[503:597, 703:797] = False
    assert value == pytest.approx(float(u[region].mean(dtype=np.float64)), rel=1e-9)


# --- ua_focal_loss_at_points (Eq. 1) -----------------------------------------------------------------------------


def test_ua_focal_two_points_by_hand():
    logits = torch.tensor([[LN3, LN3]], dtype=torch.float64)
    target = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    # point 0: p = 3/4, t = 1: ce = ln(4/3), p_t = 3/4, (1 - p_t)^2 = 1/16, alpha_t = 1/4 -> ln(4/3) / 64
    # point 1: p = 3/4, t = 0: ce = ln 4,   p_t = 1/4, (1 - p_t)^2 = 9/16, alpha_t = 3/4 -> 27 ln 4 / 64
    f0, f1 = math.log(4 / 3) / 64, 27 * math.log(4) / 64
    c = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    # (1/P) sum c_i focal_i = (f0 + 0.5 f1) / 2 = 0.148458...
    out = ua_focal_loss_at_points(logits, target, c)
    assert out.shape == (1,)
    assert out.item() == pytest.approx((f0 + 0.5 * f1) / 2)
    assert out.item() == pytest.approx(0.148458, abs=1e-6)
    # normalised by P = 2, not by sum c = 1: keeping only point 0 gives f0 / 2
    assert ua_focal_loss_at_points(logits, target, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(f0 / 2)
    assert ua_focal_loss_at_points(logits, target, torch.zeros(1, 2)).item() == 0.0
    # alpha < 0 drops alpha_t: (ln(4/3) / 16 + 0.5 * 9 ln 4 / 16) / 2
    no_alpha = ua_focal_loss_at_points(logits, target, c, alpha=-1.0)
    assert no_alpha.item() == pytest.approx((math.log(4 / 3) / 16 + 0.5 * 9 * math.log(4) / 16) / 2)


@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), (-1.0, 2.0), (0.6, 0.0), (0.25, 1.5)])
def test_ua_focal_with_full_certainty_is_torchvision_focal(alpha, gamma):
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4, 50, generator=gen)
    target = (torch.rand(4, 50, generator=gen) > 0.5).float()
    target[0] = torch.rand(50, generator=gen)  # soft targets too
    expected = sigmoid_focal_loss(logits, target, alpha=alpha, gamma=gamma, reduction="none").mean(1)
    got = ua_focal_loss_at_points(logits, target, torch.ones(4, 50), alpha=alpha, gamma=gamma)
    torch.testing.assert_close(got, expected)


def test_ua_focal_gradient_flows_to_logits_only_where_certain():
    logits = torch.zeros(1, 3, requires_grad=True)
    ua_focal_loss_at_points(logits, torch.ones(1, 3), torch.tensor([[1.0, 0.0, 0.5]])).sum().backward()
    grad = logits.grad[0]
    assert grad[1] == 0 and grad[0] < 0 and grad[2] < 0
    assert grad[2].item() == pytest.approx(0.5 * grad[0].item())


# --- ua_dice_loss_at_points (Eq. 2) ------------------------------------------------------------------------------


def test_ua_dice_masks_uncertain_point_by_hand():
    logits = torch.tensor([[LN3, 0.0, LN3]], dtype=torch.float64)  # p = [3/4, 1/2, 3/4]
    target = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    c = torch.tensor([[0.9, 0.5, 0.7]], dtype=torch.float64)
    # theta = 0.6 keeps points 0 and 2: I = 1 * 3/4 = 3/4, S = (1 + 3/4) + (0 + 3/4) = 5/2
    # loss = 1 - (2 * 3/4 + 1) / (5/2 + 1) = 1 - 5/7 = 2/7
    out = ua_dice_loss_at_points(logits, target, c)
    assert out.shape == (1,)
    assert out.item() == pytest.approx(2 / 7)
    # theta = 0.5 is strict: c = 0.5 is still dropped -> same 2/7
    assert ua_dice_loss_at_points(logits, target, c, theta=0.5).item() == pytest.approx(2 / 7)
    # theta = 0.4 keeps all: I = 3/4 + 1/2 = 5/4, S = 7/4 + 3/2 + 3/4 = 4 -> 1 - 3.5 / 5 = 0.3
    assert ua_dice_loss_at_points(logits, target, c, theta=0.4).item() == pytest.approx(0.3)
    # eps = 0.5 at theta 0.6: 1 - (1.5 + 0.5) / (2.5 + 0.5) = 1/3
    assert ua_dice_loss_at_points(logits, target, c, eps=0.5).item() == pytest.approx(1 / 3)
    # nothing certain: 1 - eps / eps = 0
    assert ua_dice_loss_at_points(logits, target, torch.zeros(1, 3)).item() == 0.0


def test_ua_dice_with_full_certainty_is_plain_dice():
    gen = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(5, 40, generator=gen)
    target = (torch.rand(5, 40, generator=gen) > 0.5).float()
    got = ua_dice_loss_at_points(logits, target, torch.ones(5, 40))
    torch.testing.assert_close(got, dice_loss_at_points(logits, target))
    p = logits.sigmoid()
    plain = 1 - (2 * (p * target).sum(1) + 1) / ((p + target).sum(1) + 1)
    torch.testing.assert_close(got, plain)


@pytest.mark.parametrize("loss", [ua_focal_loss_at_points, ua_dice_loss_at_points])
def test_point_losses_reject_mismatched_shapes(loss):
    with pytest.raises(ValueError):
        loss(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 3))
    with pytest.raises(ValueError):
        loss(torch.zeros(2, 4), torch.zeros(2, 5), torch.zeros(2, 4))
    with pytest.raises(ValueError):
        loss(torch.zeros(8), torch.zeros(8), torch.zeros(8))


# --- certainty_weighted_point (§4) -------------------------------------------------------------------------------


def _draw_xs(region, certainty, n, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.array([certainty_weighted_point(region, certainty, rng)[0] for _ in range(n)])


def test_sampling_frequencies_follow_certainty():
    region = np.ones((1, 3), dtype=bool)
    certainty = np.array([[0.1, 0.3, 0.6]])
    xs = _draw_xs(region, certainty, 20000)
    # P_i = c_i / (0.1 + 0.3 + 0.6) = c_i; one-sigma error at 20000 draws is at most sqrt(0.24 / 20000) = 0.0035
    freq = np.array([(xs == x + 0.5).mean() for x in range(3)])
    assert freq.sum() == 1.0
    np.testing.assert_allclose(freq, [0.1, 0.3, 0.6], atol=0.015)


def test_sampling_never_draws_zero_weight_or_outside_region():
    # pixels 0 and 2 have certainty 0; pixel 4 has the highest certainty but lies outside the region
    region = np.array([[True, True, True, True, False]])
    certainty = np.array([[0.0, 0.5, 0.0, 0.25, 1.0]])
    xs = _draw_xs(region, certainty, 3000)
    assert set(np.unique(xs)) == {1.5, 3.5}
    assert (xs == 1.5).mean() == pytest.approx(2 / 3, abs=0.03)  # 0.5 / (0.5 + 0.25)


def test_sampling_all_zero_falls_back_to_uniform():
    region = np.array([[True, False], [True, True]])
    rng = np.random.default_rng(0)
    pts = np.array([certainty_weighted_point(region, np.zeros((2, 2)), rng) for _ in range(9000)])
    keys = [tuple(p) for p in pts]
    # region pixels (x, y) = (0, 0), (0, 1), (1, 1) -> centres (0.5, 0.5), (0.5, 1.5), (1.5, 1.5), 1/3 each
    for centre in [(0.5, 0.5), (0.5, 1.5), (1.5, 1.5)]:
        assert keys.count(centre) / len(keys) == pytest.approx(1 / 3, abs=0.03)
    assert (1.5, 0.5) not in keys


def test_sampling_returns_pixel_centre_and_is_seeded():
    region = np.zeros((4, 3), dtype=bool)
    region[2, 1] = True  # y = 2, x = 1
    point = certainty_weighted_point(region, np.full((4, 3), 0.7), np.random.default_rng(0))
    assert point.dtype == np.float64 and point.shape == (2,)
    np.testing.assert_array_equal(point, [1.5, 2.5])
    rng_region = np.ones((8, 8), dtype=bool)
    certainty = np.random.default_rng(5).random((8, 8))
    a = [certainty_weighted_point(rng_region, certainty, np.random.default_rng(7)) for _ in range(3)]
    b = certainty_weighted_point(rng_region, certainty, np.random.default_rng(7))
    for p in a:
        np.testing.assert_array_equal(p, b)
    rng = np.random.default_rng(7)
    seq = {tuple(certainty_weighted_point(rng_region, certainty, rng)) for _ in range(20)}
    assert len(seq) > 1  # consecutive draws from one generator differ


def test_sampling_bad_input_raises():
    with pytest.raises(ValueError):
        certainty_weighted_point(np.zeros((3, 3), dtype=bool), np.ones((3, 3)), np.random.default_rng(0))
    with pytest.raises(ValueError):
        certainty_weighted_point(np.ones((3, 3), dtype=bool), np.ones((3, 4)), np.random.default_rng(0))
    with pytest.raises(ValueError):
        certainty_weighted_point(np.ones((1, 2), dtype=bool), np.array([[0.5, -0.1]]), np.random.default_rng(0))


class _FixedDraw:
    """Stands in for a Generator whose ``random()`` returns one chosen value."""

    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.parametrize(("draw", "expected_x"), [(0.0, 1.5), (0.4999, 1.5), (0.5, 2.5), (1.0, 2.5)])
def test_sampling_extreme_draws_skip_zero_weight_pixels(draw, expected_x):
    # weights [0, 0.5, 0.5, 0] -> cumulative [0, 0.5, 1.0, 1.0]; a draw of 0 must not pick pixel 0, and a draw
    # rounded up to the total must not run past the last positive pixel into pixel 3
    region = np.ones((1, 4), dtype=bool)
    certainty = np.array([[0.0, 0.5, 0.5, 0.0]])
    assert certainty_weighted_point(region, certainty, _FixedDraw(draw))[0] == expected_x
