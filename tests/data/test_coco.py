from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from omnilabel.data.coco import (
    annotations_by_image,
    category_names,
    check_image_files,
    load_coco,
    resolve_image_path,
    validate_coco,
    write_coco,
)
from omnilabel.errors import InputError
from omnilabel.io import write_json_atomic

H, W = 24, 32  # every test image: height 24, width 32


def _rle(mask: np.ndarray) -> dict[str, Any]:
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")}


def _coco() -> dict[str, Any]:
    """Three images (the third unannotated), two categories, one annotation of every geometry."""
    m = np.zeros((H, W), dtype=bool)
    m[4:10, 6:14] = True
    return {
        "info": {"description": "tiny"},
        "images": [{"id": 1, "file_name": "a.png", "height": H, "width": W},
                   {"id": 2, "file_name": "sub/b.png", "height": H, "width": W},
                   {"id": 3, "file_name": "c.png", "height": H, "width": W}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "segmentation": _rle(m), "bbox": [6, 4, 8, 6],
             "area": 48, "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 2, "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]],
             "iscrowd": 0},
            {"id": 12, "image_id": 2, "category_id": 1, "bbox": [0.0, 0.0, 32.5, 24.0]},
            {"id": 13, "image_id": 2, "category_id": 2, "point": [31.5, 0.0]},
            {"id": 14, "image_id": 2, "category_id": 2},
            {"id": 15, "image_id": 2, "category_id": 1, "bbox": None, "point": [3.0, 4.0]},
        ],
    }


