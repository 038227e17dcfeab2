"""COCO files: read and validate, write, index.

Validation runs before any model loads and reports every problem at once, each as
``<file>: <record>: <field>: <what is wrong>``; the record is ``image id=3``, ``annotation id=7``,
``category id=2``, or ``images[4]`` (its position) when it has no usable id. Checked conventions: ids are
integers, unique within their list; an annotation carries at most one weak geometry — ``segmentation``
(polygons or RLE; a ``bbox`` beside it is derived), ``bbox`` ``[x, y, w, h]`` or ``point`` ``[x, y]``
(float pixels), a ``null`` one counting as absent; a bbox may overhang the image by ``BBOX_TOLERANCE_PX``
(tools round outward), a point lies in ``[0, W] x [0, H]``; ``file_name`` is relative to the images
directory and its normalized path stays inside it unless allowed (symbolic links are not followed).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np

from omnilabel.data.images import read_image_rgb
from omnilabel.errors import InputError
from omnilabel.io import read_json, write_json_atomic

#: How far (pixels) a bbox may extend beyond the image border before it is refused.
BBOX_TOLERANCE_PX = 1.0

#: Annotation keys that carry a geometry; which one is present decides the weak type.
GEOMETRY_KEYS = ("segmentation", "bbox", "point")

_REQUIRED_LISTS = ("images", "annotations", "categories")


def has_geometry(ann: dict[str, Any], key: str) -> bool:
    """Whether annotation ``ann`` carries geometry ``key`` (present and not ``null``)."""
    return ann.get(key) is not None


def _is_int(v: Any) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _short(v: Any, limit: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _record(kind: str, list_name: str, index: int, rec: Any) -> str:
    if isinstance(rec, dict) and _is_int(rec.get("id")):
        return f"{kind} id={rec['id']}"
    return f"{list_name}[{index}]"


def _outside_reason(file_name: str) -> str | None:
    if os.path.isabs(file_name):
        return "is an absolute path"
    norm = os.path.normpath(file_name)
    if norm == os.pardir or norm.startswith(os.pardir + os.sep):
        return "climbs out of the images directory ('..')"
    return None


def resolve_image_path(images_dir: Path, file_name: str, *, allow_outside_images: bool = False) -> Path:
    """Path of the image a COCO ``file_name`` names: ``images_dir / normpath(file_name)``, or ``file_name``
    itself when absolute and allowed.

    Raises:
        InputError: ``file_name`` leaves ``images_dir`` and ``allow_outside_images`` is false.
    """
    reason = _outside_reason(file_name)
    if reason is not None and not allow_outside_images:
        raise InputError(f"file_name {file_name!r} {reason}; allow images outside {images_dir} to accept it")
    if os.path.isabs(file_name):
        return Path(file_name)
    return Path(images_dir) / os.path.normpath(file_name)


class _Problems:
    """Collects ``<source>: <record>: <field>: <message>`` lines."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: list[str] = []

    def add(self, record: str, field: str | None, message: str) -> None:
        where = f"{record}: {field}" if field else record
        self.lines.append(f"{self.source}: {where}: {message}")


_Want = Literal["integer", "positive integer", "non-empty string"]
_WANTS: dict[str, Callable[[Any], bool]] = {
    "integer": _is_int, "positive integer": lambda v: _is_int(v) and v > 0,
    "non-empty string": lambda v: isinstance(v, str) and v != ""}


def _check_field(out: _Problems, rec: str, obj: dict[str, Any], key: str, want: _Want) -> bool:
    """Report ``obj[key]`` missing or not what is wanted; whether it is good."""
    if key not in obj:
        out.add(rec, key, "missing")
        return False
    if not _WANTS[want](obj[key]):
        out.add(rec, key, f"expected a {want}, got {_short(obj[key])}")
        return False
    return True


def _each_record(out: _Problems, items: list[Any], kind: str,
                 list_name: str) -> Iterator[tuple[str, dict[str, Any], bool]]:
    """Yield ``(record name, record, whether its id is valid and new)`` for each object of a list, having
    reported entries that are not objects and bad or duplicate ids."""
    first: dict[int, int] = {}
    for i, obj in enumerate(items):
        rec = _record(kind, list_name, i, obj)
        if not isinstance(obj, dict):
            out.add(rec, None, f"expected an object, got {_short(obj)}")
            continue
        new_id = _check_field(out, rec, obj, "id", "integer")
        if new_id and obj["id"] in first:
            out.add(rec, "id", f"duplicate (also {list_name}[{first[obj['id']]}])")
            new_id = False
        elif new_id:
            first[obj["id"]] = i
        yield rec, obj, new_id


