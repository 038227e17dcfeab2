from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from omnilabel.errors import InputError
from omnilabel.eval.miou import boundary_iou, boundary_width_px, has_weak_ids, teacher_miou

H, W = 100, 100  # diagonal 141.4 px: boundary band d = round(0.02 * 141.4) = 3 px
D = 3
S = 40  # side of the GT squares


def _rect(y0: int, x0: int, h: int, w: int, *, shape: tuple[int, int] = (H, W)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[y0:y0 + h, x0:x0 + w] = True
    return mask


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


# Boundary IoU of an interior S x S square and its top half (S x S/2), derived by hand: a disk of radius d
# erodes an axis-aligned rectangle to the rectangle shrunk by d on every side.
_INTER = S * S // 2 - (S // 2 - D) * (S - 2 * D)
_BAND_FULL = S * S - (S - 2 * D) ** 2
_BAND_HALF = S * S // 2 - (S // 2 - 2 * D) * (S - 2 * D)
HALF_BOUNDARY_IOU = _INTER / (_BAND_FULL + _BAND_HALF - _INTER)  # 222 / 546


def test_boundary_width_px() -> None:
    assert boundary_width_px(H, W) == D
    assert boundary_width_px(10, 10) == 1  # 0.28 px rounds to 0, floored at 1
    assert boundary_width_px(480, 640, dilation_ratio=0.01) == 8


@pytest.mark.parametrize(
    ("mask_a", "mask_b", "expected"),
    [
        (_rect(10, 10, S, S), _rect(10, 10, S, S), 1.0),
        (_rect(10, 10, 20, 20), _rect(60, 60, 20, 20), 0.0),
        (np.zeros((H, W), bool), np.zeros((H, W), bool), 1.0),
        (_rect(10, 10, S, S), np.zeros((H, W), bool), 0.0),
        (_rect(10, 10, S, S), _rect(10, 10, S // 2, S), HALF_BOUNDARY_IOU),
        # a full-image mask has its band along the image border: the ring of width d is exactly that band
        (np.ones((H, W), bool), ~_rect(D, D, H - 2 * D, W - 2 * D), 1.0),
    ],
    ids=["identical", "disjoint", "both_empty", "one_empty", "square_vs_half", "image_border"],
)
def test_boundary_iou_table(mask_a: np.ndarray, mask_b: np.ndarray, expected: float) -> None:
    assert boundary_iou(mask_a, mask_b) == pytest.approx(expected, abs=1e-12)
    assert boundary_iou(mask_b, mask_a) == pytest.approx(expected, abs=1e-12)


def test_boundary_iou_is_more_sensitive_than_mask_iou_to_a_shift() -> None:
    square = _rect(20, 20, 60, 60)
    shifted = _rect(20, 21, 60, 60)
    mask_iou = _mask_iou(square, shifted)  # 59 / 61
    assert mask_iou == pytest.approx(59 / 61)
    b_iou = boundary_iou(square, shifted)
    assert 1.0 - b_iou > 5 * (1.0 - mask_iou)


def test_boundary_iou_with_band_covering_the_mask_equals_mask_iou() -> None:
    a, b = _rect(20, 20, 30, 30), _rect(25, 28, 30, 24)
    assert boundary_iou(a, b, dilation_ratio=1.0) == pytest.approx(_mask_iou(a, b))
    assert boundary_iou(a, b, dilation_ratio=0.02) < boundary_iou(a, b, dilation_ratio=0.2)


def test_boundary_iou_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shape"):
        boundary_iou(np.zeros((4, 4), bool), np.zeros((4, 5), bool))
    with pytest.raises(ValueError, match="dilation_ratio"):
        boundary_iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool), dilation_ratio=0.0)


# GT: (annotation id, image id, y0, x0) of interior S x S squares.
GT_SQUARES = [(1, 1, 10, 10), (2, 1, 50, 50), (3, 2, 10, 50), (4, 2, 50, 10), (5, 2, 30, 30)]
WEAK_OF = {1: "points", 2: "points", 3: "boxes", 4: "boxes", 5: "points"}


def make_gt() -> dict:
    return {"images": [{"id": i, "file_name": f"{i}.png", "height": H, "width": W} for i in (1, 2)],
            "categories": [{"id": 1, "name": "thing"}],
            "annotations": [{"id": a, "image_id": img, "category_id": 1, "segmentation": _rle(_rect(y, x, S, S)),
                             "area": S * S, "bbox": [x, y, S, S], "iscrowd": 0}
                            for a, img, y, x in GT_SQUARES]}


def make_pred(halve: set[str]) -> dict:
    """Pseudomasks: one per GT square (exact, or its top half for weak types in ``halve``), plus a gt
    passthrough and two detections that must not be scored."""
    anns = []
    for a, img, y, x in GT_SQUARES:
        weak = WEAK_OF[a]
        mask = _rect(y, x, S // 2 if weak in halve else S, S)
        anns.append({"id": 100 + a, "image_id": img, "category_id": 1, "segmentation": _rle(mask), "score": 0.9,
                     "omnilabel": {"source": "pseudo", "weak": weak, "weak_id": a}})
    empty = _rle(np.zeros((H, W), bool))
    anns += [
        {"id": 200, "image_id": 1, "category_id": 1, "segmentation": empty, "score": 1.0,
         "omnilabel": {"source": "gt", "weak": "points", "weak_id": 1}},
        {"id": 201, "image_id": 1, "category_id": 1, "segmentation": empty, "score": 0.4,
         "omnilabel": {"source": "pseudo", "weak": "tags", "weak_id": None}},
        {"id": 202, "image_id": 2, "category_id": 1, "segmentation": empty, "score": 0.4,
         "omnilabel": {"source": "pseudo", "weak": "none", "weak_id": -1}},
    ]
    return {"images": make_gt()["images"], "categories": make_gt()["categories"], "annotations": anns}


N_POINTS, N_BOXES = 3, 2


@pytest.mark.parametrize(
    ("halve", "expected"),
    [
        (set(), {"points": (1.0, 1.0), "boxes": (1.0, 1.0), "all": (1.0, 1.0)}),
        ({"points"}, {"points": (0.5, HALF_BOUNDARY_IOU), "boxes": (1.0, 1.0),
                      "all": ((N_POINTS * 0.5 + N_BOXES) / 5, (N_POINTS * HALF_BOUNDARY_IOU + N_BOXES) / 5)}),
        ({"points", "boxes"}, {"points": (0.5, HALF_BOUNDARY_IOU), "boxes": (0.5, HALF_BOUNDARY_IOU),
                               "all": (0.5, HALF_BOUNDARY_IOU)}),
    ],
    ids=["perfect", "points_halved", "all_halved"],
)
def test_teacher_miou_per_weak_type(halve: set[str], expected: dict) -> None:
    result = teacher_miou(make_pred(halve), make_gt())
    assert list(result) == ["boxes", "points", "all"]  # tags/none detections and the gt passthrough: absent
    counts = {"points": N_POINTS, "boxes": N_BOXES, "all": N_POINTS + N_BOXES}
    for weak, (miou, b_iou) in expected.items():
        assert result[weak]["miou"] == pytest.approx(miou, abs=1e-12), weak
        assert result[weak]["boundary_iou"] == pytest.approx(b_iou, abs=1e-12), weak
        assert result[weak]["count"] == counts[weak], weak


@pytest.mark.parametrize(
    ("gt_rect", "pred_rect"),
    [
        ((0, 0, 30, 40), (0, 1, 30, 40)),  # touches the top-left image border
        ((60, 55, 40, 45), (58, 55, 42, 45)),  # touches the bottom-right border
        ((40, 40, 12, 12), (43, 38, 12, 15)),  # interior
    ],
    ids=["top_left_border", "bottom_right_border", "interior"],
)
def test_teacher_miou_matches_full_image_metrics(gt_rect: tuple, pred_rect: tuple) -> None:
    gt_mask, pred_mask = _rect(*gt_rect), _rect(*pred_rect)
    gt = {"images": [{"id": 1, "height": H, "width": W}], "categories": [{"id": 1, "name": "thing"}],
          "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "segmentation": _rle(gt_mask)}]}
    pred = {"images": gt["images"], "categories": gt["categories"],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": _rle(pred_mask),
                             "omnilabel": {"source": "pseudo", "weak": "boxes", "weak_id": 7}}]}
    result = teacher_miou(pred, gt)
    assert result["boxes"]["miou"] == pytest.approx(_mask_iou(gt_mask, pred_mask), abs=1e-12)
    assert result["boxes"]["boundary_iou"] == pytest.approx(boundary_iou(pred_mask, gt_mask), abs=1e-12)
    assert result["all"] == result["boxes"]


def test_polygon_gt_is_decoded_at_the_image_size() -> None:
    gt = make_gt()
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    assert teacher_miou(make_pred(set()), gt)["all"]["miou"] == pytest.approx(1.0)


def test_nothing_to_score() -> None:
    pred = make_pred(set())
    pred["annotations"] = [a for a in pred["annotations"] if a["id"] >= 200]
    assert not has_weak_ids(pred)
    assert teacher_miou(pred, make_gt()) == {}
    assert has_weak_ids(make_pred(set()))


def test_weak_id_absent_from_gt_is_ignored() -> None:
    pred = make_pred(set())
    pred["annotations"][0]["omnilabel"]["weak_id"] = 999
    assert teacher_miou(pred, make_gt())["points"]["count"] == N_POINTS - 1


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"image_id": 2}, "image"),
        ({"segmentation": None}, "'segmentation'"),
        ({"segmentation": _rle(np.ones((H, W + 2), bool))}, "mask size"),
    ],
    ids=["other_image", "no_segmentation", "wrong_size"],
)
def test_bad_pseudomask_raises_naming_it(change: dict, expected: str) -> None:
    pred = make_pred(set())
    pred["annotations"][0].update(change)
    with pytest.raises(InputError, match="annotation id 101") as info:
        teacher_miou(pred, make_gt())
    assert expected in str(info.value)


def test_not_a_coco_file_raises() -> None:
    with pytest.raises(InputError, match="annotations"):
        teacher_miou([], make_gt())  # type: ignore[arg-type]
