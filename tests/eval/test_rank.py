"""Ranking images by pseudomask uncertainty: order by mean and by max, ties, unranked images, errors, subsets."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

from omnilabel.errors import InputError
from omnilabel.eval.rank import RankBy, rank_images, rebase_path, subset_coco


def _ann(ann_id: int, image_id: int, *, source: str | None = "pseudo", u: object = "absent",
         path: str | None = None) -> dict:
    ann = {"id": ann_id, "image_id": image_id, "category_id": 1, "bbox": [1.0, 1.0, 4.0, 4.0]}
    if source is None:
        return ann
    info: dict = {"source": source}
    if u != "absent":
        info["uncertainty_mean"] = u
    if path is not None:
        info["uncertainty"] = path
    ann["omnilabel"] = info
    return ann


def _coco() -> dict:
    """Six images, listed out of id order so that id ties cannot pass by file order.

    Pseudomask scores (dyadic, so means are exact) and what they give:

    ======  ===================================  ======  =====  ============
    image   scored pseudomasks (annotation id)   mean    max    worst
    ======  ===================================  ======  =====  ============
    1       0.25 (10), 0.75 (11)                 0.5     0.75   11
    2       0.625 (20); plain annotation 21      0.625   0.625  20
    3       0.125 (30), 0.875 (31); GT 1.0 (32)  0.5     0.875  31
    4       GT 0.875 (40) only                   --      --     not ranked
    5       none                                 --      --     not ranked
    6       0.5 (61), 0.5 (60); unscored 62      0.5     0.5    60 (tie: lower id)
    ======  ===================================  ======  =====  ============
    """
    images = [{"id": i, "file_name": f"img{i}.png", "height": 8, "width": 8} for i in (6, 3, 1, 2, 4, 5)]
    annotations = [
        _ann(61, 6, u=0.5), _ann(60, 6, u=0.5), _ann(62, 6),
        _ann(30, 3, u=0.125), _ann(31, 3, u=0.875), _ann(32, 3, source="gt", u=1.0),
        _ann(10, 1, u=0.25), _ann(11, 1, u=0.75),
        _ann(20, 2, u=0.625), _ann(21, 2, source=None),
        _ann(40, 4, source="gt", u=0.875),
    ]
    return {"info": {"description": "hand-made"}, "licenses": [{"id": 1, "name": "x"}], "images": images,
            "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}


@pytest.mark.parametrize(
    ("by", "order", "scores"),
    [
        (RankBy.MEAN, [2, 1, 3, 6], [0.625, 0.5, 0.5, 0.5]),  # 1, 3, 6 tie at 0.5: by image id
        (RankBy.MAX, [3, 1, 2, 6], [0.875, 0.75, 0.625, 0.5]),
    ],
    ids=["mean", "max"],
)
def test_order_and_scores(by: RankBy, order: list[int], scores: list[float]) -> None:
    ranking = rank_images(_coco(), by=by)
    assert ranking.by is by
    assert [r.image_id for r in ranking.images] == order
    assert [r.score for r in ranking.images] == scores
    assert [r.rank for r in ranking.images] == [1, 2, 3, 4]
    assert [r.file_name for r in ranking.images] == [f"img{i}.png" for i in order]


def test_default_is_mean_and_strings_are_accepted() -> None:
    assert [r.image_id for r in rank_images(_coco()).images] == [2, 1, 3, 6]
    assert [r.image_id for r in rank_images(_coco(), by="max").images] == [3, 1, 2, 6]  # type: ignore[arg-type]


def test_worst_annotation_and_counts_ignore_gt_and_unscored() -> None:
    rows = {r.image_id: r for r in rank_images(_coco()).images}
    assert {i: r.worst_annotation_id for i, r in rows.items()} == {1: 11, 2: 20, 3: 31, 6: 60}
    assert {i: r.n_pseudo for i, r in rows.items()} == {1: 2, 2: 1, 3: 2, 6: 2}


def test_images_without_scores_are_counted_not_ranked() -> None:
    ranking = rank_images(_coco())
    assert {r.image_id for r in ranking.images}.isdisjoint({4, 5})
    assert ranking.unranked_images == 2
    assert ranking.unscored_pseudo == 1  # annotation 62; the plain annotation 21 is not a pseudomask


def test_ties_do_not_depend_on_file_order() -> None:
    data = _coco()
    data["images"].reverse()
    data["annotations"].reverse()
    ranking = rank_images(data)
    assert [r.image_id for r in ranking.images] == [2, 1, 3, 6]
    assert {r.image_id: r.worst_annotation_id for r in ranking.images}[6] == 60


def test_to_dict() -> None:
    d = rank_images(_coco(), by=RankBy.MAX).to_dict()
    assert d["by"] == "max" and d["ranked_images"] == 4 and d["unranked_images"] == 2
    assert d["ranking"][0] == {"rank": 1, "image_id": 3, "file_name": "img3.png", "n_pseudo": 2, "score": 0.875,
                               "worst_annotation_id": 31}


def test_null_score_counts_as_absent() -> None:
    data = _coco()
    data["annotations"][0]["omnilabel"]["uncertainty_mean"] = None  # annotation 61 of image 6
    ranking = rank_images(data)
    row = {r.image_id: r for r in ranking.images}[6]
    assert row.n_pseudo == 1 and row.worst_annotation_id == 60
    assert ranking.unscored_pseudo == 2


def test_no_scores_names_the_file_and_what_to_run() -> None:
    data = _coco()
    for ann in data["annotations"]:
        if (ann.get("omnilabel") or {}).get("source") == "pseudo":
            ann["omnilabel"].pop("uncertainty_mean", None)
    with pytest.raises(InputError) as e:
        rank_images(data, source="pseudo.json")
    msg = str(e.value)
    assert msg.startswith("pseudo.json: ")
    assert "omnilabel uncertainty PSEUDO.json --refiner R.pt" in msg and "pseudomask --refiner" in msg
    # scores on GT annotations (32 and 40 keep theirs) do not make the file ranked


@pytest.mark.parametrize("value", [1.5, -0.25, "0.5", True, float("nan"), float("inf"), [0.5]],
                         ids=["above_1", "negative", "string", "bool", "nan", "inf", "list"])
def test_bad_score_names_file_annotation_and_field(value: object) -> None:
    data = _coco()
    data["annotations"][3]["omnilabel"]["uncertainty_mean"] = value  # annotation 30
    with pytest.raises(InputError) as e:
        rank_images(data, source="pseudo.json")
    assert e.value.problems == [f"pseudo.json: annotation id=30: omnilabel.uncertainty_mean: expected a number in "
                                f"[0, 1], got {value!r}"]
    assert str(e.value).startswith("pseudo.json: ")


def test_every_bad_score_is_listed() -> None:
    data = _coco()
    data["annotations"][3]["omnilabel"]["uncertainty_mean"] = 2.0
    data["annotations"][6]["omnilabel"]["uncertainty_mean"] = -1
    with pytest.raises(InputError) as e:
        rank_images(data)
    assert [p.split(": ")[1] for p in e.value.problems] == ["annotation id=30", "annotation id=10"]


def test_bounds_are_valid_and_a_bad_gt_score_is_ignored() -> None:
    data = _coco()
    data["annotations"][3]["omnilabel"]["uncertainty_mean"] = 0  # annotation 30: an int 0 is a number
    data["annotations"][4]["omnilabel"]["uncertainty_mean"] = 1  # annotation 31
    data["annotations"][5]["omnilabel"]["uncertainty_mean"] = "bad"  # annotation 32, source gt: ignored
    rows = {r.image_id: r for r in rank_images(data, by=RankBy.MAX).images}
    assert rows[3].score == 1.0 and rows[3].rank == 1


def test_subset_keeps_all_annotations_and_other_keys(tmp_path: Path) -> None:
    data = _coco()
    before = copy.deepcopy(data)
    sub = subset_coco(data, [3, 1], src_dir=tmp_path, dst_dir=tmp_path)
    assert data == before  # the input is not modified
    assert [im["id"] for im in sub["images"]] == [3, 1]
    assert [a["id"] for a in sub["annotations"]] == [30, 31, 32, 10, 11]  # GT 32 too, ids and file order kept
    assert sub["categories"] == data["categories"]
    assert sub["info"] == data["info"] and sub["licenses"] == data["licenses"]
    with pytest.raises(InputError, match="no image with id 99"):
        subset_coco(data, [3, 99], src_dir=tmp_path, dst_dir=tmp_path)


def test_subset_rewrites_map_paths(tmp_path: Path) -> None:
    src, dst = tmp_path / "run", tmp_path / "review" / "batch1"
    (src / "maps").mkdir(parents=True)
    dst.mkdir(parents=True)
    rel, absolute = src / "maps" / "30.png", tmp_path / "elsewhere" / "31.png"
    rel.write_bytes(b"30")
    data = _coco()
    data["annotations"][3]["omnilabel"]["uncertainty"] = "maps/30.png"
    data["annotations"][4]["omnilabel"]["uncertainty"] = str(absolute)
    sub = subset_coco(data, [3], src_dir=src, dst_dir=dst)
    new_ref = sub["annotations"][0]["omnilabel"]["uncertainty"]
    assert not os.path.isabs(new_ref) and new_ref == "../../run/maps/30.png"
    assert (dst / new_ref).read_bytes() == b"30"
    assert sub["annotations"][1]["omnilabel"]["uncertainty"] == str(absolute)
    assert data["annotations"][3]["omnilabel"]["uncertainty"] == "maps/30.png"


def test_rebase_path_same_folder_and_through_a_link(tmp_path: Path) -> None:
    assert rebase_path("maps/1.png", src_dir=tmp_path, dst_dir=tmp_path) == "maps/1.png"
    (tmp_path / "real" / "deep").mkdir(parents=True)
    (tmp_path / "src" / "maps").mkdir(parents=True)
    (tmp_path / "src" / "maps" / "1.png").write_bytes(b"1")
    (tmp_path / "link").symlink_to(tmp_path / "real" / "deep")
    # ".." from the link climbs real/deep's parent, not tmp_path: the result must account for that
    new_ref = rebase_path("maps/1.png", src_dir=tmp_path / "src", dst_dir=tmp_path / "link")
    assert (tmp_path / "link" / new_ref).read_bytes() == b"1"