def _bbox_problems(bbox: Any, size_hw: tuple[int, int] | None) -> list[str]:
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        return [f"expected 4 finite numbers [x, y, w, h], got {_short(bbox)}"]
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return [f"width and height must be > 0, got w={w}, h={h}"]
    if size_hw is not None:
        img_h, img_w = size_hw
        tol = BBOX_TOLERANCE_PX
        if x < -tol or y < -tol or x + w > img_w + tol or y + h > img_h + tol:
            return [f"{_short(bbox)} lies outside the image (width {img_w}, height {img_h}; tolerance {tol} px)"]
    return []


def _point_problems(point: Any, size_hw: tuple[int, int] | None) -> list[str]:
    if not isinstance(point, list) or len(point) != 2 or not all(_is_number(v) for v in point):
        return [f"expected 2 finite numbers [x, y], got {_short(point)}"]
    if size_hw is not None:
        img_h, img_w = size_hw
        x, y = point
        if not (0 <= x <= img_w and 0 <= y <= img_h):
            return [f"{_short(point)} lies outside the image [0, {img_w}] x [0, {img_h}]"]
    return []


def _segmentation_problems(seg: Any, size_hw: tuple[int, int] | None) -> list[str]:
    if isinstance(seg, list):
        if not seg:
            return ["empty polygon list"]
        out = []
        for k, poly in enumerate(seg):
            if not isinstance(poly, list) or not all(_is_number(v) for v in poly):
                out.append(f"polygon {k}: expected a list of finite numbers, got {_short(poly)}")
            elif len(poly) % 2:
                out.append(f"polygon {k}: odd number of coordinates ({len(poly)})")
            elif len(poly) < 6:
                out.append(f"polygon {k}: {len(poly) // 2} points; a polygon needs at least 3 (6 coordinates)")
        return out
    if isinstance(seg, dict):
        size = seg.get("size")
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
            return [f"RLE size: expected [height, width], got {_short(size)}"]
        if size_hw is not None and list(size) != list(size_hw):
            return [f"RLE size {size} differs from the image's [height, width] = {list(size_hw)}"]
        counts = seg.get("counts")
        if isinstance(counts, str) and counts:
            return []
        if isinstance(counts, list) and all(_is_int(c) and c >= 0 for c in counts):
            if sum(counts) != size[0] * size[1]:
                return [f"RLE counts sum to {sum(counts)}, expected height * width = {size[0] * size[1]}"]
            return []
        return [f"RLE counts: expected a string or a list of non-negative integers, got {_short(counts)}"]
    return [f"expected a polygon list or an RLE object, got {_short(seg)}"]


_GEOMETRY_CHECKS = {"segmentation": _segmentation_problems, "bbox": _bbox_problems, "point": _point_problems}


def validate_coco(data: Any, *, source: str = "<coco>", allow_outside_images: bool = False) -> list[str]:
    """Every problem of parsed COCO JSON ``data`` (see the module docstring), in file order, one line each:
    ``<source>: <record>: <field>: <what is wrong>``; empty when valid. ``allow_outside_images`` accepts
    ``file_name`` values that are absolute or climb out with ``..``."""
    out = _Problems(source)
    if not isinstance(data, dict):
        out.add("top level", None, f"expected a JSON object, got {type(data).__name__}")
        return out.lines
    lists: dict[str, list[Any]] = {}
    for key in _REQUIRED_LISTS:
        if key not in data:
            out.add("top level", key, "missing (a list is required)")
        elif not isinstance(data[key], list):
            out.add("top level", key, f"expected a list, got {type(data[key]).__name__}")
        else:
            lists[key] = data[key]

    # Images: id -> (height, width), or None when the size itself is bad (reported once, here).
    image_sizes: dict[int, tuple[int, int] | None] = {}
    for rec, img, new_id in _each_record(out, lists.get("images", []), "image", "images"):
        sizes_ok = all([_check_field(out, rec, img, k, "positive integer") for k in ("height", "width")])
        if new_id:
            image_sizes[img["id"]] = (img["height"], img["width"]) if sizes_ok else None
        if _check_field(out, rec, img, "file_name", "non-empty string") and not allow_outside_images:
            if (reason := _outside_reason(img["file_name"])) is not None:
                out.add(rec, "file_name", f"{img['file_name']!r} {reason}; refused unless images outside the "
                        "directory are allowed")

    category_ids: set[int] = set()
    for rec, cat, new_id in _each_record(out, lists.get("categories", []), "category", "categories"):
        if new_id:
            category_ids.add(cat["id"])
        _check_field(out, rec, cat, "name", "non-empty string")

    for rec, ann, _ in _each_record(out, lists.get("annotations", []), "annotation", "annotations"):
        size_hw = None
        if _check_field(out, rec, ann, "image_id", "integer") and "images" in lists:
            if ann["image_id"] not in image_sizes:
                out.add(rec, "image_id", f"no image with id {ann['image_id']}")
            else:
                size_hw = image_sizes[ann["image_id"]]
        if _check_field(out, rec, ann, "category_id", "integer") and "categories" in lists:
            if ann["category_id"] not in category_ids:
                out.add(rec, "category_id", f"no category with id {ann['category_id']}")
        if has_geometry(ann, "bbox") and has_geometry(ann, "point") and not has_geometry(ann, "segmentation"):
            out.add(rec, "bbox, point", "both given: an annotation carries one weak geometry; "
                    "keep one, or make two annotations")
        for key, problems_of in _GEOMETRY_CHECKS.items():
            for msg in problems_of(ann[key], size_hw) if has_geometry(ann, key) else []:
                out.add(rec, key, msg)
    return out.lines


