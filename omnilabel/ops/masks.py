"""Mask conversions: boolean arrays, COCO RLE (compressed, ``counts`` as str) and polygons."""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


def masks_to_rle(masks: np.ndarray) -> list[dict[str, Any]]:
    """Encode boolean masks as compressed COCO RLE.

    Args:
        masks: (N, H, W) bool.

    Returns:
        N dicts ``{"size": [H, W], "counts": str}`` (JSON-ready).
    """
    m = np.asarray(masks, dtype=bool)
    if m.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {m.shape}")
    if m.shape[0] == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0).astype(np.uint8)))
    out = []
    for r in rles:
        counts = r["counts"]
        out.append({"size": [int(r["size"][0]), int(r["size"][1])],
                    "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts})
    return out


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """Any COCO segmentation (polygon list, uncompressed RLE, compressed RLE) to compressed RLE.

    Args:
        segmentation: as found in a COCO annotation.
        height: image height in pixels.
        width: image width in pixels.

    Returns:
        ``{"size": [H, W], "counts": bytes}`` as pycocotools uses it.
    """
    if isinstance(segmentation, list):
        rles = mask_utils.frPyObjects(segmentation, height, width)
        return mask_utils.merge(rles)
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        return mask_utils.frPyObjects(segmentation, height, width)
    counts = segmentation["counts"]
    return {"size": list(segmentation["size"]),
            "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def rle_to_masks(rles: list[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """Decode COCO segmentations (any form) to boolean masks.

    Args:
        rles: N segmentations (RLE dicts or polygon lists).
        height: image height in pixels.
        width: image width in pixels.

    Returns:
        (N, H, W) bool.
    """
    if not rles:
        return np.zeros((0, height, width), dtype=bool)
    encoded = [segmentation_to_rle(r, height, width) for r in rles]
    return mask_utils.decode(encoded).transpose(2, 0, 1).astype(bool)


def rle_area(rle: dict[str, Any]) -> int:
    """Number of foreground pixels of one compressed RLE."""
    return int(mask_utils.area(segmentation_to_rle(rle, *rle["size"])))


def rle_to_bbox_xywh(rle: dict[str, Any]) -> list[float]:
    """COCO ``[x, y, w, h]`` bbox of one compressed RLE (zeros when empty)."""
    return [float(v) for v in mask_utils.toBbox(segmentation_to_rle(rle, *rle["size"]))]


def mask_iou(masks_a: np.ndarray, masks_b: np.ndarray) -> np.ndarray:
    """Elementwise IoU of paired masks.

    Args:
        masks_a: (N, H, W) bool.
        masks_b: (N, H, W) bool.

    Returns:
        (N,) float64; 1.0 where both masks are empty.
    """
    a = np.asarray(masks_a, dtype=bool).reshape(len(masks_a), -1)
    b = np.asarray(masks_b, dtype=bool).reshape(len(masks_b), -1)
    inter = (a & b).sum(axis=1)
    union = (a | b).sum(axis=1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def rle_iou_matrix(rles_a: list[dict[str, Any]], rles_b: list[dict[str, Any]]) -> np.ndarray:
    """Pairwise mask IoU of compressed RLEs of one image (computed on the runs, nothing decoded).

    Args:
        rles_a: N COCO RLE dicts (``counts`` str or bytes). rles_b: M of the same size.

    Returns:
        (N, M) float64 in [0, 1]; 0 where a mask is empty.
    """
    if not rles_a or not rles_b:
        return np.zeros((len(rles_a), len(rles_b)), dtype=np.float64)
    a = [segmentation_to_rle(r, *r["size"]) for r in rles_a]
    b = [segmentation_to_rle(r, *r["size"]) for r in rles_b]
    return np.asarray(mask_utils.iou(a, b, [0] * len(b)), dtype=np.float64).reshape(len(a), len(b))


def covered_by_same_class(rles: list[dict[str, Any]], category_ids: np.ndarray, ref_rles: list[dict[str, Any]],
                          ref_category_ids: np.ndarray, *, iou_thresh: float) -> np.ndarray:
    """Which masks repeat an object already annotated: mask IoU ≥ ``iou_thresh`` with a reference mask of
    the same class.

    Args:
        rles: N compressed RLEs (e.g. detections' masks). category_ids: (N,) int.
        ref_rles: M compressed RLEs of the annotated objects. ref_category_ids: (M,) int.
        iou_thresh: in (0, 1].

    Returns:
        (N,) bool.
    """
    iou = rle_iou_matrix(rles, ref_rles)
    if iou.size == 0:
        return np.zeros(len(rles), dtype=bool)
    same = np.asarray(category_ids)[:, None] == np.asarray(ref_category_ids)[None, :]
    return ((iou >= iou_thresh) & same).any(axis=1)
