from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from omnilabel.data.coco import load_coco, validate_coco, write_coco
from omnilabel.data.weak import WeakType, split_coco, summarize_weak, weak_type_of
from omnilabel.errors import InputError

H, W = 20, 24


def _rle(mask: np.ndarray) -> dict[str, Any]:
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")}


def _ring(rng: np.random.Generator) -> np.ndarray:
    """A hollow rectangle: its box centre lies outside the mask, so a point from the box would miss."""
    m = np.zeros((H, W), dtype=bool)
    y0, x0 = rng.integers(0, H - 8), rng.integers(0, W - 8)
    h, w = rng.integers(6, H - y0 + 1), rng.integers(6, W - x0 + 1)
    m[y0:y0 + h, x0:x0 + w] = True
    m[y0 + 2:y0 + h - 2, x0 + 2:x0 + w - 2] = False
    return m


def _dataset(n_images: int, *, seed: int = 0, extras: bool = True) -> tuple[dict[str, Any], dict[int, np.ndarray]]:
    """A COCO dict whose images each hold 1-3 ring masks, and the masks by annotation id.

    With ``extras``, the last image also holds a polygon, a bbox-only, a point-only, a tag and an
    empty-mask annotation, and one more image has no annotations.
    """
    rng = np.random.default_rng(seed)
    images, anns, masks = [], [], {}
    for i in range(n_images):
        images.append({"id": 100 + i, "file_name": f"{i}.png", "height": H, "width": W})
        for _ in range(int(rng.integers(1, 4))):
            m = _ring(rng)
            ann_id = 1000 + len(anns)
            masks[ann_id] = m
            anns.append({"id": ann_id, "image_id": 100 + i, "category_id": int(rng.integers(1, 3)),
                         "segmentation": _rle(m), "area": float(m.sum()),
                         "bbox": [float(v) for v in mask_utils.toBbox(_rle_bytes(m))], "iscrowd": 0,
                         "attributes": {"occluded": False}})
    if extras:
        last = images[-1]["id"]
        poly = [[2.0, 2.0, 10.0, 2.0, 10.0, 9.0, 2.0, 9.0]]
        masks[5] = np.zeros((H, W), dtype=bool)
        masks[1] = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(poly, H, W))).astype(bool)
        anns += [{"id": 1, "image_id": last, "category_id": 1, "segmentation": poly, "iscrowd": 0},
                 {"id": 2, "image_id": last, "category_id": 2, "bbox": [3.0, 4.0, 5.0, 6.0], "area": 30.0},
                 {"id": 3, "image_id": last, "category_id": 1, "point": [5.5, 6.5]},
                 {"id": 4, "image_id": last, "category_id": 2},
                 {"id": 5, "image_id": last, "category_id": 1, "segmentation": _rle(np.zeros((H, W), bool)),
                  "iscrowd": 0}]
        images.append({"id": 99, "file_name": "empty.png", "height": H, "width": W})
    data = {"info": {"v": 1}, "images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}
    assert validate_coco(data) == []
    return data, masks


def _rle_bytes(m: np.ndarray) -> dict[str, Any]:
    return mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))