def _capped(problems: list[str], max_problems: int) -> list[str]:
    limit = max(max_problems, 0)
    if len(problems) <= limit:
        return problems
    return problems[:limit] + [f"... and {len(problems) - limit} more"]


def load_coco(path: str | Path, *, images_dir: str | Path | None = None, allow_outside_images: bool = False,
              max_problems: int = 50) -> dict[str, Any]:
    """Read and validate a COCO file. Image files are not opened (see ``check_image_files``).

    Args:
        path: the COCO JSON file.
        images_dir: the directory ``file_name`` values are relative to (named in the error, if given).
        allow_outside_images: accept ``file_name`` values that are absolute or climb out with ``..``.
        max_problems: how many problems the error lists before ``... and N more``.

    Returns:
        The parsed dict, unchanged (``images``, ``annotations``, ``categories`` and any other keys).

    Raises:
        InputError: the file cannot be read, is not JSON (the message gives line and column), or has
            problems; ``problems`` lists each one with the file, the record and the field.
    """
    path = Path(path)
    data = read_json(path)
    problems = validate_coco(data, source=str(path), allow_outside_images=allow_outside_images)
    if problems:
        where = f" (images in {images_dir})" if images_dir is not None else ""
        raise InputError(f"{path}: {len(problems)} problem{'s' if len(problems) > 1 else ''} in COCO file{where}",
                         _capped(problems, max_problems))
    return data


def check_image_files(data: dict[str, Any], images_dir: str | Path, *, allow_outside_images: bool = False,
                      num_threads: int = 8) -> list[str]:
    """Decode every image of a validated COCO dict with ``read_image_rgb`` (so sizes are after EXIF
    orientation, as the models see them) and report what is wrong with the files.

    Args:
        data: a COCO dict that passed ``validate_coco``.
        images_dir: the directory ``file_name`` values are relative to.
        allow_outside_images: accept ``file_name`` values that are absolute or climb out with ``..``.
        num_threads: images decoded concurrently.

    Returns:
        One line per problem (missing file, undecodable file, size differing from ``height``/``width``),
        in image order; empty when every file is good.
    """
    images_dir = Path(images_dir)

    def check(item: tuple[int, dict[str, Any]]) -> str | None:
        i, img = item
        rec = _record("image", "images", i, img)
        try:
            path = resolve_image_path(images_dir, img["file_name"], allow_outside_images=allow_outside_images)
        except InputError as e:
            return f"{rec}: file_name: {e}"
        if not path.is_file():
            return f"{rec}: file_name: {path} does not exist"
        try:
            rgb = read_image_rgb(path)
        except (InputError, OSError) as e:
            return f"{rec}: file_name: undecodable: {e}"
        h, w = rgb.shape[:2]
        if (h, w) != (img.get("height"), img.get("width")):
            return (f"{rec}: height, width: {path} is {w}x{h} (width x height) but the COCO file says "
                    f"{img.get('width')}x{img.get('height')}")
        return None

    items = list(enumerate(data["images"]))
    with ThreadPoolExecutor(max_workers=max(1, min(num_threads, len(items)))) as pool:
        return [p for p in pool.map(check, items) if p is not None]


def write_coco(data: dict[str, Any], path: str | Path) -> None:
    """Write a COCO dict atomically (see ``omnilabel.io.write_json_atomic``)."""
    write_json_atomic(data, path)


def annotations_by_image(data: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    """``{image_id: [annotation, ...]}`` of a validated COCO dict: every image id in file order (an empty
    list for an image without annotations), annotations in file order.

    Raises:
        InputError: an annotation names an image that does not exist.
    """
    out: dict[int, list[dict[str, Any]]] = {img["id"]: [] for img in data["images"]}
    for ann in data["annotations"]:
        anns = out.get(ann["image_id"])
        if anns is None:
            raise InputError(f"annotation id={ann.get('id')}: image_id: no image with id {ann['image_id']}")
        anns.append(ann)
    return out


def category_names(data: dict[str, Any]) -> dict[int, str]:
    """``{category_id: name}`` of a validated COCO dict, in file order."""
    return {cat["id"]: cat["name"] for cat in data["categories"]}

