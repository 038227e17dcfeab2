"""Felzenszwalb superpixels and their centroids (E-SAM's superpixel map M_S: density, centroid features, USR).

Points are pixel centres in the package's convention: pixel ``(row, col)`` is ``[col + 0.5, row + 0.5]``, so
``labels[int(y), int(x)]`` is the pixel a point lies on.
"""

from __future__ import annotations

import numpy as np

from omnilabel.errors import InputError

# E-SAM (§3.2) runs Felzenszwalb superpixels without giving parameters (its supplementary, which compares with
# SLIC, is not available). Defaults are those of scikit-image's gallery example "Comparison of segmentation and
# superpixel algorithms" (``felzenszwalb(img, scale=100, sigma=0.5, min_size=50)``): our choice, not the paper's.
FELZENSZWALB_SCALE = 100.0
FELZENSZWALB_SIGMA = 0.5
FELZENSZWALB_MIN_SIZE_PX = 50


def felzenszwalb_superpixels(
    image_rgb: np.ndarray,
    *,
    scale: float = FELZENSZWALB_SCALE,
    sigma: float = FELZENSZWALB_SIGMA,
    min_size: int = FELZENSZWALB_MIN_SIZE_PX,
) -> np.ndarray:
    """Felzenszwalb-Huttenlocher graph segmentation (``skimage.segmentation.felzenszwalb``).

    Args:
        image_rgb: (H, W, 3) uint8 RGB image.
        scale: the method's k; higher gives fewer, larger superpixels (the threshold is ``scale / |C|``).
        sigma: std of the Gaussian smoothing before segmentation, in pixels (>= 0).
        min_size: smallest superpixel in pixels; smaller ones are merged into a neighbour (>= 1).

    Returns:
        (H, W) int32 labels 0..K-1, every label used.

    Raises:
        InputError: the image is not (H, W, 3) uint8 or a parameter is out of range.
    """
    from skimage.segmentation import felzenszwalb

    if not isinstance(image_rgb, np.ndarray) or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise InputError(f"expected an (H, W, 3) RGB image, got shape {getattr(image_rgb, 'shape', None)}")
    if image_rgb.dtype != np.uint8:
        raise InputError(f"expected a uint8 image, got {image_rgb.dtype}")
    if scale <= 0 or sigma < 0 or min_size < 1:
        raise InputError(f"need scale > 0, sigma >= 0, min_size >= 1; got {scale}, {sigma}, {min_size}")
    labels = felzenszwalb(image_rgb, scale=scale, sigma=sigma, min_size=int(min_size), channel_axis=-1)
    if (np.bincount(labels.ravel()) == 0).any():  # make labels consecutive if the library ever leaves gaps
        labels = np.unique(labels, return_inverse=True)[1].reshape(labels.shape)
    return labels.astype(np.int32)


def superpixel_centroids(labels: np.ndarray) -> np.ndarray:
    """One point per superpixel: its centroid, or the superpixel's pixel nearest to it when outside.

    The centroid is the mean of the superpixel's pixel centres. A non-convex superpixel's centroid can lie on
    another superpixel (E-SAM §7.1 notes this for prompts); it is then replaced by the centre of the
    superpixel's pixel nearest to it (Euclidean; ties to the first in raster order), so that every point lies
    on its own superpixel, as a SAM point prompt for it must.

    Args:
        labels: (H, W) integer labels 0..K-1, every label used (e.g. ``felzenszwalb_superpixels``).

    Returns:
        (K, 2) float64 xy; row k lies on a pixel of superpixel k.

    Raises:
        InputError: ``labels`` is not a 2-D integer array of labels 0..K-1 each used at least once.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"labels: expected an (H, W) integer array, got {labels.dtype} {labels.shape}")
    if labels.size == 0:
        return np.zeros((0, 2), dtype=np.float64)
    if labels.min() < 0:
        raise InputError(f"labels must be >= 0, got {labels.min()}")
    flat = labels.ravel()
    counts = np.bincount(flat)
    if (missing := np.flatnonzero(counts == 0)).size:
        raise InputError("labels must be 0..K-1 with each used", [f"label {k} has no pixel" for k in missing[:10]])
    rows, cols = np.divmod(np.arange(flat.size), labels.shape[1])
    xy = np.stack([np.bincount(flat, weights=cols) / counts, np.bincount(flat, weights=rows) / counts], axis=1)
    xy += 0.5

    # A centroid lies on pixel (int(y), int(x)); snap those that land on another superpixel.
    on = labels[xy[:, 1].astype(np.int64), xy[:, 0].astype(np.int64)]
    outside = np.flatnonzero(on != np.arange(len(counts)))
    if outside.size:
        order = np.argsort(flat, kind="stable")  # pixels grouped by label, raster order within a label
        starts = np.concatenate([[0], np.cumsum(counts)])
        for k in outside:
            pix = order[starts[k] : starts[k + 1]]
            centres = np.stack([cols[pix], rows[pix]], axis=1) + 0.5
            xy[k] = centres[np.argmin(((centres - xy[k]) ** 2).sum(axis=1))]
    return xy
