"""Per-pixel uncertainty maps of pseudomasks: the one place their value range and file formats are defined.

An uncertainty map belongs to one mask (one annotation) and has the size of its image:

- values are ``(H, W) float32`` in ``[0, 1]``: 0 means the teacher's mask is trusted at that pixel, 1 that
  it is as uncertain as it can be. Values in between are graded (not a probability of being wrong);
  pixels the mask says nothing about (far from it) are 0.
- files: a ``.png`` holds ``round(u * 65535)`` as a 16-bit greyscale PNG (lossless to 1/65535); an 8-bit
  greyscale PNG is read as ``u = v / 255``; a ``.npy`` holds the float values themselves (float32 on
  save; any float dtype with values in ``[0, 1]`` on read).

A pseudomask annotation points to its map with ``ann["omnilabel"]["uncertainty"]``: a path relative to the
COCO file's folder, or absolute (:func:`uncertainty_map_paths`, :func:`max_uncertainty`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from omnilabel.errors import InputError
from omnilabel.io import atomic_path

#: Largest value of a 16-bit map file; ``u = v / UINT16_MAX``.
UINT16_MAX = 65535
#: Largest value of an 8-bit map file; ``u = v / UINT8_MAX``.
UINT8_MAX = 255

_UINT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_SUFFIXES = (".png", ".npy")
_MAX_LISTED = 50


def quantize(u: np.ndarray) -> np.ndarray:
    """(H, W) uint16 ``round(u * 65535)`` of values in [0, 1]: what a ``.png`` map stores (a quarter of the
    memory of float64, half of float32, and nothing lost that the file keeps)."""
    return np.rint(np.asarray(u, dtype=np.float64) * UINT16_MAX).astype(np.uint16)


def _value_problem(values: np.ndarray) -> str | None:
    """Why ``values`` is not an (H, W) array of finite numbers in [0, 1], or None."""
    if values.ndim != 2:
        return f"expected a 2-D (H, W) array, got shape {values.shape}"
    if values.size == 0:
        return f"expected a non-empty (H, W) array, got shape {values.shape}"
    if not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)
            or values.dtype == np.bool_):
        return f"expected numbers, got dtype {values.dtype}"
    finite = np.isfinite(values)
    if not finite.all():
        return f"expected finite values, got {int((~finite).sum())} NaN or infinite"
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        return f"expected values in [0, 1], got range [{low:.6g}, {high:.6g}]"
    return None


@dataclass(frozen=True)
class UncertaintyMap:
    """The uncertainty of one mask, per pixel (see the module docstring for the range).

    Attributes:
        values: (H, W) float32 in [0, 1]; 0 = trusted, 1 = most uncertain. Stored as a read-only copy.

    Raises:
        ValueError: ``values`` is not 2-D, is empty, holds NaN or infinity, or leaves [0, 1] (the message
            states the expected and the actual shape or range).
    """

    values: np.ndarray

    def __post_init__(self) -> None:
        arr = np.asarray(self.values)
        problem = _value_problem(arr)
        if problem is not None:
            raise ValueError(f"UncertaintyMap.values: {problem}")
        arr = np.array(arr, dtype=np.float32, copy=True)
        arr.setflags(write=False)
        object.__setattr__(self, "values", arr)

    @property
    def size_hw(self) -> tuple[int, int]:
        """``(H, W)`` in pixels."""
        h, w = self.values.shape
        return int(h), int(w)

    def save(self, path: str | Path) -> Path:
        """Write the map atomically (a temp file in the same folder, then a rename).

        Args:
            path: ``.png`` (16-bit greyscale of ``round(u * 65535)``) or ``.npy`` (float32).

        Returns:
            ``path`` as a Path.

        Raises:
            InputError: the suffix is neither ``.png`` nor ``.npy``, or the file cannot be written.
        """
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in _SUFFIXES:
            raise InputError(f"{path}: an uncertainty map is saved as .png or .npy, got {path.suffix!r}")
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                if suffix == ".png":
                    Image.fromarray(quantize(self.values)).save(f, format="PNG")
                else:
                    np.save(f, self.values, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise InputError(f"{path}: cannot write uncertainty map: {e.strerror or e}") from None
        return path


@dataclass(frozen=True)
class MapFolder:
    """Where a job writes the uncertainty maps of its pseudomasks: one 16-bit PNG per mask,
    ``ROOT/<image id>/<key>.png``, named in the COCO file by a path relative to the file's folder.

    Plain data (it travels to Ray workers); on a cluster ``root`` must be on storage every node sees, like the
    job directory.

    Attributes:
        root: the folder, absolute.
        ref: how the COCO file names ``root`` (relative to its folder, or absolute).
    """

    root: str
    ref: str

    @classmethod
    def beside(cls, output: str | Path) -> MapFolder:
        """The folder of a COCO output ``DIR/NAME.json``: ``DIR/NAME.uncertainty/``."""
        output = Path(output).absolute()
        name = output.name[:-5] if output.name.endswith(".json") else output.name
        return cls(root=str(output.parent / f"{name}.uncertainty"), ref=f"{name}.uncertainty")

    def write(self, image_id: int, key: int, u: np.ndarray) -> str:
        """Save one map (atomically) and return what ``omnilabel.uncertainty`` holds for it.

        Args:
            u: (H, W) float in [0, 1], or uint16 already quantized (:func:`quantize`).
        """
        path = Path(self.root) / str(int(image_id)) / f"{int(key)}.png"
        if u.dtype != np.uint16:
            UncertaintyMap(u).save(path)
        else:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                Image.fromarray(u).save(f, format="PNG")
        return f"{self.ref}/{int(image_id)}/{int(key)}.png"


def _read_png(path: Path) -> np.ndarray:
    """Unit-range float64 values of a 16- or 8-bit greyscale PNG."""
    with Image.open(path) as img:
        img.load()
        mode = img.mode
        arr = np.asarray(img)
    if mode in _UINT16_MODES:
        return arr.astype(np.float64) / UINT16_MAX
    if mode == "I":  # 16-bit PNGs on some Pillow versions
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > UINT16_MAX):
            raise InputError(f"{path}: expected a 16-bit greyscale PNG, got 32-bit values outside [0, 65535]")
        return arr.astype(np.float64) / UINT16_MAX
    if mode == "L":
        return arr.astype(np.float64) / UINT8_MAX
    raise InputError(f"{path}: expected a 16-bit or 8-bit greyscale PNG, got image mode {mode!r}")


def _read_npy(path: Path) -> np.ndarray:
    arr: Any = np.load(path, allow_pickle=False)
    if not isinstance(arr, np.ndarray) or not np.issubdtype(arr.dtype, np.floating):
        got = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
        raise InputError(f"{path}: expected a float array with values in [0, 1], got {got}")
    return arr


def read_uncertainty_map(path: str | Path) -> UncertaintyMap:
    """Read an uncertainty map file written by :meth:`UncertaintyMap.save` (or an 8-bit greyscale PNG).

    Args:
        path: ``.png`` (16-bit greyscale: ``v / 65535``; 8-bit: ``v / 255``) or ``.npy`` (float in [0, 1]).

    Returns:
        The map, values (H, W) float32 in [0, 1].

    Raises:
        InputError: naming the file: it is missing or unreadable, has another suffix, is not a greyscale
            PNG or a float ``.npy``, is not 2-D, or holds values outside [0, 1] or NaN.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise InputError(f"{path}: an uncertainty map is a .png or .npy file, got {path.suffix!r}")
    try:
        values = _read_png(path) if suffix == ".png" else _read_npy(path)
    except FileNotFoundError:
        raise InputError(f"{path}: uncertainty map not found") from None
    except (OSError, ValueError, SyntaxError, EOFError, UnidentifiedImageError) as e:
        raise InputError(f"{path}: cannot read uncertainty map: {e}") from None
    try:
        return UncertaintyMap(values)
    except ValueError as e:
        raise InputError(f"{path}: {e}") from None


