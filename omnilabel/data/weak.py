"""Weak annotation types, and simulating a weakly labelled dataset from a fully labelled one.

An annotation's weak type is decided by the one geometry it carries (``segmentation``, ``bbox`` or
``point``; see ``omnilabel.data.coco``); one with none of them is an image-level tag.

``split_coco`` reproduces the omni-supervised setting: a fraction of the images keeps its masks, every
other annotation is reduced to tags, points or boxes. Choices the papers leave open:

- The fully labelled images are the first ``round(fully * N)`` of a ``numpy.random.default_rng(seed)``
  permutation of all N images (images without annotations count too; Python's ``round`` rounds half to
  even). All other draws come from the same generator, in annotation file order, so a split is
  reproducible to the byte.
- A point is one pixel drawn uniformly among the mask's pixels, written as its centre
  ``[col + 0.5, row + 0.5]``: ``mask[int(y), int(x)]`` is that pixel. An annotation with a bbox and no
  mask gets a point drawn uniformly in its box (clipped to the image).
- A box is the tight bbox of the mask, COCO ``[x, y, w, h]`` in pixel-edge coordinates (as pycocotools'
  ``toBbox``).
- Boxes and points keep every other field of the annotation (``area`` and ``iscrowd`` included).
- A tag keeps only ``id``, ``image_id``, ``category_id`` (and ``iscrowd``); an image with several
  instances of one class keeps one tag per instance — the teachers use the set of classes.
- An annotation that cannot take the requested type (an empty mask; a point asked to become a box; a tag)
  becomes a tag, and is counted in ``omnilabel_split["n_degraded_to_tags"]``.
- Crowd annotations are converted like the others and keep ``iscrowd``.
"""

from __future__ import annotations

import copy
import math
from enum import Enum
from typing import Any, Literal, get_args

import numpy as np
from pycocotools import mask as mask_utils

from omnilabel.data.coco import GEOMETRY_KEYS, has_geometry
from omnilabel.errors import InputError
from omnilabel.ops.masks import segmentation_to_rle


class WeakType(str, Enum):
    """What an annotation tells about its object; the value is the ``--weak`` spelling."""

    FULL = "full"  # has a segmentation (a bbox beside it is derived from the mask)
    BOX = "boxes"  # bbox [x, y, w, h], no segmentation
    POINT = "points"  # point [x, y] in float pixels
    TAG = "tags"  # none of the three: the class is present in the image
    NONE = "none"  # an image with no annotations at all


#: The weak label a split reduces annotations to; ``mixed`` draws one of the three per annotation.
SplitWeak = Literal["tags", "points", "boxes", "mixed", "mixed-images"]

_SPLIT_WEAK: tuple[str, ...] = get_args(SplitWeak)
_MIXED_TYPES = (WeakType.TAG, WeakType.POINT, WeakType.BOX)
_TAG_KEYS = ("id", "image_id", "category_id", "iscrowd")


def weak_type_of(ann: dict[str, Any]) -> WeakType:
    """Weak type of one annotation.

    Raises:
        InputError: the annotation has both ``bbox`` and ``point`` and no ``segmentation``.
    """
    if has_geometry(ann, "segmentation"):
        return WeakType.FULL
    has_box, has_point = has_geometry(ann, "bbox"), has_geometry(ann, "point")
    if has_box and has_point:
        raise InputError(f"annotation id={ann.get('id')}: bbox, point: both given; an annotation carries "
                         "one weak geometry")
    if has_box:
        return WeakType.BOX
    if has_point:
        return WeakType.POINT
    return WeakType.TAG


def _as_tag(ann: dict[str, Any]) -> dict[str, Any]:
    return {k: copy.deepcopy(ann[k]) for k in _TAG_KEYS if k in ann}


def _rle_run_lengths(counts: bytes) -> np.ndarray:
    """Run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString``): background first,
    alternating, column-major. Reading them avoids decoding the full (H, W) mask."""
    runs: list[int] = []
    p = 0
    while p < len(counts):
        value, shift, more = 0, 0, True
        while more:
            c = counts[p] - 48
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            p += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return np.asarray(runs, dtype=np.int64)


