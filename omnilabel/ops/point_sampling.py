"""Point-sampled mask losses: uncertainty-based importance sampling (PointRend / Mask2Former) and the losses on it.

Mask2Former computes its mask loss not on every pixel but on ``P`` points per mask (112 x 112 = 12,544):
``oversample_ratio * P`` points are drawn uniformly, the ``importance_ratio * P`` most uncertain of them
(predicted logit nearest 0) are kept, and the rest of the ``P`` are drawn uniformly again. The prediction
and the target are read at those points by bilinear interpolation (``grid_sample``), so a low-resolution
prediction is compared with a target of any resolution without resizing either.

Coordinates are normalised ``(x, y)`` in ``[0, 1]`` of the whole map, ``(0, 0)`` its top-left corner and
``(1, 1)`` its bottom-right corner (``align_corners=False``: a pixel covers ``[i, i + 1) / size``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "dice_loss_at_points",
    "point_sample",
    "sigmoid_ce_loss_at_points",
    "uncertain_point_coords",
]


def point_sample(maps: torch.Tensor, coords_xy: torch.Tensor) -> torch.Tensor:
    """Read maps at points by bilinear interpolation (zeros outside the map).

    Args:
        maps: (N, C, H, W) float.
        coords_xy: (N, P, 2) float normalised ``(x, y)`` in [0, 1].

    Returns:
        (N, C, P) values of each map at its own points.
    """
    grid = (2.0 * coords_xy - 1.0).unsqueeze(2).to(maps.dtype)
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False).squeeze(3)


def uncertain_point_coords(
    logits: torch.Tensor,
    *,
    num_points: int,
    oversample_ratio: float = 3.0,
    importance_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Points where a mask prediction is most uncertain, plus uniform ones (Mask2Former's sampler).

    Uncertainty is ``-|logit|``: highest on the predicted boundary. Of ``num_points`` points,
    ``int(importance_ratio * num_points)`` are the most uncertain of ``int(oversample_ratio * num_points)``
    uniform candidates; the others are uniform.

    Args:
        logits: (N, 1, H, W) float mask logits (read only; no gradient flows through the choice).
        num_points: P, points per mask, >= 1.
        oversample_ratio: candidates per point, >= 1 (Mask2Former: 3).
        importance_ratio: fraction of the P points chosen by uncertainty, in [0, 1] (Mask2Former: 0.75).
        generator: source of the uniform draws (on ``logits``' device); None uses torch's global RNG.

    Returns:
        (N, P, 2) float32 normalised ``(x, y)`` in [0, 1]: the uncertain points first, then the uniform ones.

    Raises:
        ValueError: a ratio or count outside its range, or logits that are not (N, 1, H, W).
    """
    if logits.ndim != 4 or logits.shape[1] != 1:
        raise ValueError(f"logits must be (N, 1, H, W), got {tuple(logits.shape)}")
    if num_points < 1 or oversample_ratio < 1 or not 0 <= importance_ratio <= 1:
        raise ValueError(f"need num_points >= 1, oversample_ratio >= 1, 0 <= importance_ratio <= 1; got "
                         f"{num_points}, {oversample_ratio}, {importance_ratio}")
    n = logits.shape[0]
    num_candidates = max(int(num_points * oversample_ratio), num_points)
    num_uncertain = int(importance_ratio * num_points)
    num_random = num_points - num_uncertain
    device = logits.device
    with torch.no_grad():
        candidates = torch.rand(n, num_candidates, 2, device=device, generator=generator)
        uncertainty = -point_sample(logits.detach().float(), candidates)[:, 0].abs()
        top = torch.topk(uncertainty, k=num_uncertain, dim=1).indices
        chosen = torch.gather(candidates, 1, top[:, :, None].expand(-1, -1, 2))
        uniform = torch.rand(n, num_random, 2, device=device, generator=generator)
    return torch.cat([chosen, uniform], dim=1)


def sigmoid_ce_loss_at_points(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of mask logits against soft targets, averaged over points.

    Args:
        logits: (N, P) float predicted logits at the points.
        targets: (N, P) float target probabilities in [0, 1] at the same points.

    Returns:
        (N,) loss per mask.
    """
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=1)


def dice_loss_at_points(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss ``1 - (2 Σ p t + 1) / (Σ p + Σ t + 1)`` with ``p = sigmoid(logits)`` (Mask2Former's).

    Args:
        logits: (N, P) float predicted logits at the points.
        targets: (N, P) float target probabilities in [0, 1].

    Returns:
        (N,) loss per mask, in [0, 1).
    """
    probs = logits.sigmoid()
    numerator = 2 * (probs * targets).sum(dim=1)
    denominator = probs.sum(dim=1) + targets.sum(dim=1)
    return 1 - (numerator + 1) / (denominator + 1)