def uncertainty_map_paths(annotations: Iterable[dict[str, Any]], *, base_dir: str | Path) -> dict[int, Path]:
    """The map files that annotations name in ``ann["omnilabel"]["uncertainty"]``.

    Args:
        annotations: COCO annotations with unique ``id``s; those naming no map are skipped.
        base_dir: the folder relative paths start from (the COCO file's folder).

    Returns:
        ``{annotation id: map file}``; each file exists (it is not opened here).

    Raises:
        InputError: a named map is not a path, or does not exist; every such annotation is listed.
    """
    paths: dict[int, Path] = {}
    problems: list[str] = []
    for ann in annotations:
        info = ann.get("omnilabel")
        ref = info.get("uncertainty") if isinstance(info, dict) else None
        if ref is None:
            continue
        where = f"annotation id={ann.get('id')}: omnilabel.uncertainty"
        if not isinstance(ref, str) or not ref:
            problems.append(f"{where}: expected a file path, got {ref!r}")
            continue
        path = Path(ref) if os.path.isabs(ref) else Path(base_dir) / ref
        if not path.is_file():
            problems.append(f"{where}: uncertainty map {path} does not exist")
        else:
            paths[ann["id"]] = path
    if problems:
        more = [f"... and {len(problems) - _MAX_LISTED} more"] if len(problems) > _MAX_LISTED else []
        raise InputError(f"{len(problems)} uncertainty map problem(s)", problems[:_MAX_LISTED] + more)
    return paths


def max_uncertainty(annotations: Iterable[dict[str, Any]], map_paths: dict[int, Path], *,
                    size_hw: tuple[int, int]) -> np.ndarray | None:
    """Pixel-wise max of the maps of one image's annotations (those in ``map_paths``).

    Args:
        annotations: COCO annotations of one image.
        map_paths: ``{annotation id: map file}`` (see :func:`uncertainty_map_paths`).
        size_hw: the image's ``(H, W)``; every map must have it.

    Returns:
        (H, W) float32 in [0, 1], or None when no annotation has a map.

    Raises:
        InputError: naming the annotation id and the file: a map is unreadable, out of range, or of
            another size than the image.
    """
    peak = None
    for ann in annotations:
        path = map_paths.get(ann.get("id"))
        if path is None:
            continue
        values = read_annotation_map(ann["id"], path, size_hw)
        peak = values if peak is None else np.maximum(peak, values)
    return peak


def read_annotation_map(annotation_id: Any, path: str | Path, size_hw: tuple[int, int]) -> np.ndarray:
    """The uncertainty map of one annotation, which must have its image's size.

    Returns:
        (H, W) float32 in [0, 1] (read-only).

    Raises:
        InputError: naming the annotation id and the file: the map is unreadable, out of range, or of another
            size than the image.
    """
    try:
        umap = read_uncertainty_map(path)
    except InputError as e:
        raise InputError(f"annotation id={annotation_id}: {e}") from None
    if umap.size_hw != tuple(size_hw):
        raise InputError(f"annotation id={annotation_id}: {path}: uncertainty map of height x width "
                         f"{umap.size_hw[0]}x{umap.size_hw[1]}, expected the image's {size_hw[0]}x{size_hw[1]}")
    return umap.values
