"""SUM's pixel uncertainty and what is built on it: the summary of a pseudomask, the UA losses, UA point sampling.

SUM (uncertainty-aware fine-tuning of SAM) compares a SAM pseudo-label's logits ``s`` with the logits ``r``
of a refinement module run on it; where the two disagree the pseudo-label is likely wrong (Eq. 3):

    u_i = |sigmoid(s_i) - sigmoid(r_i)|  in [0, 1],    certainty c_i = 1 - u_i.

On unlabelled data the certainty weights the focal loss (Eq. 1), masks the Dice loss (Eq. 2) and the
prompt sampler (§3.2.2). The losses here take values already read at ``P`` points per mask (see
``omnilabel.ops.point_sampling``), so "all pixels" of the paper are the ``P`` points.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "certainty_weighted_point",
    "ua_dice_loss_at_points",
    "ua_focal_loss_at_points",
    "uncertainty_from_logits",
    "uncertainty_mean",
]


def uncertainty_from_logits(s: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Pixel uncertainty of a pseudo-label, SUM Eq. 3: ``u = |sigmoid(s) - sigmoid(r)|``.

    Args:
        s: (...) float logits of the pseudo-label (SAM's prediction).
        r: (...) float logits of the refined prediction, same shape as ``s``.

    Returns:
        (...) float32 uncertainty in [0, 1], same shape as the inputs.

    Raises:
        ValueError: ``s`` and ``r`` differ in shape.
    """
    if s.shape != r.shape:
        raise ValueError(f"s and r must have the same shape, got {tuple(s.shape)} and {tuple(r.shape)}")
    return (torch.sigmoid(s.float()) - torch.sigmoid(r.float())).abs()


def _window_or(a: np.ndarray, width: int) -> np.ndarray:
    """OR of every window of ``width`` consecutive elements along the last axis (length shrinks by width - 1)."""
    # Doubling: after k steps f[j] = OR a[j : j + 2**k]; two overlapping windows then cover any width.
    f, length = a, 1
    while 2 * length <= width:
        f = f[..., :-length] | f[..., length:]
        length *= 2
    n_out = a.shape[-1] - width + 1
    return f[..., :n_out] | f[..., width - length:]


def _dilate_square(mask: np.ndarray, radius: int) -> np.ndarray:
    """Square (Chebyshev) dilation of a 2-D bool mask by ``radius`` pixels, same shape."""
    if radius == 0:
        return mask.copy()
    width = 2 * radius + 1
    rows = _window_or(np.pad(mask, ((0, 0), (radius, radius))), width)  # max along x
    return _window_or(np.pad(rows, ((radius, radius), (0, 0))).T, width).T  # then along y


def uncertainty_mean(u: np.ndarray, mask: np.ndarray, *, band_px: int = 3) -> float:
    """Summary uncertainty of one pseudomask: the mean of ``u`` over the mask and a band around it.

    The region averaged is ``dilate(mask, band_px)``: every pixel that has a mask pixel within ``band_px``
    pixels in both x and y (square, i.e. Chebyshev, dilation). Why not the mask alone: a pseudomask's errors
    lie on its boundary and just outside it. Pixels it wrongly includes are inside the mask, but the parts it
    misses (a cut-off limb, a thin structure) lie outside, and only the band catches them. Why not the whole
    image: far from the mask, SAM and the refiner agree on background, which would dilute the mean towards 0
    in proportion to the image size rather than the mask's quality. This is the one definition used wherever
    a pseudomask is scored, filtered or ranked by uncertainty.

    The work is done on the mask's bounding box grown by ``band_px``, so it costs little for small masks; a
    full 4000 x 3000 mask takes a few separable passes over the image.

    Args:
        u: (H, W) float uncertainty in [0, 1] (``uncertainty_from_logits``).
        mask: (H, W) bool pseudomask.
        band_px: width of the band around the mask in pixels, >= 0 (0: the mask alone).

    Returns:
        Mean uncertainty in [0, 1] over the region; 0.0 for an empty mask.

    Raises:
        ValueError: ``u`` and ``mask`` are not the same (H, W), or ``band_px`` < 0.
    """
    u = np.asarray(u)
    mask = np.asarray(mask, dtype=bool)
    if u.ndim != 2 or u.shape != mask.shape:
        raise ValueError(f"u and mask must both be (H, W), got shapes {u.shape} and {mask.shape}")
    if band_px < 0:
        raise ValueError(f"band_px must be >= 0, got {band_px}")
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return 0.0
    cols = np.flatnonzero(mask.any(axis=0))
    # No mask pixel lies outside this crop, so the dilation inside it is the dilation of the whole mask.
    y0, y1 = max(rows[0] - band_px, 0), min(rows[-1] + band_px + 1, mask.shape[0])
    x0, x1 = max(cols[0] - band_px, 0), min(cols[-1] + band_px + 1, mask.shape[1])
    region = _dilate_square(mask[y0:y1, x0:x1], band_px)
    return float(np.mean(u[y0:y1, x0:x1][region], dtype=np.float64))


