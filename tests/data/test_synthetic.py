"""Synthetic scenes: reproducible, occlusion resolved, rings with holes, COCO files pycocotools reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from scipy.ndimage import binary_fill_holes

from omnilabel.data.images import read_image_rgb
from omnilabel.data.synthetic import CATEGORY_IDS, CLASSES, MIN_AREA_PX, make_dataset, render_scene
from omnilabel.errors import InputError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("syn"), n_images=12, seed=7, size_hw=(64, 80), max_objects=5)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    a = make_dataset(tmp_path / "a", n_images=3, seed=1, size_hw=(48, 48))
    b = make_dataset(tmp_path / "b", n_images=3, seed=1, size_hw=(48, 48))
    c = make_dataset(tmp_path / "c", n_images=3, seed=2, size_hw=(48, 48))
    files_a, files_b, files_c = _files(a.parent), _files(b.parent), _files(c.parent)
    assert sorted(files_a) == ["coco.json", "images/000000.png", "images/000001.png", "images/000002.png"]
    assert files_a == files_b
    assert files_a["coco.json"] != files_c["coco.json"]
    assert all(files_a[k] != files_c[k] for k in files_a if k.endswith(".png"))


def test_image_depends_only_on_seed_and_index(tmp_path):
    short = make_dataset(tmp_path / "short", n_images=2, seed=4, size_hw=(40, 40))
    long = make_dataset(tmp_path / "long", n_images=4, seed=4, size_hw=(40, 40))
    for name in ("000000.png", "000001.png"):
        assert (short.parent / "images" / name).read_bytes() == (long.parent / "images" / name).read_bytes()


def test_coco_structure(dataset):
    data = json.loads(dataset.read_text())
    assert [im["id"] for im in data["images"]] == list(range(1, 13))
    assert data["images"][0] == {"id": 1, "file_name": "000000.png", "height": 64, "width": 80}
    assert data["categories"] == [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)]
    assert [a["id"] for a in data["annotations"]] == list(range(1, len(data["annotations"]) + 1))
    for ann in data["annotations"]:
        assert isinstance(ann["segmentation"]["counts"], str)
        assert ann["segmentation"]["size"] == [64, 80]
        assert ann["iscrowd"] == 0
        assert ann["area"] >= MIN_AREA_PX
    assert not list(dataset.parent.glob("*.tmp")) and not list((dataset.parent / "images").glob(".*"))


def test_masks_nonempty_disjoint_and_match_bbox(dataset):
    coco = COCO(str(dataset))
    seen_categories = set()
    for image_id in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        assert anns, "every image holds at least one instance"
        masks = np.stack([coco.annToMask(a) for a in anns]).astype(bool)
        assert masks.shape[1:] == (64, 80)
        assert masks.sum(axis=0).max() <= 1  # visible parts never overlap
        for ann, mask in zip(anns, masks, strict=True):
            assert mask.sum() == ann["area"] >= MIN_AREA_PX
            ys, xs = np.nonzero(mask)
            x, y, w, h = ann["bbox"]
            assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            seen_categories.add(ann["category_id"])
    assert seen_categories == set(CATEGORY_IDS.values())


def test_images_decode_to_recorded_size(dataset):
    coco = COCO(str(dataset))
    for im in coco.loadImgs(coco.getImgIds()):
        pixels = read_image_rgb(dataset.parent / "images" / im["file_name"])
        assert pixels.shape == (im["height"], im["width"], 3)


def test_ring_masks_have_holes(dataset):
    coco = COCO(str(dataset))
    rings = coco.loadAnns(coco.getAnnIds(catIds=[CATEGORY_IDS["ring"]]))
    assert rings
    holed = 0
    for ann in rings:
        mask = coco.annToMask(ann).astype(bool)
        hole = binary_fill_holes(mask) & ~mask  # pixels enclosed by the mask but not in it
        x, y, w, h = (int(v) for v in ann["bbox"])
        holed += bool(hole[y:y + h, x:x + w].any())
    assert holed >= max(1, len(rings) // 2)  # occluders may cut a ring open, but not most


def test_render_scene_objects_and_painted_pixels():
    rng = np.random.default_rng(11)
    image, objects = render_scene(rng, size_hw=(96, 96), max_objects=6, min_objects=3)
    assert image.dtype == np.uint8 and image.shape == (96, 96, 3)
    assert 3 <= len(objects) <= 6
    union = np.zeros((96, 96), dtype=bool)
    for category_id, mask in objects:
        assert category_id in CATEGORY_IDS.values()
        assert mask.dtype == bool and mask.sum() >= MIN_AREA_PX
        assert not (union & mask).any()
        union |= mask
    # Shapes are saturated, the background is near grey: saturation separates them.
    sat = image.max(axis=2).astype(int) - image.min(axis=2)
    assert np.median(sat[union]) > 2 * np.median(sat[~union])


def test_same_generator_state_same_scene():
    a_img, a_obj = render_scene(np.random.default_rng(5), size_hw=(48, 64))
    b_img, b_obj = render_scene(np.random.default_rng(5), size_hw=(48, 64))
    np.testing.assert_array_equal(a_img, b_img)
    assert [c for c, _ in a_obj] == [c for c, _ in b_obj]
    assert all(np.array_equal(m1, m2) for (_, m1), (_, m2) in zip(a_obj, b_obj, strict=True))


@pytest.mark.parametrize("kwargs", [{"size_hw": (8, 64)}, {"max_objects": 0}, {"min_objects": 4, "max_objects": 2}])
def test_render_scene_bad_arguments(kwargs):
    with pytest.raises(InputError):
        render_scene(np.random.default_rng(0), **kwargs)


@pytest.mark.parametrize("kwargs", [{"n_images": -1, "seed": 0}, {"n_images": 1, "seed": -3}])
def test_make_dataset_bad_arguments(tmp_path, kwargs):
    with pytest.raises(InputError):
        make_dataset(tmp_path, **kwargs)