def _point_in_mask(rle: dict[str, Any], area_px: int, rng: np.random.Generator) -> list[float]:
    """Centre of one pixel drawn uniformly among the ``area_px > 0`` pixels of a compressed RLE."""
    runs = _rle_run_lengths(rle["counts"])
    fg_starts = (np.cumsum(runs) - runs)[1::2]  # column-major index of each foreground run's first pixel
    fg_ends = np.cumsum(runs[1::2])  # foreground pixels up to the end of each run
    k = int(rng.integers(area_px))
    j = int(np.searchsorted(fg_ends, k, side="right"))
    index = int(fg_starts[j] + k - (fg_ends[j] - runs[2 * j + 1]))
    height = int(rle["size"][0])
    return [float(index // height) + 0.5, float(index % height) + 0.5]


def _point_in_box(bbox_xywh: list[float], size_hw: tuple[int, int], rng: np.random.Generator) -> list[float]:
    """A point drawn uniformly in a box, kept inside the image so that int(x), int(y) index a pixel."""
    x, y, w, h = (float(v) for v in bbox_xywh)
    u, v = rng.random(2)
    img_h, img_w = size_hw
    px = min(max(x + u * w, 0.0), math.nextafter(float(img_w), 0.0))
    py = min(max(y + v * h, 0.0), math.nextafter(float(img_h), 0.0))
    return [px, py]


def _to_weak(ann: dict[str, Any], target: WeakType, size_hw: tuple[int, int],
             rng: np.random.Generator) -> tuple[dict[str, Any], bool]:
    """One annotation reduced to ``target``; the flag is false when it had to become a tag instead."""
    if target is WeakType.TAG:
        return _as_tag(ann), True
    source = weak_type_of(ann)
    out = {k: copy.deepcopy(v) for k, v in ann.items() if k not in GEOMETRY_KEYS}
    if source is WeakType.FULL:
        rle = segmentation_to_rle(ann["segmentation"], *size_hw)
        area_px = int(mask_utils.area(rle))
        if area_px == 0:
            return _as_tag(ann), False
        if target is WeakType.BOX:
            out["bbox"] = [float(v) for v in mask_utils.toBbox(rle)]
        else:
            out["point"] = _point_in_mask(rle, area_px, rng)
    elif source is WeakType.BOX:
        if target is WeakType.BOX:
            out["bbox"] = [float(v) for v in ann["bbox"]]
        else:
            out["point"] = _point_in_box(ann["bbox"], size_hw, rng)
    elif source is WeakType.POINT and target is WeakType.POINT:
        out["point"] = [float(v) for v in ann["point"]]
    else:
        return _as_tag(ann), False
    return out, True


def split_coco(data: dict[str, Any], *, fully: float, weak: SplitWeak, seed: int) -> dict[str, Any]:
    """Simulate a weakly labelled dataset: masks on a fraction of the images, weak labels elsewhere.

    Args:
        data: a validated COCO dict (see ``omnilabel.data.coco.load_coco``); not modified.
        fully: fraction in [0, 1] of the images that keep their annotations untouched.
        weak: what every other annotation becomes: ``tags``, ``points``, ``boxes``, ``mixed`` (one of the
            three drawn uniformly per annotation), or ``mixed-images`` (one of the three drawn per image, so
            each image carries one kind of label: the omni-supervised setting).
        seed: seed of the ``numpy.random.Generator`` behind every draw (a non-negative integer).

    Returns:
        A new COCO dict: ``images``, ``categories`` and other top-level keys copied, annotations in the
        same order with the same ids, and ``omnilabel_split``: ``{"fully", "weak", "seed",
        "full_image_ids" (file order), "n_degraded_to_tags"}`` (replacing any earlier one).

    Raises:
        InputError: ``fully`` outside [0, 1], an unknown ``weak``, a bad seed, or an annotation of an
            unknown image.
    """
    if not isinstance(fully, int | float) or isinstance(fully, bool) or not 0.0 <= fully <= 1.0:
        raise InputError(f"fully: expected a fraction in [0, 1], got {fully!r}")
    if weak not in _SPLIT_WEAK:
        raise InputError(f"weak: expected one of {', '.join(_SPLIT_WEAK)}, got {weak!r}")
    if not isinstance(seed, int | np.integer) or isinstance(seed, bool) or seed < 0:
        raise InputError(f"seed: expected a non-negative integer, got {seed!r}")
    images = data["images"]
    rng = np.random.default_rng(int(seed))
    n_full = round(fully * len(images))
    full_positions = set(rng.permutation(len(images))[:n_full].tolist())
    full_image_ids = [img["id"] for i, img in enumerate(images) if i in full_positions]
    full_set = set(full_image_ids)
    sizes = {img["id"]: (int(img["height"]), int(img["width"])) for img in images}

    # Per-image draws come from their own stream, so the other modes draw exactly what they always did.
    image_rng = np.random.default_rng([int(seed), 1])
    image_types = {img["id"]: _MIXED_TYPES[int(image_rng.integers(3))] for img in images}
    annotations: list[dict[str, Any]] = []
    n_degraded = 0
    for ann in data["annotations"]:
        image_id = ann["image_id"]
        if image_id not in sizes:
            raise InputError(f"annotation id={ann.get('id')}: image_id: no image with id {image_id}")
        if image_id in full_set:
            annotations.append(copy.deepcopy(ann))
            continue
        if weak == "mixed":
            target = _MIXED_TYPES[int(rng.integers(3))]
        else:
            target = image_types[image_id] if weak == "mixed-images" else WeakType(weak)
        new, ok = _to_weak(ann, target, sizes[image_id], rng)
        annotations.append(new)
        n_degraded += not ok

    out = {k: annotations if k == "annotations" else copy.deepcopy(v)
           for k, v in data.items() if k != "omnilabel_split"}
    out["omnilabel_split"] = {"fully": float(fully), "weak": weak, "seed": int(seed),
                              "full_image_ids": full_image_ids, "n_degraded_to_tags": n_degraded}
    return out


def summarize_weak(data: dict[str, Any]) -> dict[str, int]:
    """Annotations per weak type, and images without annotations.

    Returns:
        ``{"full": n, "boxes": n, "points": n, "tags": n, "none": n_images_without_annotations}``
        (every ``WeakType`` value, zeros included).
    """
    counts = {t.value: 0 for t in WeakType}
    for ann in data["annotations"]:
        counts[weak_type_of(ann).value] += 1
    annotated = {ann["image_id"] for ann in data["annotations"]}
    counts[WeakType.NONE.value] = sum(1 for img in data["images"] if img["id"] not in annotated)
    return counts
