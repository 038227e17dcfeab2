"""Decode images to 8-bit RGB arrays, whatever their file mode, EXIF orientation or bit depth.

Every image omnilabel reads goes through :func:`read_image_rgb`, so all stages see the same pixels:

- EXIF orientation is applied (``ImageOps.exif_transpose``): the array is the image as a viewer shows it,
  and COCO ``height``/``width`` must match it.
- Greyscale (``1``, ``L``) is replicated to three channels.
- Transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent palette entry) is composited on
  white. The models see photographs; a transparent background is most often a cut-out product or icon
  shown on a white page, and white keeps the object's own outline visible where black would merge with
  dark objects.
- 16-bit integers (``I;16`` and its byte orders) are divided by 257, so 65535 maps to 255 exactly.
- 32-bit integers (``I``) hold no bit depth of their own; Pillow uses them for 16-bit PNG/PGM on some
  versions and for 32-bit TIFFs. Values are read as 16-bit (divided by 257) unless the image holds a value
  above 65535, in which case the full int32 range is mapped to [0, 255]. Negative values clip to 0.
- 32-bit floats (``F``): an image whose finite values all lie in [0, 1] is scaled by 255; otherwise by
  the smallest of the 8-bit, 16-bit or int32 ranges that holds its maximum (as for ``I``). NaN reads as 0.
- ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` go through Pillow's conversion to ``RGB``.

A missing file or bytes that do not decode raise :class:`omnilabel.errors.InputError` naming the path.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from omnilabel.errors import InputError

_INT16_MAX = 65535
_INT32_MAX = 2**31 - 1
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_UINT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# EXIF orientations 5-8 rotate by 90 or 270 degrees, which swaps height and width.
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
# Errors Pillow raises on a missing, unreadable, truncated or malformed file.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)


def read_image_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as 8-bit RGB, oriented as its EXIF tag says.

    Args:
        path: image file (any format Pillow reads).

    Returns:
        (H, W, 3) uint8 RGB in [0, 255], H and W after EXIF orientation.

    Raises:
        InputError: the file is missing or not readable, or its bytes do not decode (unknown format,
            truncated or corrupt data).
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            oriented = ImageOps.exif_transpose(img)
            return _to_rgb_uint8(oriented if oriented is not None else img)
    except _DECODE_ERRORS as err:
        raise InputError(f"cannot read image {path}: {_reason(err)}") from err


def image_size(path: str | Path) -> tuple[int, int]:
    """Height and width of an image as :func:`read_image_rgb` returns it, from the header only.

    Pillow reads the size and the EXIF block without decoding pixels, so a truncated file can pass here
    and still fail in :func:`read_image_rgb`.

    Args:
        path: image file.

    Returns:
        ``(H, W)`` in pixels after EXIF orientation.

    Raises:
        InputError: the file is missing or not an image Pillow recognises.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            width, height = img.size
            orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except _DECODE_ERRORS as err:
        raise InputError(f"cannot read image {path}: {_reason(err)}") from err
    if orientation in _TRANSPOSING_ORIENTATIONS:
        return int(width), int(height)
    return int(height), int(width)


def _reason(err: BaseException) -> str:
    """A short human reason for a decode failure."""
    if isinstance(err, FileNotFoundError):
        return "file not found"
    if isinstance(err, IsADirectoryError):
        return "is a directory"
    if isinstance(err, PermissionError):
        return "permission denied"
    if isinstance(err, UnidentifiedImageError):
        return "not an image format Pillow recognises"
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _to_rgb_uint8(img: Image.Image) -> np.ndarray:
    """Convert a loaded Pillow image of any mode to (H, W, 3) uint8 RGB (see the module docstring)."""
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8).copy()
    if mode == "P" and "transparency" in img.info:
        return _composite_on_white(img.convert("RGBA"))
    if mode in _ALPHA_MODES:
        return _composite_on_white(img.convert("RGBA"))
    if mode in _UINT16_MODES:
        grey = np.asarray(img).astype(np.float64) / 257.0
        return _grey_to_rgb(grey)
    if mode == "I":
        values = np.asarray(img).astype(np.float64)
        return _grey_to_rgb(_scale_by_range(values, allow_unit=False))
    if mode == "F":
        values = np.nan_to_num(np.asarray(img).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        return _grey_to_rgb(_scale_by_range(values, allow_unit=True))
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def _scale_by_range(values: np.ndarray, *, allow_unit: bool) -> np.ndarray:
    """Map non-negative values of unknown bit depth to [0, 255] floats.

    Args:
        values: (H, W) float64.
        allow_unit: treat an image with every value in [0, 1] as unit range (float images).

    Returns:
        (H, W) float64, not yet clipped.
    """
    peak = float(values.max()) if values.size else 0.0
    lowest = float(values.min()) if values.size else 0.0
    if allow_unit and lowest >= 0.0 and peak <= 1.0:
        return values * 255.0
    if allow_unit and peak <= 255.0:
        return values
    if peak <= _INT16_MAX:
        return values / 257.0
    return values * (255.0 / _INT32_MAX)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    """(H, W) float in [0, 255] (values outside clip) → (H, W, 3) uint8, rounded."""
    g = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return np.repeat(g[:, :, None], 3, axis=2)


def _composite_on_white(rgba: Image.Image) -> np.ndarray:
    """Alpha-blend an RGBA image over white: ``out = (rgb * a + 255 * (255 - a)) / 255``, rounded."""
    arr = np.asarray(rgba, dtype=np.uint16)
    rgb, alpha = arr[:, :, :3], arr[:, :, 3:4]
    blended = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return blended.astype(np.uint8)
