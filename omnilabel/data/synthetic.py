"""Seeded synthetic scenes of textured shapes, with exact instance masks, for tests and the demo.

A scene is a smooth, noisy, low-saturation background with a few shapes painted back to front. Each class
has its own geometry and its own base colour (jittered per instance), and every shape carries a shading
gradient and per-pixel noise, so a small model can learn the classes from colour and shape together.
Masks are the *visible* parts after occlusion; a ``ring`` has a hole, so its mask does too.

A shape whose visible area falls under ``min_area_px`` is removed from the scene before anything is painted
(and the shapes it covered are recomputed), so every painted pixel that is not background belongs to an
annotated instance.

Image ``i`` of a dataset depends only on ``(seed, i)``: a dataset of 10 images is a prefix of one of 40
with the same seed, and the same seed always writes the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from omnilabel.errors import InputError
from omnilabel.io import atomic_path
from omnilabel.ops.masks import masks_to_rle, rle_area, rle_to_bbox_xywh

#: Class names; the COCO category id of ``CLASSES[i]`` is ``i + 1``.
CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "ring")
#: Class name → COCO category id (1..K).
CATEGORY_IDS: dict[str, int] = {name: i + 1 for i, name in enumerate(CLASSES)}
SUPERCATEGORY = "shape"
#: Smallest visible area (pixels) an instance keeps after occlusion.
MIN_AREA_PX = 30
#: Smallest image side render_scene accepts: shapes need a few pixels of radius for a ring's hole.
MIN_SIDE_PX = 32

# Base colours far apart in hue and far from the grey background; instances jitter around them.
_CLASS_RGB: dict[str, tuple[int, int, int]] = {
    "circle": (215, 55, 55),
    "square": (55, 175, 75),
    "triangle": (60, 95, 225),
    "ring": (235, 195, 40),
}
_COLOUR_JITTER = 25  # per-channel uniform jitter of an instance's colour
_TEXTURE_SD = 9.0  # per-pixel noise on shapes
_RADIUS_FRAC = (0.08, 0.22)  # shape radius as a fraction of the shorter image side
_RADIUS_MIN_PX = 6.0  # keeps a ring's hole at least 3 px in radius
_RING_HOLE_FRAC = (0.5, 0.62)  # inner radius / outer radius of a ring
_MAX_ATTEMPTS = 50  # scene draws before giving up on min_objects


def coco_categories() -> list[dict[str, Any]]:
    """COCO ``categories`` of the synthetic classes: ``{"id", "name", "supercategory": "shape"}``."""
    return [{"id": CATEGORY_IDS[name], "name": name, "supercategory": SUPERCATEGORY} for name in CLASSES]


def render_scene(
    rng: np.random.Generator,
    *,
    size_hw: tuple[int, int] = (128, 128),
    max_objects: int = 5,
    min_objects: int = 1,
    min_area_px: int = MIN_AREA_PX,
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Draw one scene.

    Args:
        rng: the only source of randomness; the same generator state gives the same scene.
        size_hw: ``(H, W)`` in pixels, each at least ``MIN_SIDE_PX``.
        max_objects: most shapes drawn (before occlusion drops any), >= 1.
        min_objects: fewest instances the scene keeps, in [0, max_objects].
        min_area_px: an instance whose visible area is smaller is removed from the scene.

    Returns:
        ``(image, objects)``: image (H, W, 3) uint8 RGB; objects a list, back to front, of
        ``(category_id, mask)`` with category_id in 1..K and mask (H, W) bool, the visible pixels only.
        Masks are non-empty, pairwise disjoint, and hold at least ``min_area_px`` pixels.

    Raises:
        InputError: a bad size or object count, or ``min_objects`` shapes never fit in 50 draws.
    """
    height, width = _check_size(size_hw)
    if max_objects < 1 or not 0 <= min_objects <= max_objects:
        raise InputError(f"need 0 <= min_objects <= max_objects and max_objects >= 1, "
                         f"got min_objects={min_objects}, max_objects={max_objects}")
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    image = _background(rng, yy, xx)

    for _ in range(_MAX_ATTEMPTS):
        n = int(rng.integers(min_objects, max_objects + 1))
        drawn = [_random_shape(rng, yy, xx) for _ in range(n)]
        kept, visible = _resolve_occlusion([mask for _, mask in drawn], min_area_px=min_area_px)
        if len(kept) >= min_objects:
            break
    else:
        raise InputError(f"could not fit {min_objects} visible objects of >= {min_area_px} px "
                         f"in a {height}x{width} image")

    objects: list[tuple[int, np.ndarray]] = []
    for index, vis in zip(kept, visible, strict=True):
        category_id, mask = drawn[index]
        texture = _shape_texture(rng, CLASSES[category_id - 1], yy, xx)
        image[mask] = texture[mask]
        objects.append((category_id, vis))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), objects


