from __future__ import annotations

import pytest
import torch

from omnilabel.ops.point_sampling import (
    dice_loss_at_points,
    point_sample,
    sigmoid_ce_loss_at_points,
    uncertain_point_coords,
)


def test_point_sample_reads_pixel_centres_and_zero_outside():
    maps = torch.arange(12, dtype=torch.float32).reshape(1, 1, 3, 4)
    ys, xs = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    centres = torch.stack([(xs.flatten() + 0.5) / 4, (ys.flatten() + 0.5) / 3], dim=1)[None]
    out = point_sample(maps, centres)
    assert out.shape == (1, 1, 12)
    torch.testing.assert_close(out[0, 0], maps.flatten())
    # halfway between two pixel centres of one row: their mean
    mid = torch.tensor([[[1.0 / 4, 0.5 / 3]]])
    assert point_sample(maps, mid).item() == pytest.approx(0.5)
    # far outside the map: zero padding
    assert point_sample(maps, torch.tensor([[[3.0, 3.0]]])).item() == 0.0


def test_most_uncertain_points_come_first():
    # confident (+-10) everywhere except the right half of the map, where the logit is 0
    logits = torch.full((2, 1, 32, 32), 10.0)
    logits[1] *= -1
    logits[:, :, :, 16:] = 0.0
    gen = torch.Generator().manual_seed(0)
    coords = uncertain_point_coords(logits, num_points=400, oversample_ratio=3.0, importance_ratio=0.75, generator=gen)
    assert coords.shape == (2, 400, 2) and coords.dtype == torch.float32
    assert (coords >= 0).all() and (coords <= 1).all()
    assert (coords[:, :300, 0] > 0.5).all()  # the 300 importance points all lie in the uncertain half
    uniform_share = (coords[:, 300:, 0] > 0.5).float().mean().item()
    assert 0.3 < uniform_share < 0.7  # the last 100 are uniform


def test_sampling_is_seeded_and_ratio_zero_is_uniform():
    logits = torch.randn(3, 1, 16, 16)
    a = uncertain_point_coords(logits, num_points=50, generator=torch.Generator().manual_seed(1))
    b = uncertain_point_coords(logits, num_points=50, generator=torch.Generator().manual_seed(1))
    c = uncertain_point_coords(logits, num_points=50, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # with no importance points, the result is the uniform draw that follows the candidates
    d = uncertain_point_coords(logits, num_points=50, importance_ratio=0.0, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    torch.rand(3, 150, 2, generator=gen)
    torch.testing.assert_close(d, torch.rand(3, 50, 2, generator=gen))


@pytest.mark.parametrize("kwargs", [{"num_points": 0}, {"num_points": 4, "oversample_ratio": 0.5},
                                    {"num_points": 4, "importance_ratio": 1.5}])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        uncertain_point_coords(torch.zeros(1, 1, 4, 4), **kwargs)
    with pytest.raises(ValueError):
        uncertain_point_coords(torch.zeros(1, 2, 4, 4), num_points=4)


def test_losses_on_known_values():
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    right = torch.tensor([[20.0, 20.0, -20.0, -20.0]])
    wrong = -right
    assert dice_loss_at_points(right, targets).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss_at_points(wrong, targets).item() == pytest.approx(1 - 1 / 5, abs=1e-6)  # (0 + 1) / (2 + 2 + 1)
    assert sigmoid_ce_loss_at_points(right, targets).item() == pytest.approx(0.0, abs=1e-6)
    assert sigmoid_ce_loss_at_points(wrong, targets).item() == pytest.approx(20.0, abs=1e-4)
    zero = torch.zeros(1, 4)
    # p = 0.5 everywhere: dice = 1 - (2 * 1 + 1) / (2 + 2 + 1), CE = log 2
    assert dice_loss_at_points(zero, targets).item() == pytest.approx(1 - 3 / 5)
    assert sigmoid_ce_loss_at_points(zero, targets).item() == pytest.approx(0.693147, abs=1e-5)
    # one loss per row
    assert dice_loss_at_points(torch.zeros(5, 7), torch.ones(5, 7)).shape == (5,)
