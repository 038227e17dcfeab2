"""How well uncertainty maps find the wrong pixels of pseudomasks, against ground truth.

A pixel of a pseudomask is *wrong* when the pseudomask and the GT mask its weak label came from (the GT
annotation whose id is the pseudomask's ``omnilabel.weak_id``) disagree there. Every pixel of the image
counts, for each pseudomask with a map. The maps are stored to 1/65535 (``omnilabel.data.maps``), so the
pixels are counted in 65,536 bins of ``u`` per class and the AUROC is exact for the stored values (ties
count one half) with memory that does not grow with the dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from omnilabel.data.coco import load_coco
from omnilabel.data.maps import UINT16_MAX, read_uncertainty_map, uncertainty_map_paths
from omnilabel.errors import InputError
from omnilabel.ops.masks import segmentation_to_rle

__all__ = ["auroc_from_histograms", "uncertainty_vs_errors"]

_BINS = UINT16_MAX + 1


def auroc_from_histograms(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve of a score for "positive", from per-bin counts (bins in increasing score).

    Equals the probability that a random positive scores above a random negative, ties counting 1/2
    (the Mann–Whitney U statistic over the product of the counts).

    Raises:
        ValueError: the histograms differ in length, or a class is empty.
    """
    pos = np.asarray(positive, dtype=np.float64)
    neg = np.asarray(negative, dtype=np.float64)
    if pos.shape != neg.shape or pos.ndim != 1:
        raise ValueError(f"histograms must be 1-D of one length, got {pos.shape} and {neg.shape}")
    if pos.sum() == 0 or neg.sum() == 0:
        raise ValueError("AUROC needs both classes: a histogram is empty")
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])  # negatives strictly below each bin
    return float((pos * (below + 0.5 * neg)).sum() / (pos.sum() * neg.sum()))


def uncertainty_vs_errors(pseudo: str | Path, gt: str | Path) -> dict[str, Any]:
    """Mean uncertainty on wrong and on correct pixels, and the AUROC of ``u`` for "this pixel is wrong".

    Args:
        pseudo: a pseudomask file with uncertainty maps (``pseudomask --refiner`` or ``uncertainty``).
        gt: the full GT its weak labels were made from (same annotation ids, ``omnilabel split``).

    Returns:
        ``maps``, ``pixels``, ``wrong_fraction``, ``mean_u_wrong``, ``mean_u_correct``, ``auroc``,
        ``bytes_per_map`` (mean file size).

    Raises:
        InputError: no pseudomask has a map, or a ``weak_id`` is not in ``gt``.
    """
    pseudo, gt = Path(pseudo), Path(gt)
    data = load_coco(pseudo, images_dir=None)
    truth = {int(a["id"]): a for a in load_coco(gt, images_dir=None)["annotations"]}
    paths = uncertainty_map_paths(data["annotations"], base_dir=pseudo.parent)
    if not paths:
        raise InputError(f"{pseudo}: no annotation has an uncertainty map (omnilabel.uncertainty)")
    hist = {True: np.zeros(_BINS), False: np.zeros(_BINS)}
    sums = {True: 0.0, False: 0.0}
    size = 0
    for ann in data["annotations"]:
        path = paths.get(int(ann["id"]))
        if path is None:
            continue
        weak_id = ann.get("omnilabel", {}).get("weak_id")
        if weak_id not in truth:
            raise InputError(f"{pseudo}: annotation id={ann['id']}: omnilabel.weak_id {weak_id!r} is not an "
                             f"annotation of {gt}")
        h, w = (int(v) for v in ann["segmentation"]["size"])
        pm = mask_utils.decode(segmentation_to_rle(ann["segmentation"], h, w)).astype(bool)
        gm = mask_utils.decode(segmentation_to_rle(truth[weak_id]["segmentation"], h, w)).astype(bool)
        u = read_uncertainty_map(path).values
        bins = np.rint(u.astype(np.float64) * UINT16_MAX).astype(np.int64)
        wrong = pm != gm
        for cls in (True, False):
            sel = wrong == cls
            hist[cls] += np.bincount(bins[sel], minlength=_BINS)
            sums[cls] += float(u[sel].sum(dtype=np.float64))
        size += path.stat().st_size
    n_wrong, n_right = hist[True].sum(), hist[False].sum()
    return {"maps": len(paths), "pixels": int(n_wrong + n_right),
            "wrong_fraction": float(n_wrong / (n_wrong + n_right)),
            "mean_u_wrong": sums[True] / max(n_wrong, 1), "mean_u_correct": sums[False] / max(n_right, 1),
            "auroc": auroc_from_histograms(hist[True], hist[False]) if n_wrong and n_right else float("nan"),
            "bytes_per_map": size / len(paths)}