def make_dataset(
    out_dir: str | Path,
    *,
    n_images: int,
    seed: int,
    size_hw: tuple[int, int] = (128, 128),
    max_objects: int = 5,
    min_objects: int = 1,
    json_name: str = "coco.json",
    images_subdir: str = "images",
) -> Path:
    """Write a synthetic COCO instance-segmentation dataset.

    Images go to ``out_dir/images_subdir/000000.png, ...`` and the COCO file to ``out_dir/json_name``:
    ``images`` (ids 1..N, ``file_name`` relative to the images folder, ``height``, ``width``),
    ``categories`` (see :func:`coco_categories`), ``annotations`` (ids 1..M, compressed RLE
    ``segmentation`` with ``counts`` as str, ``bbox`` xywh and ``area`` in pixels from the mask,
    ``iscrowd`` 0). Every file is written to a temporary name and renamed into place.

    Args:
        out_dir: folder to write into (created if missing).
        n_images: number of images, >= 0.
        seed: >= 0; image ``i`` is drawn from ``np.random.default_rng([seed, i])``.
        size_hw: ``(H, W)`` of every image in pixels.
        max_objects: most shapes per image.
        min_objects: fewest instances per image.
        json_name: file name of the COCO JSON inside ``out_dir``.
        images_subdir: folder of the images inside ``out_dir``.

    Returns:
        Path of the COCO JSON.

    Raises:
        InputError: a negative ``n_images`` or ``seed``, or a bad size or object count.
    """
    if n_images < 0:
        raise InputError(f"n_images must be >= 0, got {n_images}")
    if seed < 0:
        raise InputError(f"seed must be >= 0, got {seed}")
    height, width = _check_size(size_hw)
    out_dir = Path(out_dir)
    image_dir = out_dir / images_subdir
    image_dir.mkdir(parents=True, exist_ok=True)

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index in range(n_images):
        rng = np.random.default_rng([seed, index])
        image, objects = render_scene(rng, size_hw=(height, width), max_objects=max_objects,
                                      min_objects=min_objects)
        image_id = index + 1
        file_name = f"{index:06d}.png"
        _write_atomic(image_dir / file_name, lambda f, img=image: Image.fromarray(img).save(f, format="PNG"))
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        if not objects:
            continue
        rles = masks_to_rle(np.stack([mask for _, mask in objects]))
        for (category_id, _), rle in zip(objects, rles, strict=True):
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": category_id,
                "segmentation": rle,
                "area": rle_area(rle),
                "bbox": rle_to_bbox_xywh(rle),
                "iscrowd": 0,
            })

    dataset = {
        "info": {"description": "omnilabel synthetic shapes", "seed": seed, "size_hw": [height, width]},
        "images": images,
        "categories": coco_categories(),
        "annotations": annotations,
    }
    json_path = out_dir / json_name
    text = json.dumps(dataset, separators=(",", ":")) + "\n"
    _write_atomic(json_path, lambda f: f.write(text.encode("utf-8")))
    return json_path


def _check_size(size_hw: tuple[int, int]) -> tuple[int, int]:
    """Validate ``(H, W)``; both at least ``MIN_SIDE_PX``."""
    if len(size_hw) != 2 or min(int(size_hw[0]), int(size_hw[1])) < MIN_SIDE_PX:
        raise InputError(f"size_hw must be (H, W) with both sides >= {MIN_SIDE_PX} px, got {tuple(size_hw)}")
    return int(size_hw[0]), int(size_hw[1])


def _write_atomic(path: Path, write: Callable[[Any], Any]) -> None:
    """Write a file through ``write(binary_file)`` so that ``path`` is never seen half written."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def _upsample_bilinear(coarse: np.ndarray, height: int, width: int) -> np.ndarray:
    """(gh, gw, ...) grid, gh, gw >= 2 → (height, width, ...) by bilinear interpolation (corners aligned)."""
    gh, gw = coarse.shape[:2]
    y = np.linspace(0.0, gh - 1.0, height)
    x = np.linspace(0.0, gw - 1.0, width)
    y0 = np.clip(np.floor(y).astype(int), 0, gh - 2)
    x0 = np.clip(np.floor(x).astype(int), 0, gw - 2)
    fy = (y - y0).reshape((height, 1) + (1,) * (coarse.ndim - 2))
    fx = (x - x0).reshape((1, width) + (1,) * (coarse.ndim - 2))
    top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
    bottom = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Low-saturation grey: tint + linear gradient + smooth noise + pixel noise; (H, W, 3) float64."""
    height, width = yy.shape
    base = rng.uniform(70.0, 180.0) + rng.uniform(-12.0, 12.0, size=3)
    angle = rng.uniform(0.0, 2 * np.pi)
    ramp = ((xx - width / 2) * np.cos(angle) + (yy - height / 2) * np.sin(angle)) / max(height, width)
    gradient = ramp * rng.uniform(0.0, 40.0)
    blobs = _upsample_bilinear(rng.normal(0.0, 1.0, size=(5, 5)), height, width) * rng.uniform(8.0, 25.0)
    tint = _upsample_bilinear(rng.normal(0.0, 4.0, size=(3, 3, 3)), height, width)
    noise = rng.normal(0.0, 6.0, size=(height, width, 3))
    return base + (gradient + blobs)[:, :, None] + tint + noise