def _by_id(anns: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {a["id"]: a for a in anns}


@pytest.mark.parametrize(("ann", "expected"), [
    ({"segmentation": [[0, 0, 1, 0, 1, 1]], "bbox": [0, 0, 1, 1]}, WeakType.FULL),
    ({"segmentation": {"size": [2, 2], "counts": "04"}}, WeakType.FULL),
    ({"bbox": [0, 0, 1, 1]}, WeakType.BOX),
    ({"bbox": [0, 0, 1, 1], "point": None}, WeakType.BOX),
    ({"point": [0.5, 0.5]}, WeakType.POINT),
    ({"segmentation": None, "point": [0.5, 0.5]}, WeakType.POINT),
    ({"category_id": 1}, WeakType.TAG),
])
def test_weak_type_of(ann, expected):
    assert weak_type_of(ann) is expected


def test_weak_type_of_refuses_box_and_point():
    with pytest.raises(InputError, match="annotation id=7: bbox, point"):
        weak_type_of({"id": 7, "bbox": [0, 0, 1, 1], "point": [0.5, 0.5]})


@pytest.mark.parametrize("fully", [0.0, 0.1, 0.25, 0.5, 1.0])
def test_split_keeps_masks_on_exactly_round_fraction_of_images(fully):
    data, _ = _dataset(21, extras=False)  # every image has masks
    out = split_coco(data, fully=fully, weak="boxes", seed=3)
    with_masks = {a["image_id"] for a in out["annotations"] if "segmentation" in a}
    assert len(with_masks) == round(fully * 21)
    assert sorted(with_masks) == sorted(out["omnilabel_split"]["full_image_ids"])


def test_split_full_images_untouched_and_weak_elsewhere():
    data, _ = _dataset(20)
    before = copy.deepcopy(data)
    out = split_coco(data, fully=0.1, weak="tags", seed=0)
    assert data == before  # input not modified
    full = set(out["omnilabel_split"]["full_image_ids"])
    assert len(full) == round(0.1 * 21)  # the image without annotations counts too
    assert out["images"] == data["images"] and out["categories"] == data["categories"]
    assert out["info"] == data["info"] and list(out) == [*data, "omnilabel_split"]
    assert [a["id"] for a in out["annotations"]] == [a["id"] for a in data["annotations"]]
    for src, new in zip(data["annotations"], out["annotations"], strict=True):
        if src["image_id"] in full:
            assert new == src
        else:
            assert set(new) <= {"id", "image_id", "category_id", "iscrowd"}
            assert {k: src[k] for k in new} == new
    assert out["omnilabel_split"] == {"fully": 0.1, "weak": "tags", "seed": 0,
                                      "full_image_ids": [i["id"] for i in data["images"] if i["id"] in full],
                                      "n_degraded_to_tags": 0}


def test_points_lie_inside_their_masks():
    data, masks = _dataset(30, seed=1)
    out = split_coco(data, fully=0.0, weak="points", seed=5)
    anns = _by_id(out["annotations"])
    checked = 0
    for ann_id, m in masks.items():
        if not m.any():
            continue
        x, y = anns[ann_id]["point"]
        assert m[int(y), int(x)], (ann_id, x, y)
        assert x - int(x) == 0.5 and y - int(y) == 0.5  # pixel centres
        assert "segmentation" not in anns[ann_id] and "bbox" not in anns[ann_id]
        if ann_id >= 1000:  # other fields kept
            assert anns[ann_id]["attributes"] == {"occluded": False} and "area" in anns[ann_id]
        checked += 1
    assert checked == len(masks) - 1
    # The box-only annotation gets a point in its box; the empty mask becomes a tag and is counted.
    px, py = anns[2]["point"]
    assert 3.0 <= px <= 8.0 and 4.0 <= py <= 10.0 and anns[2]["area"] == 30.0
    assert anns[3]["point"] == [5.5, 6.5]
    assert anns[5] == {"id": 5, "image_id": 129, "category_id": 1, "iscrowd": 0}
    assert out["omnilabel_split"]["n_degraded_to_tags"] == 2  # the empty mask, and the tag (id 4)


def test_points_inside_large_irregular_masks():
    # Long, varied runs: multi-character and negative-delta RLE counts.
    rng = np.random.default_rng(9)
    h, w = 150, 210
    masks = [rng.random((h, w)) < p for p in (0.01, 0.3, 0.9)]
    masks.append(np.zeros((h, w), dtype=bool))
    masks[-1][40:, 120:] = True
    data = {"images": [{"id": 1, "file_name": "a.png", "height": h, "width": w}],
            "categories": [{"id": 1, "name": "blob"}],
            "annotations": [{"id": k, "image_id": 1, "category_id": 1, "segmentation": _rle(m)}
                            for k, m in enumerate(masks)]}
    for seed in range(25):
        for ann, m in zip(split_coco(data, fully=0.0, weak="points", seed=seed)["annotations"], masks, strict=True):
            x, y = ann["point"]
            assert m[int(y), int(x)], (ann["id"], seed)


def test_points_cover_the_mask_uniformly():
    data, masks = _dataset(1, seed=2, extras=False)
    ann_id, m = next(iter(masks.items()))
    hits = np.zeros((H, W), dtype=int)
    for seed in range(400):
        x, y = _by_id(split_coco(data, fully=0.0, weak="points", seed=seed)["annotations"])[ann_id]["point"]
        hits[int(y), int(x)] += 1
    assert hits[~m].sum() == 0
    assert (hits[m] > 0).mean() > 0.8  # nearly every mask pixel gets drawn: not a fixed or central choice


def test_boxes_equal_mask_bbox():
    data, masks = _dataset(30, seed=4)
    for ann in data["annotations"]:
        if "segmentation" in ann:
            ann.pop("bbox", None)  # the box must come from the mask
    out = split_coco(data, fully=0.0, weak="boxes", seed=0)
    anns = _by_id(out["annotations"])
    for ann_id, m in masks.items():
        if not m.any():
            assert set(anns[ann_id]) == {"id", "image_id", "category_id", "iscrowd"}
            continue
        ys, xs = np.nonzero(m)
        expected = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
        assert anns[ann_id]["bbox"] == expected
        assert "segmentation" not in anns[ann_id] and "point" not in anns[ann_id]
    assert anns[2]["bbox"] == [3.0, 4.0, 5.0, 6.0]
    assert set(anns[3]) == {"id", "image_id", "category_id"}  # a point cannot become a box
    assert out["omnilabel_split"]["n_degraded_to_tags"] == 3


@pytest.mark.parametrize("weak", ["points", "boxes"])
def test_uncompressed_crowd_rle_converts(weak):
    m = np.zeros((H, W), dtype=bool)
    m[3:9, 5:7] = True
    m[12:14, 10:20] = True
    counts, flat, run_value, run = [], m.flatten(order="F"), False, 0
    for v in flat:
        if v != run_value:
            counts.append(run)
            run_value, run = v, 0
        run += 1
    counts.append(run)
    data = {"images": [{"id": 1, "file_name": "a.png", "height": H, "width": W}],
            "categories": [{"id": 1, "name": "people"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 1,
                             "segmentation": {"size": [H, W], "counts": counts}}]}
    assert validate_coco(data) == []
    ann = split_coco(data, fully=0.0, weak=weak, seed=0)["annotations"][0]
    assert ann["iscrowd"] == 1 and "segmentation" not in ann
    if weak == "boxes":
        assert ann["bbox"] == [5.0, 3.0, 15.0, 11.0]
    else:
        assert m[int(ann["point"][1]), int(ann["point"][0])]


def test_mixed_draws_all_three_types():
    data, _ = _dataset(40, seed=6, extras=False)
    out = split_coco(data, fully=0.0, weak="mixed", seed=1)
    counts = summarize_weak(out)
    n = len(data["annotations"])
    assert counts["full"] == 0 and counts["boxes"] + counts["points"] + counts["tags"] == n
    for t in ("boxes", "points", "tags"):
        assert n / 6 < counts[t] < n / 2, counts


def test_mixed_images_gives_each_image_one_kind_of_label():
    from omnilabel.data.weak import weak_type_of

    data, _ = _dataset(40, seed=6, extras=False)
    out = split_coco(data, fully=0.1, weak="mixed-images", seed=1)
    kinds: dict[int, set[str]] = {}
    for ann in out["annotations"]:
        kinds.setdefault(ann["image_id"], set()).add(weak_type_of(ann).value)
    assert all(len(k) == 1 for k in kinds.values()), kinds
    per_image = [k.pop() for k in kinds.values()]
    for t in ("boxes", "points", "tags"):
        assert per_image.count(t) >= 5, per_image
    assert per_image.count("full") == len(out["omnilabel_split"]["full_image_ids"])


def test_same_seed_same_bytes_different_seed_different(tmp_path):
    data, _ = _dataset(20)
    for weak in ("points", "mixed", "mixed-images"):
        a, b, c = (tmp_path / f"{weak}{k}.json" for k in "abc")
        write_coco(split_coco(data, fully=0.2, weak=weak, seed=7), a)
        write_coco(split_coco(copy.deepcopy(data), fully=0.2, weak=weak, seed=7), b)
        write_coco(split_coco(data, fully=0.2, weak=weak, seed=8), c)
        assert a.read_bytes() == b.read_bytes()
        assert a.read_bytes() != c.read_bytes()


@pytest.mark.parametrize("weak", ["tags", "points", "boxes", "mixed", "mixed-images"])
def test_split_file_loads_in_pycocotools_and_validates(tmp_path, weak):
    data, _ = _dataset(10)
    path = tmp_path / "weak.json"
    write_coco(split_coco(data, fully=0.3, weak=weak, seed=0), path)
    coco = COCO(str(path))
    assert len(coco.getImgIds()) == 11 and len(coco.getAnnIds()) == len(data["annotations"])
    assert coco.getCatIds() == [1, 2]
    assert load_coco(path)["omnilabel_split"]["weak"] == weak


@pytest.mark.parametrize("kwargs", [
    {"fully": -0.1}, {"fully": 1.5}, {"fully": float("nan")}, {"fully": True}, {"weak": "masks"},
    {"seed": -1},
])
def test_split_refuses_bad_arguments(kwargs):
    data, _ = _dataset(2, extras=False)
    args = {"fully": 0.5, "weak": "points", "seed": 0, **kwargs}
    with pytest.raises(InputError, match=next(iter(kwargs))):
        split_coco(data, **args)


def test_summarize_weak():
    data, _ = _dataset(3)
    counts = summarize_weak(data)
    n_rings = len(data["annotations"]) - 5
    assert counts == {"full": n_rings + 2, "boxes": 1, "points": 1, "tags": 1, "none": 1}
