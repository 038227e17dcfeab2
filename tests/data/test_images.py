"""read_image_rgb / image_size: modes, transparency, bit depths, EXIF orientation, bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omnilabel.data.images import image_size, read_image_rgb
from omnilabel.errors import InputError


def _save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


@pytest.fixture
def rgb_pattern() -> np.ndarray:
    """(12, 20, 3) uint8: left half red, right half blue, a green top-left 4x4 corner."""
    arr = np.zeros((12, 20, 3), dtype=np.uint8)
    arr[:, :10] = (255, 0, 0)
    arr[:, 10:] = (0, 0, 255)
    arr[:4, :4] = (0, 255, 0)
    return arr


def test_png_rgb_is_exact(tmp_path, rgb_pattern):
    path = _save(Image.fromarray(rgb_pattern), tmp_path / "a.png")
    out = read_image_rgb(path)
    assert out.dtype == np.uint8 and out.shape == (12, 20, 3)
    np.testing.assert_array_equal(out, rgb_pattern)
    assert image_size(path) == (12, 20)


def test_jpeg_rgb_is_close(tmp_path, rgb_pattern):
    path = _save(Image.fromarray(rgb_pattern), tmp_path / "a.jpg", quality=95)
    out = read_image_rgb(str(path))
    assert out.dtype == np.uint8 and out.shape == (12, 20, 3)
    assert np.abs(out[6, 7].astype(int) - (255, 0, 0)).max() < 40
    assert np.abs(out[6, 15].astype(int) - (0, 0, 255)).max() < 40


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_greyscale_replicated_to_three_channels(tmp_path, suffix):
    grey = np.tile(np.arange(0, 240, 20, dtype=np.uint8), (8, 1))
    path = _save(Image.fromarray(grey, mode="L"), tmp_path / f"g{suffix}")
    out = read_image_rgb(path)
    assert out.shape == (8, 12, 3)
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    tol = 0 if suffix == ".png" else 6
    assert np.abs(out[..., 0].astype(int) - grey).max() <= tol


def test_la_composited_on_white(tmp_path):
    la = np.zeros((2, 3, 2), dtype=np.uint8)
    la[..., 0] = 40
    la[0, 0, 1] = 0  # fully transparent
    la[0, 1, 1] = 255  # opaque
    la[0, 2, 1] = 128  # half
    path = _save(Image.fromarray(la, mode="LA"), tmp_path / "la.png")
    out = read_image_rgb(path)
    assert out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out[0, 0], (255, 255, 255))
    np.testing.assert_array_equal(out[0, 1], (40, 40, 40))
    expected_half = round((40 * 128 + 255 * 127) / 255)
    np.testing.assert_array_equal(out[0, 2], (expected_half,) * 3)


def test_rgba_transparent_pixel_is_white(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., :3] = (10, 100, 200)
    rgba[..., 3] = 255
    rgba[1, 1, 3] = 0
    path = _save(Image.fromarray(rgba, mode="RGBA"), tmp_path / "rgba.png")
    out = read_image_rgb(path)
    np.testing.assert_array_equal(out[1, 1], (255, 255, 255))
    np.testing.assert_array_equal(out[0, 0], (10, 100, 200))


def test_palette_with_transparency_is_white(tmp_path):
    img = Image.new("P", (3, 1))
    img.putpalette([0, 0, 0, 200, 10, 10] + [0] * (254 * 3))
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    img.putpixel((2, 0), 1)
    path = _save(img, tmp_path / "p.png", transparency=0)
    out = read_image_rgb(path)
    np.testing.assert_array_equal(out[0, 0], (255, 255, 255))
    np.testing.assert_array_equal(out[0, 1], (200, 10, 10))


def test_sixteen_bit_greyscale_png_scaled_to_eight_bit(tmp_path):
    values = np.array([[0, 65535, 257 * 100, 257 * 3 + 100, 257 * 200]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "g16.png")
    with Image.open(path) as check:
        assert check.mode.startswith("I")  # really stored and read as 16-bit
    out = read_image_rgb(path)
    np.testing.assert_array_equal(out[..., 0], [[0, 255, 100, 3, 200]])
    np.testing.assert_array_equal(out[..., 2], out[..., 0])


def test_int32_image_read_as_sixteen_bit(tmp_path):
    values = np.array([[0, 65535, 257 * 50]], dtype=np.int32)
    path = _save(Image.fromarray(values), tmp_path / "i.tif")
    np.testing.assert_array_equal(read_image_rgb(path)[..., 1], [[0, 255, 50]])


@pytest.mark.parametrize(
    ("values", "expected"),
    [([[0.0, 1.0, 0.5]], [[0, 255, 128]]),  # unit range
     ([[0.0, 200.0, 255.0]], [[0, 200, 255]]),  # 8-bit range
     ([[0.0, 65535.0, np.nan]], [[0, 255, 0]])],  # 16-bit range, NaN as 0
)
def test_float_image_scaled_by_its_range(tmp_path, values, expected):
    path = _save(Image.fromarray(np.array(values, dtype=np.float32)), tmp_path / "f.tif")
    np.testing.assert_array_equal(read_image_rgb(path)[..., 0], expected)


def test_cmyk_converted_to_rgb(tmp_path):
    img = Image.new("CMYK", (4, 3), (0, 255, 255, 0))  # full magenta + yellow = red
    path = _save(img, tmp_path / "cmyk.jpg", quality=95)
    out = read_image_rgb(path)
    assert out.shape == (3, 4, 3)
    assert out[1, 1, 0] > 200 and out[1, 1, 1] < 50 and out[1, 1, 2] < 50


def test_exif_orientation_six_rotates_clockwise(tmp_path, rgb_pattern):
    big = np.kron(rgb_pattern, np.ones((4, 4, 1), dtype=np.uint8))  # (48, 80, 3): blocks survive JPEG
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be turned 90 degrees clockwise to display
    path = _save(Image.fromarray(big), tmp_path / "rot.jpg", exif=exif, quality=95)
    out = read_image_rgb(path)
    assert out.shape == (80, 48, 3)
    assert image_size(path) == (80, 48)
    expected = np.rot90(big, k=-1)
    assert np.abs(out.astype(int) - expected.astype(int)).mean() < 8
    # The green corner, stored top-left, is displayed top-right.
    assert out[4, 44, 1] > 200 and out[4, 3, 1] < 60


def test_truncated_file_raises_input_error(tmp_path):
    rng = np.random.default_rng(0)
    full = _save(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), tmp_path / "full.png")
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(InputError, match="cut.png"):
        read_image_rgb(cut)


def test_garbage_bytes_raise_input_error(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(InputError, match="bad.jpg") as info:
        read_image_rgb(bad)
    assert "not an image" in str(info.value)
    with pytest.raises(InputError, match="bad.jpg"):
        image_size(bad)


def test_missing_file_raises_input_error(tmp_path):
    missing = tmp_path / "nowhere" / "x.png"
    with pytest.raises(InputError, match="not found") as info:
        read_image_rgb(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(InputError, match="x.png"):
        image_size(missing)