def _write(tmp_path: Path, data: Any, name: str = "coco.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _ann(data: dict[str, Any], ann_id: int) -> dict[str, Any]:
    return next(a for a in data["annotations"] if a["id"] == ann_id)


def _img(data: dict[str, Any], image_id: int) -> dict[str, Any]:
    return next(i for i in data["images"] if i["id"] == image_id)


def test_valid_file_loads_unchanged(tmp_path):
    data = _coco()
    data["licenses"] = [{"id": 1}]
    assert load_coco(_write(tmp_path, data)) == data


# (case, mutation, record named, field named)
BAD_CASES: list[tuple[str, Callable[[dict[str, Any]], None], str, str]] = [
    ("image without id", lambda d: _img(d, 3).pop("id"), "images[2]", "id"),
    ("image without file_name", lambda d: _img(d, 3).pop("file_name"), "image id=3", "file_name"),
    ("image height zero", lambda d: _img(d, 3).update(height=0), "image id=3", "height"),
    ("image width not int", lambda d: _img(d, 3).update(width="32"), "image id=3", "width"),
    ("image width float", lambda d: _img(d, 3).update(width=32.5), "image id=3", "width"),
    ("duplicate image id", lambda d: _img(d, 3).update(id=2), "image id=2", "id"),
    ("absolute file_name", lambda d: _img(d, 3).update(file_name="/etc/c.png"), "image id=3", "file_name"),
    ("file_name climbs out", lambda d: _img(d, 3).update(file_name="sub/../../c.png"), "image id=3",
     "file_name"),
    ("duplicate annotation id", lambda d: _ann(d, 14).update(id=10), "annotation id=10", "id"),
    ("duplicate category id", lambda d: d["categories"].append({"id": 2, "name": "x"}), "category id=2", "id"),
    ("category without name", lambda d: d["categories"].append({"id": 7}), "category id=7", "name"),
    ("category without id", lambda d: d["categories"].append({"name": "x"}), "categories[2]", "id"),
    ("annotation without id", lambda d: _ann(d, 14).pop("id"), "annotations[4]", "id"),
    ("annotation without image_id", lambda d: _ann(d, 14).pop("image_id"), "annotation id=14", "image_id"),
    ("annotation without category_id", lambda d: _ann(d, 14).pop("category_id"), "annotation id=14",
     "category_id"),
    ("unknown image_id", lambda d: _ann(d, 14).update(image_id=99), "annotation id=14", "image_id"),
    ("unknown category_id", lambda d: _ann(d, 14).update(category_id=99), "annotation id=14", "category_id"),
    ("bbox of 3 numbers", lambda d: _ann(d, 12).update(bbox=[1, 2, 3]), "annotation id=12", "bbox"),
    ("bbox with a string", lambda d: _ann(d, 12).update(bbox=["1", 2, 3, 4]), "annotation id=12", "bbox"),
    ("bbox zero width", lambda d: _ann(d, 12).update(bbox=[1, 2, 0, 4]), "annotation id=12", "bbox"),
    ("bbox negative height", lambda d: _ann(d, 12).update(bbox=[1, 2, 3, -4]), "annotation id=12", "bbox"),
    ("bbox outside image", lambda d: _ann(d, 12).update(bbox=[20, 5, 14, 5]), "annotation id=12", "bbox"),
    ("bbox above image", lambda d: _ann(d, 12).update(bbox=[2, -1.5, 4, 4]), "annotation id=12", "bbox"),
    ("point of 1 number", lambda d: _ann(d, 13).update(point=[3.0]), "annotation id=13", "point"),
    ("point not finite", lambda d: _ann(d, 13).update(point=[float("nan"), 2.0]), "annotation id=13", "point"),
    ("point outside image", lambda d: _ann(d, 13).update(point=[32.5, 3.0]), "annotation id=13", "point"),
    ("point negative", lambda d: _ann(d, 13).update(point=[3.0, -0.1]), "annotation id=13", "point"),
    ("polygon of 2 points", lambda d: _ann(d, 11).update(segmentation=[[1, 1, 5, 1]]), "annotation id=11",
     "segmentation"),
    ("polygon odd count", lambda d: _ann(d, 11).update(segmentation=[[1, 1, 5, 1, 5, 5, 1]]),
     "annotation id=11", "segmentation"),
    ("RLE size mismatch", lambda d: _ann(d, 10)["segmentation"].update(size=[W, H]), "annotation id=10",
     "segmentation"),
    ("bbox and point", lambda d: _ann(d, 13).update(bbox=[1, 1, 2, 2]), "annotation id=13", "bbox, point"),
    ("images missing", lambda d: d.pop("images"), "top level", "images"),
    ("annotations not a list", lambda d: d.update(annotations={}), "top level", "annotations"),
    ("categories missing", lambda d: d.pop("categories"), "top level", "categories"),
]


@pytest.mark.parametrize(("case", "mutate", "record", "field"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_each_bad_input_names_file_record_and_field(tmp_path, case, mutate, record, field):
    data = _coco()
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(InputError) as err:
        load_coco(path)
    assert len(err.value.problems) == 1, err.value.problems
    problem = err.value.problems[0]
    assert problem.startswith(f"{path}: {record}: {field}: "), problem
    assert problem in str(err.value) and str(path) in str(err.value).splitlines()[0]


def test_top_level_not_an_object(tmp_path):
    path = _write(tmp_path, [_coco()])
    with pytest.raises(InputError, match="top level: expected a JSON object, got list") as err:
        load_coco(path)
    assert str(path) in str(err.value)


def test_malformed_json_gives_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "images": [],\n  "annotations": [,]\n}')
    with pytest.raises(InputError, match=r"broken\.json: line 3 column 19: invalid JSON"):
        load_coco(path)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="nope.json: file not found"):
        load_coco(tmp_path / "nope.json")


def test_file_outside_images_dir_allowed_on_request(tmp_path):
    data = _coco()
    _img(data, 3)["file_name"] = "../elsewhere/c.png"
    _img(data, 2)["file_name"] = str(tmp_path / "abs.png")
    path = _write(tmp_path, data)
    with pytest.raises(InputError) as err:
        load_coco(path, images_dir=tmp_path / "imgs")
    assert len(err.value.problems) == 2
    assert load_coco(path, images_dir=tmp_path / "imgs", allow_outside_images=True) == data


def test_bbox_within_tolerance_is_accepted(tmp_path):
    data = _coco()
    _ann(data, 12)["bbox"] = [-1.0, -0.5, 33.0, 25.0]  # overhangs by at most 1 px
    assert load_coco(_write(tmp_path, data)) == data


def test_all_problems_reported_at_once(tmp_path):
    data = _coco()
    _img(data, 3)["height"] = 0
    del _img(data, 3)["file_name"]
    data["categories"] += [{"id": 7}, {"id": 1, "name": "again"}]
    _ann(data, 10)["segmentation"]["size"] = [H, H]
    _ann(data, 11)["segmentation"] = [[1, 1, 5, 1]]
    _ann(data, 12)["bbox"] = [30, 0, 4, 4]
    _ann(data, 13)["point"] = [1.0, 25.0]
    _ann(data, 14)["category_id"] = 99
    _ann(data, 15)["image_id"] = 99
    data["annotations"].append({"image_id": 1, "category_id": 1, "bbox": [0, 0, 1]})
    path = _write(tmp_path, data)
    with pytest.raises(InputError) as err:
        load_coco(path)
    expected = ["image id=3: height", "image id=3: file_name", "category id=7: name", "category id=1: id",
                "annotation id=10: segmentation", "annotation id=11: segmentation", "annotation id=12: bbox",
                "annotation id=13: point", "annotation id=14: category_id", "annotation id=15: image_id",
                "annotations[6]: id", "annotations[6]: bbox"]
    problems = err.value.problems
    assert len(problems) == len(expected), problems
    for problem, where in zip(problems, expected, strict=True):
        assert problem.startswith(f"{path}: {where}: "), (problem, where)
    assert str(err.value).startswith(f"{path}: 12 problems in COCO file")
    assert all(p.startswith(f"{path}: ") and p in str(err.value) for p in problems)


def test_problems_are_capped(tmp_path):
    data = _coco()
    for k in range(60):
        data["annotations"].append({"id": 100 + k, "image_id": 1, "category_id": 1, "bbox": [0, 0, 0, 1]})
    with pytest.raises(InputError) as err:
        load_coco(_write(tmp_path, data), max_problems=50)
    problems = err.value.problems
    assert len(problems) == 51 and problems[-1] == "... and 10 more"
    assert "annotation id=149: bbox" in problems[-2]
    assert str(err.value).splitlines()[0].endswith("60 problems in COCO file")


def test_validate_coco_on_a_dict():
    assert validate_coco(_coco()) == []
    data = _coco()
    _ann(data, 13)["point"] = [40.0, 1.0]
    assert validate_coco(data, source="mem") == [
        "mem: annotation id=13: point: [40.0, 1.0] lies outside the image [0, 32] x [0, 24]"]


def test_resolve_image_path(tmp_path):
    assert resolve_image_path(tmp_path, "sub/./x/../b.png") == tmp_path / "sub" / "b.png"
    for bad in ("../b.png", "sub/../../b.png", "/abs/b.png"):
        with pytest.raises(InputError, match="file_name"):
            resolve_image_path(tmp_path, bad)
    assert resolve_image_path(tmp_path, "/abs/b.png", allow_outside_images=True) == Path("/abs/b.png")
    assert resolve_image_path(tmp_path / "d", "../b.png", allow_outside_images=True) == tmp_path / "d/../b.png"


def test_write_json_atomic_deterministic_and_creates_dirs(tmp_path):
    obj = {"b": [1, 2.5, np.int64(3), np.float32(0.5)], "a": {"counts": b"abc"}, "m": np.arange(3)}
    path = tmp_path / "x" / "y" / "out.json"
    write_json_atomic(obj, path)
    first = path.read_bytes()
    assert first == b'{"b":[1,2.5,3,0.5],"a":{"counts":"abc"},"m":[0,1,2]}'
    write_json_atomic(obj, path)
    assert path.read_bytes() == first
    assert os.listdir(path.parent) == ["out.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # as open() would create it, not mkstemp's 0600


def test_write_json_atomic_failure_leaves_nothing(tmp_path):
    path = tmp_path / "out.json"
    bad = {"images": [{"id": 1}] * 1000 + [{"id": object()}]}
    with pytest.raises(TypeError):
        write_json_atomic(bad, path)
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError):
        write_json_atomic({"score": float("nan")}, path)
    assert os.listdir(tmp_path) == []


def test_write_json_atomic_does_not_clobber_existing(tmp_path):
    path = tmp_path / "out.json"
    write_json_atomic({"old": True}, path)
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_json_atomic({"new": [1, 2, {3}]}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.json"]


def test_write_json_atomic_failure_while_writing_removes_temp(tmp_path, monkeypatch):
    path = tmp_path / "out.json"
    write_json_atomic({"old": True}, path)

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="No space"):
        write_json_atomic({"new": True}, path)
    assert os.listdir(tmp_path) == ["out.json"]
    assert json.loads(path.read_text()) == {"old": True}


def test_write_coco_is_loadable_by_pycocotools(tmp_path):
    data = _coco()
    data["annotations"] = [a for a in data["annotations"] if "segmentation" in a]
    path = tmp_path / "out" / "coco.json"
    write_coco(data, path)
    coco = COCO(str(path))
    assert sorted(coco.getAnnIds()) == [10, 11]
    assert coco.annToMask(coco.anns[10]).sum() == 48
    assert load_coco(path) == data


def test_annotations_by_image_and_category_names():
    data = _coco()
    by_image = annotations_by_image(data)
    assert list(by_image) == [1, 2, 3]
    assert [a["id"] for a in by_image[1]] == [10, 11]
    assert [a["id"] for a in by_image[2]] == [12, 13, 14, 15]
    assert by_image[3] == []
    assert category_names(data) == {1: "cat", 2: "dog"}
    bad = copy.deepcopy(data)
    bad["annotations"][0]["image_id"] = 9
    with pytest.raises(InputError, match="annotation id=10: image_id"):
        annotations_by_image(bad)


def test_check_image_files(tmp_path):
    data = _coco()
    data["images"].append({"id": 4, "file_name": "missing.png", "height": H, "width": W})
    data["images"].append({"id": 5, "file_name": "../out.png", "height": H, "width": W})
    images_dir = tmp_path / "imgs"
    (images_dir / "sub").mkdir(parents=True)
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(images_dir / "a.png")
    Image.fromarray(np.zeros((H + 1, W, 3), np.uint8)).save(images_dir / "sub" / "b.png")
    (images_dir / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "out.png")

    problems = check_image_files(data, images_dir)
    assert len(problems) == 4, problems
    assert problems[0].startswith("image id=2: height, width:") and "32x25" in problems[0]
    assert problems[1].startswith("image id=3: file_name: undecodable") and "c.png" in problems[1]
    assert problems[2].startswith("image id=4: file_name:") and "does not exist" in problems[2]
    assert problems[3].startswith("image id=5: file_name:") and "climbs out" in problems[3]
    assert len(check_image_files(data, images_dir, allow_outside_images=True)) == 3
