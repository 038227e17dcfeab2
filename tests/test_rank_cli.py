"""``omnilabel rank`` as a user drives it: the table, --json, a relabel subset pycocotools loads, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_runner import run_in_process as run
from pycocotools.coco import COCO

from omnilabel.data.maps import UncertaintyMap

# image id -> [(annotation id, source, uncertainty_mean)]; by mean: 3 (0.6), 5 (0.55), 2 (0.5), 1 (0.2);
# by max: 2 (0.9), 3 (0.6), 5 (0.55), 1 (0.2); image 4 has GT only and is not ranked.
SCORES = {
    1: [(10, "pseudo", 0.2), (11, "gt", None)],
    2: [(20, "pseudo", 0.9), (21, "pseudo", 0.1), (22, "gt", None)],
    3: [(30, "pseudo", 0.6)],
    4: [(40, "gt", None)],
    5: [(50, "pseudo", 0.55)],
}
SQUARE = [[1.0, 1.0, 6.0, 1.0, 6.0, 6.0, 1.0, 6.0]]


@pytest.fixture
def scored(tmp_path: Path) -> Path:
    """A scored pseudomask file in ``run/``: maps under ``run/maps/``, annotation 21's map at an absolute path."""
    run_dir, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    (run_dir / "maps").mkdir(parents=True)
    elsewhere.mkdir()
    anns = []
    for image_id, rows in SCORES.items():
        for ann_id, source, u in rows:
            info: dict = {"source": source}
            if u is not None:
                umap = UncertaintyMap(np.full((8, 8), u, dtype=np.float32))
                if ann_id == 21:
                    info["uncertainty"] = str(umap.save(elsewhere / f"{ann_id}.png"))
                else:
                    umap.save(run_dir / "maps" / f"{ann_id}.png")
                    info["uncertainty"] = f"maps/{ann_id}.png"
                info["uncertainty_mean"] = u
            anns.append({"id": ann_id, "image_id": image_id, "category_id": 1, "segmentation": SQUARE,
                         "bbox": [1.0, 1.0, 5.0, 5.0], "area": 25.0, "iscrowd": 0, "score": 0.9,
                         "omnilabel": info})
    data = {"info": {"description": "scored"}, "licenses": [],
            "images": [{"id": i, "file_name": f"img{i}.png", "height": 8, "width": 8} for i in SCORES],
            "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
    path = run_dir / "pseudo_u.json"
    path.write_text(json.dumps(data))
    return path


def test_help_explains_the_score(capsys) -> None:
    code, out, _ = run(capsys, "rank", "--help")
    assert code == 0
    assert "uncertainty_mean" in out and "--by" in out and "max" in out and "--top" in out


def test_table_and_json(capsys, scored: Path, tmp_path: Path) -> None:
    code, out, err = run(capsys, "rank", scored, "--json", tmp_path / "ranking.json")
    assert code == 0, err
    assert "4 of 5 images ranked, 1 without a scored pseudomask" in out
    assert out.index("img3.png") < out.index("img5.png") < out.index("img2.png") < out.index("img1.png")
    assert "img4.png" not in out
    got = json.loads((tmp_path / "ranking.json").read_text())
    assert got["by"] == "mean" and got["input"] == str(scored) and got["unranked_images"] == 1
    assert [r["image_id"] for r in got["ranking"]] == [3, 5, 2, 1]
    assert [r["rank"] for r in got["ranking"]] == [1, 2, 3, 4]
    assert [r["score"] for r in got["ranking"]] == pytest.approx([0.6, 0.55, 0.5, 0.2])
    assert got["ranking"][2] == {"rank": 3, "image_id": 2, "file_name": "img2.png", "n_pseudo": 2,
                                 "score": pytest.approx(0.5), "worst_annotation_id": 20}


def test_top_limits_the_table(capsys, scored: Path) -> None:
    code, out, err = run(capsys, "rank", scored, "--by", "max", "--top", "1")
    assert code == 0, err
    assert "img2.png" in out and "img3.png" not in out
    assert "showing the top 1" in out


def test_relabel_subset_loads_in_pycocotools_and_keeps_map_paths(capsys, scored: Path, tmp_path: Path) -> None:
    relabel = tmp_path / "review" / "batch1" / "relabel.json"
    code, out, err = run(capsys, "rank", scored, "--by", "max", "--top", "2", "-o", relabel)
    assert code == 0, err
    assert f"wrote {relabel}: 2 images, 4 annotations" in out
    coco = COCO(str(relabel))
    assert sorted(coco.getImgIds()) == [2, 3]
    assert sorted(coco.getAnnIds()) == [20, 21, 22, 30]  # GT 22 comes along; ids kept
    assert coco.loadCats(coco.getCatIds()) == [{"id": 1, "name": "thing"}]
    data = json.loads(relabel.read_text())
    assert data["info"] == {"description": "scored"} and data["licenses"] == []
    assert [im["id"] for im in data["images"]] == [2, 3]  # worst first
    source = {a["id"]: a for a in json.loads(scored.read_text())["annotations"]}
    for ann in data["annotations"]:
        old = source[ann["id"]]["omnilabel"].get("uncertainty")
        new = ann["omnilabel"].get("uncertainty")
        if old is None:
            assert new is None
            continue
        old_path = Path(old) if Path(old).is_absolute() else scored.parent / old
        assert (relabel.parent / new).samefile(old_path), (ann["id"], new)
        assert Path(new).is_absolute() == Path(old).is_absolute()
        assert new != old or Path(old).is_absolute()  # a relative path had to change to stay valid


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--top", "0"], "--top must be an integer >= 1, got 0"),
        (["-o", "OUT"], "-o needs --top N"),
    ],
    ids=["top_zero", "output_without_top"],
)
def test_flag_errors_write_nothing(capsys, scored: Path, tmp_path: Path, flags: list[str], message: str) -> None:
    out_path = tmp_path / "relabel.json"
    flags = [str(out_path) if f == "OUT" else f for f in flags]
    code, _, err = run(capsys, "rank", scored, *flags, "--json", tmp_path / "r.json")
    assert code == 1 and message in err and "Traceback" not in err
    assert not out_path.exists() and not (tmp_path / "r.json").exists()


def test_unscored_file_tells_what_to_run(capsys, scored: Path, tmp_path: Path) -> None:
    data = json.loads(scored.read_text())
    for ann in data["annotations"]:
        if ann["omnilabel"]["source"] == "pseudo":
            del ann["omnilabel"]["uncertainty_mean"]
    data["annotations"][1]["omnilabel"]["uncertainty_mean"] = 0.5  # a GT annotation's score does not count
    plain = tmp_path / "pseudo.json"
    plain.write_text(json.dumps(data))
    code, _, err = run(capsys, "rank", plain, "--top", "1", "-o", tmp_path / "relabel.json")
    assert code == 1 and "Traceback" not in err
    assert str(plain) in err and "omnilabel uncertainty" in err and "--refiner" in err
    assert not (tmp_path / "relabel.json").exists()


def test_bad_score_names_file_annotation_and_field(capsys, scored: Path) -> None:
    data = json.loads(scored.read_text())
    data["annotations"][0]["omnilabel"]["uncertainty_mean"] = 1.2  # annotation 10
    scored.write_text(json.dumps(data))
    code, _, err = run(capsys, "rank", scored)
    assert code == 1
    assert str(scored) in err and "annotation id=10" in err and "omnilabel.uncertainty_mean" in err and "1.2" in err
