"""UncertaintyMap: validation, 16-bit PNG / 8-bit PNG / .npy files, and the maps annotations name."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from omnilabel.data.maps import (
    UINT16_MAX,
    UncertaintyMap,
    max_uncertainty,
    read_uncertainty_map,
    uncertainty_map_paths,
)
from omnilabel.errors import InputError


@pytest.fixture
def values() -> np.ndarray:
    """(12, 20) float32 in [0, 1], both ends included."""
    u = np.random.default_rng(0).random((12, 20)).astype(np.float32)
    u[0, 0], u[0, 1] = 0.0, 1.0
    return u


def test_png_is_16_bit_and_round_trips(tmp_path, values):
    path = UncertaintyMap(values).save(tmp_path / "u.png")
    with Image.open(path) as img:
        assert img.mode.startswith("I") and img.size == (20, 12)
        raw = np.asarray(img)
    np.testing.assert_array_equal(raw, np.rint(values.astype(np.float64) * UINT16_MAX))
    back = read_uncertainty_map(path)
    assert back.values.dtype == np.float32 and back.size_hw == (12, 20)
    assert np.abs(back.values - values).max() <= 0.5 / UINT16_MAX + 1e-7
    assert back.values[0, 0] == 0.0 and back.values[0, 1] == 1.0


def test_npy_round_trips_exactly(tmp_path, values):
    path = UncertaintyMap(values).save(tmp_path / "u.npy")
    np.testing.assert_array_equal(read_uncertainty_map(path).values, values)
    assert np.load(path).dtype == np.float32


def test_8_bit_png_reads_as_unit_range(tmp_path):
    Image.fromarray(np.array([[0, 51, 255]], dtype=np.uint8)).save(tmp_path / "u8.png")
    np.testing.assert_allclose(read_uncertainty_map(tmp_path / "u8.png").values, [[0.0, 0.2, 1.0]], atol=1e-7)


def test_values_are_a_read_only_float32_copy(values):
    umap = UncertaintyMap(values.astype(np.float64))
    assert umap.values.dtype == np.float32 and not umap.values.flags.writeable
    values[0, 0] = 0.5
    assert umap.values[0, 0] == 0.0


@pytest.mark.parametrize(("bad", "expected"), [
    (np.full((4, 4), 1.5), "expected values in [0, 1], got range [1.5, 1.5]"),
    (np.full((4, 4), -0.1), "expected values in [0, 1]"),
    (np.array([[0.1, np.nan]]), "expected finite values, got 1 NaN or infinite"),
    (np.zeros((2, 3, 3)), "expected a 2-D (H, W) array, got shape (2, 3, 3)"),
    (np.zeros((0, 3)), "expected a non-empty"),
    (np.array([["a"]]), "expected numbers"),
])
def test_invalid_values_are_refused(bad, expected):
    with pytest.raises(ValueError) as err:
        UncertaintyMap(bad)
    assert expected in str(err.value)


def test_bad_files_name_the_file(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not a png")
    with pytest.raises(InputError, match="garbage.png"):
        read_uncertainty_map(garbage)
    with pytest.raises(InputError, match=r"missing\.npy: uncertainty map not found"):
        read_uncertainty_map(tmp_path / "missing.npy")
    np.save(tmp_path / "big.npy", np.full((3, 3), 2.0))
    with pytest.raises(InputError, match=r"big\.npy: .*expected values in \[0, 1\]"):
        read_uncertainty_map(tmp_path / "big.npy")
    np.save(tmp_path / "ints.npy", np.zeros((3, 3), dtype=np.int64))
    with pytest.raises(InputError, match=r"ints\.npy: expected a float array"):
        read_uncertainty_map(tmp_path / "ints.npy")
    Image.new("RGB", (3, 3)).save(tmp_path / "rgb.png")
    with pytest.raises(InputError, match=r"rgb\.png: expected a 16-bit or 8-bit greyscale PNG"):
        read_uncertainty_map(tmp_path / "rgb.png")
    with pytest.raises(InputError, match=r"\.tif"):
        read_uncertainty_map(tmp_path / "u.tif")
    with pytest.raises(InputError, match=r"\.jpg"):
        UncertaintyMap(np.zeros((2, 2))).save(tmp_path / "u.jpg")
    assert not (tmp_path / "u.jpg").exists()


def test_annotation_maps_paths_and_pixelwise_max(tmp_path):
    a, b = np.zeros((4, 5), np.float32), np.zeros((4, 5), np.float32)
    a[0, 0], b[0, 0], b[3, 4] = 0.25, 0.75, 0.5
    UncertaintyMap(a).save(tmp_path / "maps" / "a.png")
    UncertaintyMap(b).save(tmp_path / "b.npy")
    anns = [{"id": 1, "omnilabel": {"uncertainty": "maps/a.png"}},
            {"id": 2, "omnilabel": {"uncertainty": str(tmp_path / "b.npy")}},  # absolute
            {"id": 3, "omnilabel": {"source": "gt"}}, {"id": 4}]
    paths = uncertainty_map_paths(anns, base_dir=tmp_path)
    assert paths == {1: tmp_path / "maps" / "a.png", 2: tmp_path / "b.npy"}
    peak = max_uncertainty(anns, paths, size_hw=(4, 5))
    assert peak[0, 0] == pytest.approx(0.75) and peak[3, 4] == pytest.approx(0.5) and peak[1, 1] == 0.0
    assert max_uncertainty(anns[2:], paths, size_hw=(4, 5)) is None
    with pytest.raises(InputError, match=r"annotation id=1: .*a\.png.*4x5, expected the image's 5x4"):
        max_uncertainty(anns, paths, size_hw=(5, 4))


def test_missing_or_malformed_map_references_are_listed(tmp_path):
    anns = [{"id": 7, "omnilabel": {"uncertainty": "nope.png"}}, {"id": 8, "omnilabel": {"uncertainty": 3}}]
    with pytest.raises(InputError) as err:
        uncertainty_map_paths(anns, base_dir=tmp_path)
    assert err.value.problems[0].startswith("annotation id=7") and "nope.png" in err.value.problems[0]
    assert "annotation id=8" in err.value.problems[1] and "expected a file path" in err.value.problems[1]
