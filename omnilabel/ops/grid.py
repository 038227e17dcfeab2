"""Regular point grids for prompting SAM over a whole image."""

from __future__ import annotations

import numpy as np

from omnilabel.errors import InputError


def point_grid(n_per_side: int, size_hw: tuple[int, int]) -> np.ndarray:
    """SAM's ``n_per_side`` x ``n_per_side`` point grid in pixel xy of an image of size ``size_hw``.

    Same points as ``SamAutomaticMaskGenerator`` prompts with (one crop layer, no crops):
    ``segment_anything.utils.amg.build_point_grid(n_per_side) * [W, H]``. Each point is the centre of one of
    the n x n equal cells of the image, in SAM's continuous frame (x in [0, W], the image's left edge at 0),
    so with W = 64 and n = 32 the first x is 1.0. Row-major: x varies fastest.

    Args:
        n_per_side: points per side, >= 1 (E-SAM: 32 and 64).
        size_hw: ``(H, W)`` of the image in pixels.

    Returns:
        (n_per_side², 2) float64 point xy.

    Raises:
        InputError: ``n_per_side`` < 1 or a side of ``size_hw`` < 1.
    """
    if n_per_side < 1:
        raise InputError(f"n_per_side must be >= 1, got {n_per_side}")
    h, w = (int(s) for s in size_hw)
    if h < 1 or w < 1:
        raise InputError(f"size_hw must be positive, got {tuple(size_hw)}")
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs, ys = np.meshgrid(side * w, side * h)  # (n, n) each; xy indexing puts x along the columns
    return np.stack([xs.ravel(), ys.ravel()], axis=1)