def _random_shape(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> tuple[int, np.ndarray]:
    """One shape of a random class, size, position and rotation → ``(category_id, (H, W) bool mask)``."""
    height, width = yy.shape
    side = min(height, width)
    category_id = int(rng.integers(len(CLASSES))) + 1
    lo = max(_RADIUS_FRAC[0] * side, _RADIUS_MIN_PX)
    radius = rng.uniform(lo, max(_RADIUS_FRAC[1] * side, lo + 1.0))
    cy = rng.uniform(0.5 * radius, height - 0.5 * radius)
    cx = rng.uniform(0.5 * radius, width - 0.5 * radius)
    angle = rng.uniform(0.0, 2 * np.pi)
    dy, dx = yy - cy, xx - cx
    name = CLASSES[category_id - 1]
    if name == "circle":
        mask = dy**2 + dx**2 <= radius**2
    elif name == "ring":
        inner = radius * rng.uniform(*_RING_HOLE_FRAC)
        dist2 = dy**2 + dx**2
        mask = (dist2 <= radius**2) & (dist2 >= inner**2)
    elif name == "square":
        half = 0.8 * radius  # about the area of the circle of the same radius
        u = dx * np.cos(angle) + dy * np.sin(angle)
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        mask = (np.abs(u) <= half) & (np.abs(v) <= half)
    else:  # triangle: equilateral, vertices on the circle of this radius
        vertex_angles = angle + np.array([0.0, 2.0, 4.0]) * np.pi / 3
        vy, vx = radius * np.sin(vertex_angles), radius * np.cos(vertex_angles)
        sides = [(vx[(k + 1) % 3] - vx[k]) * (dy - vy[k]) - (vy[(k + 1) % 3] - vy[k]) * (dx - vx[k])
                 for k in range(3)]
        mask = np.all([s >= 0 for s in sides], axis=0) | np.all([s <= 0 for s in sides], axis=0)
    return category_id, mask


def _resolve_occlusion(masks: list[np.ndarray], *, min_area_px: int) -> tuple[list[int], list[np.ndarray]]:
    """Drop shapes whose visible area is under ``min_area_px`` until none is, back to front order kept.

    Removing a shape only uncovers the shapes beneath it, so the loop ends, and shapes that survive keep at
    least ``min_area_px`` visible pixels.

    Args:
        masks: N full (unoccluded) masks, (H, W) bool each, back to front.
        min_area_px: smallest visible area kept.

    Returns:
        ``(kept, visible)``: indices into ``masks`` of the kept shapes, and their visible (H, W) bool masks.
    """
    kept = list(range(len(masks)))
    while True:
        visible: list[np.ndarray] = []
        covered = np.zeros(masks[0].shape, dtype=bool) if masks else None
        for index in reversed(kept):
            visible.append(masks[index] & ~covered)
            covered |= masks[index]
        visible.reverse()
        small = {index for index, vis in zip(kept, visible, strict=True) if int(vis.sum()) < min_area_px}
        if not small:
            return kept, visible
        kept = [index for index in kept if index not in small]


def _shape_texture(rng: np.random.Generator, name: str, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Jittered class colour + shading gradient + per-pixel noise over the whole frame; (H, W, 3) float64."""
    height, width = yy.shape
    colour = np.asarray(_CLASS_RGB[name], dtype=np.float64)
    colour = colour + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, size=3)
    angle = rng.uniform(0.0, 2 * np.pi)
    ramp = ((xx - width / 2) * np.cos(angle) + (yy - height / 2) * np.sin(angle)) / max(height, width)
    shading = ramp * rng.uniform(0.0, 30.0)
    noise = rng.normal(0.0, _TEXTURE_SD, size=(height, width, 3))
    return colour + shading[:, :, None] + noise