def _check_point_inputs(logits: torch.Tensor, target: torch.Tensor, certainty: torch.Tensor) -> None:
    if logits.ndim != 2 or target.shape != logits.shape or certainty.shape != logits.shape:
        raise ValueError(f"logits, target and certainty must all be (N, P), got {tuple(logits.shape)}, "
                         f"{tuple(target.shape)} and {tuple(certainty.shape)}")


def ua_focal_loss_at_points(
    logits: torch.Tensor,
    target: torch.Tensor,
    certainty: torch.Tensor,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Uncertainty-aware focal loss, SUM Eq. 1 on sampled points: ``(1/P) Σ_i c_i · focal_i``.

    ``focal`` is ``torchvision.ops.sigmoid_focal_loss``: ``BCE(logit, t) · (1 - p_t)^gamma``, times
    ``alpha_t = alpha·t + (1 - alpha)·(1 - t)`` unless ``alpha < 0``. The sum is divided by P, all points,
    not by ``Σ c``: uncertain points lower the loss rather than reweighting the certain ones up.

    Args:
        logits: (N, P) float predicted logits at the points.
        target: (N, P) float pseudo-label in [0, 1] at the same points.
        certainty: (N, P) float ``c = 1 - u`` in [0, 1] (no gradient is meant to flow into it).
        alpha: weight of the positive class in (0, 1); < 0 disables the term (SAM / SUM: 0.25).
        gamma: focusing exponent, >= 0 (SAM / SUM: 2).

    Returns:
        (N,) loss per mask.

    Raises:
        ValueError: the three inputs are not (N, P) of one shape.
    """
    _check_point_inputs(logits, target, certainty)
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    focal = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        focal = focal * (alpha * target + (1 - alpha) * (1 - target))
    return (certainty * focal).mean(dim=1)


def ua_dice_loss_at_points(
    logits: torch.Tensor,
    target: torch.Tensor,
    certainty: torch.Tensor,
    *,
    theta: float = 0.6,
    eps: float = 1.0,
) -> torch.Tensor:
    """Uncertainty-aware Dice loss, SUM Eq. 2 on sampled points: Dice over the points with ``c > theta``.

    With ``keep = 1[c > theta]`` and ``p = sigmoid(logits)``:
    ``I = Σ t·p·keep``, ``S = Σ (t + p)·keep``, ``loss = 1 - (2I + eps) / (S + eps)``.
    A row with no kept point has loss 0.

    Args:
        logits: (N, P) float predicted logits at the points.
        target: (N, P) float pseudo-label in [0, 1] at the same points.
        certainty: (N, P) float ``c = 1 - u`` in [0, 1].
        theta: certainty a point must exceed to count (SUM App. B.1: 0.6).
        eps: smoothing added to numerator and denominator (SUM code: 1).

    Returns:
        (N,) loss per mask, in [0, 1).

    Raises:
        ValueError: the three inputs are not (N, P) of one shape.
    """
    _check_point_inputs(logits, target, certainty)
    keep = (certainty > theta).to(logits.dtype)
    p = logits.sigmoid()
    inter = (target * p * keep).sum(dim=1)
    total = ((target + p) * keep).sum(dim=1)
    return 1 - (2 * inter + eps) / (total + eps)


def certainty_weighted_point(region: np.ndarray, certainty: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw one prompt point from a region with probability proportional to certainty (SUM §3.2.2).

    Pixel ``i`` of the region is drawn with ``P_i = c_i / Σ_{j in region} c_j``, so points land where the
    pseudo-label is trusted and seldom where its label may be wrong. If every pixel of the region has
    certainty 0 there is nothing to prefer, and the pixel is drawn uniformly from the region instead.

    Args:
        region: (H, W) bool pixels to draw from (the pseudomask, or an error region).
        certainty: (H, W) float ``c = 1 - u`` in [0, 1].
        rng: the only source of randomness; a seeded generator gives a reproducible draw.

    Returns:
        (2,) float64 ``[x + 0.5, y + 0.5]``: the centre of the drawn pixel in pixel coordinates.

    Raises:
        ValueError: shapes differ or are not (H, W), the region is empty, or a certainty in the region is
            negative or not finite.
    """
    region = np.asarray(region, dtype=bool)
    certainty = np.asarray(certainty)
    if region.ndim != 2 or certainty.shape != region.shape:
        raise ValueError(f"region and certainty must both be (H, W), got shapes {region.shape} and "
                         f"{certainty.shape}")
    flat = np.flatnonzero(region)
    if flat.size == 0:
        raise ValueError("region is empty: no pixel to draw a point from")
    weights = certainty.reshape(-1)[flat].astype(np.float64)
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise ValueError("certainty must be finite and >= 0 inside the region")
    cumulative = np.cumsum(weights)
    total = cumulative[-1]
    if total > 0:
        # First index whose cumulative weight exceeds the draw: a zero-weight pixel is never chosen, and the
        # clip to the last positive pixel guards against rounding of rng.random() * total up to total.
        k = int(np.searchsorted(cumulative, rng.random() * total, side="right"))
        k = min(k, int(np.flatnonzero(weights)[-1]))
    else:
        k = int(rng.integers(flat.size))
    y, x = divmod(int(flat[k]), region.shape[1])
    return np.array([x + 0.5, y + 0.5], dtype=np.float64)
