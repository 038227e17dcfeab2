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
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from omnilabel.data.coco import (
    GEOMETRY_KEYS,
    annotations_by_image,
    check_image_files,
    has_geometry,
    load_coco,
    write_coco,
)
from omnilabel.errors import InputError
from omnilabel.ops.masks import segmentation_to_rle


class WeakType(str, Enum):
    """What one annotation tells about its object (or, ``NONE``, that an image has no annotation at all).

    The value is the word used in outputs (``omnilabel.weak``) and in ``--weak``.
    """

    FULL = "full"  # has a segmentation (a bbox beside it is derived from the mask)
    BOX = "boxes"  # bbox [x, y, w, h], no segmentation
    POINT = "points"  # point [x, y] in float pixels
    TAG = "tags"  # none of the three: the class is present in the image
    NONE = "none"  # an image with no annotations at all


class WeakMode(str, Enum):
    """Which weak labels a job uses (``--weak``): the command-line option and the library take this enum.

    ``AUTO``: each annotation by what it carries, an image without annotations as unlabelled (``NONE``).
    ``POINTS`` / ``BOXES``: every annotation without a mask must carry a point / a box. ``TAGS``: only the
    classes annotated on each image. ``NONE``: ignore the labels; look for every class of the dataset.
    """

    AUTO = "auto"
    NONE = "none"
    TAGS = "tags"
    POINTS = "points"
    BOXES = "boxes"


class SplitWeak(str, Enum):
    """What ``split`` reduces annotations to: one weak type, or a mix drawn per annotation or per image."""

    TAGS = "tags"
    POINTS = "points"
    BOXES = "boxes"
    MIXED = "mixed"
    MIXED_IMAGES = "mixed-images"


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


def split_coco(data: dict[str, Any], *, fully: float, weak: SplitWeak | str, seed: int) -> dict[str, Any]:
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
    try:
        weak = SplitWeak(weak)
    except ValueError:
        raise InputError(f"weak: expected one of {', '.join(w.value for w in SplitWeak)}, got {weak!r}") from None
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
        if weak is SplitWeak.MIXED:
            target = _MIXED_TYPES[int(rng.integers(3))]
        else:
            target = image_types[image_id] if weak is SplitWeak.MIXED_IMAGES else WeakType(weak.value)
        new, ok = _to_weak(ann, target, sizes[image_id], rng)
        annotations.append(new)
        n_degraded += not ok

    out = {k: annotations if k == "annotations" else copy.deepcopy(v)
           for k, v in data.items() if k != "omnilabel_split"}
    out["omnilabel_split"] = {"fully": float(fully), "weak": weak.value, "seed": int(seed),
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


def validate_file(coco: str | Path, *, images_dir: str | Path | None = None,
                  allow_outside_images: bool = False) -> dict[str, Any]:
    """``omnilabel validate``: check a COCO file and decode every image it names; count its weak types.

    Args:
        coco: the COCO JSON file.
        images_dir: the folder ``file_name``s are relative to (default: the JSON's folder).
        allow_outside_images: accept ``file_name`` values that are absolute or climb out with ``..``.

    Returns:
        ``images``, ``annotations`` (counts) and ``weak`` (annotations per weak type, ``summarize_weak``).

    Raises:
        InputError: every problem of the file, or of its image files, at once.
    """
    coco = Path(coco)
    images_dir = Path(images_dir) if images_dir is not None else coco.parent
    data = load_coco(coco, images_dir=images_dir, allow_outside_images=allow_outside_images)
    problems = check_image_files(data, images_dir, allow_outside_images=allow_outside_images)
    if problems:
        raise InputError(f"{coco}: {len(problems)} image problem(s)", problems)
    return {"images": len(data["images"]), "annotations": len(data["annotations"]), "weak": summarize_weak(data)}


def split_file(coco: str | Path, *, output: str | Path, fully: float, weak: SplitWeak | str,
               seed: int) -> dict[str, int]:
    """``split_coco`` from a COCO file to a new one (written atomically).

    Returns:
        ``summarize_weak`` of the written file.

    Raises:
        InputError: a bad input file (nothing is written) or bad settings.
    """
    result = split_coco(load_coco(coco, allow_outside_images=True), fully=fully, weak=weak, seed=seed)
    write_coco(result, output)
    return summarize_weak(result)


# -- the weak plan of a job ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ImagePlan:
    """What a job does with one image, decided once on the driver from the file and the ``--weak`` mode.

    Plain data: it travels with the image's task to any worker (``to_dict`` / ``from_dict``).

    Attributes:
        image_id: the COCO image id.
        kinds: per annotation of the image, in file order, the weak type it is used as (``FULL`` passes
            through; under ``TAGS`` and ``NONE`` every other annotation counts as a ``TAG``).
        detect: what the detector looks for on this image: ``TAG`` the classes tagged on it, ``NONE`` every
            class of the dataset (unlabelled images, or ``--weak none``), None nothing (points may still use
            detections of their own classes for Algorithm 1).
        left_out: why the image is not in the output (it needs a detector and there is none), or None.
    """

    image_id: int
    kinds: tuple[WeakType, ...]
    detect: WeakType | None = None
    left_out: str | None = None

    @property
    def needs_detector(self) -> bool:
        """Only a detector can label (part of) this image: it has tags or no labels at all."""
        return self.detect is not None

    def has(self, kind: WeakType) -> bool:
        return kind in self.kinds

    def to_dict(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "kinds": [k.value for k in self.kinds],
                "detect": self.detect.value if self.detect is not None else None, "left_out": self.left_out}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImagePlan:
        detect = d.get("detect")
        return cls(int(d["image_id"]), tuple(WeakType(k) for k in d["kinds"]),
                   WeakType(detect) if detect is not None else None, d.get("left_out"))


@dataclass(frozen=True)
class WeakPlan:
    """The plan of a whole job: one ``ImagePlan`` per image (file order) and every problem found.

    Attributes:
        mode: the ``--weak`` mode. images: per image, in file order. has_detector: whether the job has one.
        problems: one line each, naming the file, the record and the field; a job with problems does not start.
    """

    mode: WeakMode
    images: tuple[ImagePlan, ...]
    has_detector: bool = True
    problems: tuple[str, ...] = ()

    @property
    def kept(self) -> list[ImagePlan]:
        """The images that go into the output."""
        return [p for p in self.images if p.left_out is None]

    @property
    def left_out(self) -> list[ImagePlan]:
        return [p for p in self.images if p.left_out is not None]

    def uses_detector(self, *, refine_points: bool = True) -> bool:
        """Whether the job runs a detector: it has one, and a kept image has tags, no labels, or (with
        refinement) points."""
        return self.has_detector and any(p.needs_detector or (refine_points and p.has(WeakType.POINT))
                                         for p in self.kept)

    def raise_problems(self, source: str, *, max_problems: int = 20) -> None:
        """Raises InputError listing the problems (the first ``max_problems``), if there are any."""
        if not self.problems:
            return
        shown = list(self.problems[:max_problems])
        if len(self.problems) > max_problems:
            shown.append(f"... and {len(self.problems) - max_problems} more")
        raise InputError(f"{source}: {len(self.problems)} problem(s) with --weak {self.mode.value}", shown)


_MODE_GEOMETRY = {WeakMode.POINTS: (WeakType.POINT, "point"), WeakMode.BOXES: (WeakType.BOX, "bbox")}


def plan_image(annotations: list[dict[str, Any]], mode: WeakMode | str, *, image_id: int = 0,
               has_detector: bool = True, source: str = "<coco>") -> tuple[ImagePlan, list[str]]:
    """The plan of one image (see ``plan_weak``) and the problems of its annotations."""
    mode = WeakMode(mode)
    problems: list[str] = []
    kinds: list[WeakType] = []
    for ann in annotations:
        kind = weak_type_of(ann)
        if kind is not WeakType.FULL and mode in (WeakMode.TAGS, WeakMode.NONE):
            kind = WeakType.TAG
        if mode in _MODE_GEOMETRY and kind not in (WeakType.FULL, _MODE_GEOMETRY[mode][0]):
            field_name = _MODE_GEOMETRY[mode][1]
            problems.append(f"{source}: annotation id={ann.get('id')}: {field_name}: --weak {mode.value} needs a "
                            f"{field_name} on every annotation without a segmentation (this one is {kind.value}); "
                            "use --weak auto for mixed files")
        kinds.append(kind)
    full = WeakType.FULL in kinds
    detect: WeakType | None = None
    if mode is WeakMode.NONE and not full:
        detect = WeakType.NONE
    elif mode is WeakMode.TAGS and not full and WeakType.TAG in kinds:
        detect = WeakType.TAG
    elif mode is WeakMode.AUTO:
        # An image with only GT masks runs no detector; one that also has tags does, and its detections that
        # repeat an annotated object are dropped (teachers.pipeline).
        detect = WeakType.NONE if not kinds else (WeakType.TAG if WeakType.TAG in kinds else None)
    left_out = None
    if detect is not None and not has_detector:
        left_out = ("image-level tags need a detector" if detect is WeakType.TAG
                    else "an image without labels needs a detector")
    return ImagePlan(int(image_id), tuple(kinds), detect, left_out), problems


def plan_weak(data: dict[str, Any], mode: WeakMode | str, *, has_detector: bool,
              source: str = "<coco>") -> WeakPlan:
    """Plan a job: per image, the weak type each annotation is used as, what the detector looks for, and
    whether the image is left out. Pure: no file is opened, no model is loaded.

    Rules:
        - ``FULL`` annotations pass through untouched under every mode.
        - ``POINTS`` / ``BOXES``: every other annotation must carry a point / a bbox (each misfit is a problem).
        - ``TAGS``: an image's tags are detected, unless it has a GT mask (it is fully annotated).
        - ``NONE``: every class is detected on each image without a GT mask; other annotations are ignored.
        - ``AUTO``: each annotation by its own type; tags are detected (also beside GT masks: detections of
          an annotated object are dropped later); an image without annotations is unlabelled (every class).
        - Without a detector (``--detector none``): under ``AUTO`` the images that need one are left out
          whole (keeping such an image with its other labels would teach a student that its tagged objects
          are background); ``TAGS`` and ``NONE``, or ``AUTO`` when every image would be left out, are a
          problem.

    Args:
        data: a validated COCO dict.
        mode: the ``--weak`` mode.
        has_detector: whether the job has a detector.
        source: the file's name, for problems.

    Returns:
        The ``WeakPlan`` (check ``problems`` before running).
    """
    mode = WeakMode(mode)
    images: list[ImagePlan] = []
    problems: list[str] = []
    for image_id, anns in annotations_by_image(data).items():
        plan, found = plan_image(anns, mode, image_id=image_id, has_detector=has_detector, source=source)
        images.append(plan)
        problems += found
    if not has_detector and not problems:
        kept = [p for p in images if p.left_out is None]
        if mode in (WeakMode.TAGS, WeakMode.NONE) or (images and not kept):
            problems.append(f"{source}: --weak {mode.value}: the images have image-level tags or no labels, which "
                            "need a detector; drop `--detector none` (or use --weak points/boxes)")
    return WeakPlan(mode, tuple(images), has_detector, tuple(problems))
