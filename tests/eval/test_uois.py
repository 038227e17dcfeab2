"""UOIS metrics (Overlap / Boundary P/R/F, %75) on hand-made label maps, and ``evaluate --uois``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from cli_runner import run_in_process as run
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from omnilabel.data.synthetic import make_dataset
from omnilabel.errors import InputError
from omnilabel.eval.uois import (
    UoisScores,
    boundary_map,
    boundary_tolerance_px,
    evaluate_uois,
    gt_label_map,
    image_metrics,
    mean_scores,
    paint_label_map,
)
from omnilabel.ops.masks import masks_to_rle, rle_to_masks

# 20x20 images: diagonal 28.3 px, so the tolerance radius is ceil(0.003 * 28.3) = 1 px.
H = W = 20


def rect(y0: int, x0: int, h: int, w: int, *, size: tuple[int, int] = (H, W)) -> np.ndarray:
    mask = np.zeros(size, dtype=bool)
    mask[y0:y0 + h, x0:x0 + w] = True
    return mask


def labels(*masks: np.ndarray, size: tuple[int, int] = (H, W)) -> np.ndarray:
    """Label map of disjoint masks: mask k gets label k + 1."""
    out = np.zeros(size, dtype=np.int32)
    for k, m in enumerate(masks):
        assert not (out[m] > 0).any()
        out[m] = k + 1
    return out


def scores_tuple(s: UoisScores) -> tuple[float, ...]:
    return (s.overlap_p, s.overlap_r, s.overlap_f, s.boundary_p, s.boundary_r, s.boundary_f, s.f75)


SQUARE = rect(4, 4, 8, 8)  # 64 px; its 1-px boundary is the 9x9 ring from (3, 3) to (11, 11): 32 px


def test_boundary_map_is_seg2bmap():
    b = boundary_map(SQUARE)
    ring = rect(3, 3, 9, 9) & ~rect(4, 4, 7, 7)
    assert np.array_equal(b, ring) and b.sum() == 32
    # Touching the bottom and right edges: no boundary along them (DAVIS seg2bmap's last row / column).
    corner = boundary_map(rect(16, 16, 4, 4))
    assert np.array_equal(corner, rect(15, 15, 5, 1) | rect(15, 15, 1, 5))
    assert boundary_tolerance_px(480, 640) == 3 and boundary_tolerance_px(H, W) == 1


def test_perfect_prediction_scores_one():
    gt = labels(SQUARE, rect(14, 2, 4, 10), rect(1, 14, 6, 5))
    pred = np.where(gt > 0, 10 - gt, 0)  # other label values, same objects
    s = image_metrics(pred, gt)
    assert scores_tuple(s) == (1.0,) * 7 and (s.gt_objects, s.pred_objects) == (3, 3)


def test_prediction_covering_half_the_object():
    s = image_metrics(labels(rect(4, 4, 8, 4)), labels(SQUARE))
    # Overlap: |c ∩ g| = 32 of |c| = 32 and |g| = 64.
    assert (s.overlap_p, s.overlap_r) == (1.0, 0.5)
    assert s.overlap_f == pytest.approx(2 / 3)
    # Boundary: the prediction's ring (3, 3)-(11, 7) has 24 px; 19 lie within 1 px of the GT ring (col 3: 9,
    # rows 3 and 11 at cols 4-7: 8, and (4, 7), (10, 7)); 19 of the GT ring's 32 lie within 1 px of it (col 3:
    # 9, rows 3 and 11 at cols 4-8: 10).
    assert s.boundary_p == pytest.approx(19 / 24) and s.boundary_r == pytest.approx(19 / 32)
    assert s.boundary_f == pytest.approx(2 * (19 / 24) * (19 / 32) / (19 / 24 + 19 / 32))
    assert s.f75 == 0.0  # F = 2/3


def test_extra_false_positive_lowers_precision_only():
    s = image_metrics(labels(SQUARE, rect(15, 15, 4, 4)), labels(SQUARE))
    # Overlap P = 64 / (64 + 16); the 4x4 false positive adds a 16-px ring, far from the GT: P = 32 / 48.
    assert (s.overlap_p, s.overlap_r, s.boundary_r, s.f75) == (0.8, 1.0, 1.0, 1.0)
    assert s.overlap_f == pytest.approx(2 * 0.8 / 1.8)
    assert s.boundary_p == pytest.approx(32 / 48)
    assert s.pred_objects == 2


def test_over_segmentation_matches_one_part():
    # The GT square split into 8x6 (F = 96 / 112) and 8x2 (F = 32 / 80): the Hungarian match takes the 8x6.
    s = image_metrics(labels(rect(4, 4, 8, 6), rect(4, 10, 8, 2)), labels(SQUARE))
    assert (s.overlap_p, s.overlap_r, s.overlap_f) == (48 / 64, 48 / 64, 0.75)
    assert s.f75 == 1.0  # 96 / 112 > 0.75
    assert s.boundary_r < 1.0


@pytest.mark.parametrize(("pred", "gt", "expected"), [
    ("none", "one", (1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0)),
    ("one", "none", (0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0)),
    ("none", "none", (1.0,) * 7),
], ids=["no_predictions", "no_gt", "neither"])
def test_empty_edge_cases(pred, gt, expected):
    maps = {"none": np.zeros((H, W), np.int32), "one": labels(SQUARE)}
    assert scores_tuple(image_metrics(maps[pred], maps[gt])) == expected


def test_f75_is_strict():
    gt = labels(rect(2, 2, 4, 10))  # 40 px
    exact = image_metrics(labels(rect(2, 2, 4, 6)), gt)  # 24 px inside: F = 48 / 64 = 0.75 exactly
    assert exact.overlap_f == pytest.approx(0.75) and exact.f75 == 0.0
    above = image_metrics(labels(rect(2, 2, 4, 6) | rect(2, 8, 1, 1)), gt)  # 25 px: F = 50 / 65
    assert above.f75 == 1.0
    # Two GT objects, one detected: %75 divides by the GT objects.
    two = image_metrics(labels(rect(2, 2, 4, 10)), labels(rect(2, 2, 4, 10), rect(12, 2, 4, 10)))
    assert two.f75 == 0.5


def test_boundary_tolerance():
    gt = labels(SQUARE)
    near = image_metrics(labels(rect(4, 5, 8, 8)), gt)  # 1 px right: every boundary pixel within 1 px
    assert near.overlap_f == pytest.approx(2 * 56 / 128)
    assert (near.boundary_p, near.boundary_r, near.boundary_f) == (1.0, 1.0, 1.0)
    far = image_metrics(labels(rect(4, 7, 8, 8)), gt)  # 3 px right: only the top and bottom rows match
    assert far.boundary_f < 1.0
    # At 640x480 the radius is 3 px: a 3-px shift is tolerated, a 4-px one is not.
    size = (480, 640)
    big = labels(rect(100, 100, 50, 80, size=size), size=size)
    for shift, full in ((3, True), (4, False)):
        s = image_metrics(labels(rect(100, 100 + shift, 50, 80, size=size), size=size), big)
        assert (s.boundary_f == 1.0) is full and s.overlap_f < 1.0


def test_paint_order_higher_score_wins():
    low, high = rect(2, 2, 10, 10), rect(6, 6, 10, 10)
    for masks, scores in (([low, high], [0.2, 0.9]), ([high, low], [0.9, 0.2])):
        painted = paint_label_map(np.stack(masks), scores=scores)
        k_high = 1 + scores.index(0.9)
        assert np.array_equal(painted == k_high, high)
        assert np.array_equal(painted == 3 - k_high, low & ~high)
    # Equal scores (and the GT): the larger is painted first, so the smaller stays whole.
    small, large = rect(5, 5, 3, 3), rect(2, 2, 12, 12)
    painted = paint_label_map([small, large])
    assert np.array_equal(painted == 1, small) and np.array_equal(painted == 2, large & ~small)
    # A mask painted over entirely is no object.
    assert set(np.unique(paint_label_map([small, large], scores=[0.1, 0.5])).tolist()) == {0, 2}
    assert paint_label_map(np.zeros((0, 4, 5), bool)).shape == (4, 5)


def test_gt_crowd_regions_are_dont_care():
    obj, crowd = rect(2, 2, 6, 6), rect(10, 10, 8, 8)
    gt, ignore = gt_label_map([obj, crowd], iscrowd=[False, True])
    assert np.array_equal(gt, labels(obj)) and np.array_equal(ignore, crowd)
    s = image_metrics(labels(obj, rect(11, 11, 4, 4)), gt, ignore=ignore)  # a prediction inside the crowd
    assert scores_tuple(s) == (1.0,) * 7 and s.pred_objects == 1
    assert image_metrics(labels(obj, rect(11, 11, 4, 4)), gt).overlap_p < 1.0


def _naive_boundary_tps(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, int, int]:
    """The reference's boundary sums on full-size maps: (prec TP, prec denominator, rec TP, rec denominator)."""
    r = boundary_tolerance_px(*gt.shape)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disk = xx * xx + yy * yy <= r * r
    g_ids, p_ids = [k for k in np.unique(gt) if k], [k for k in np.unique(pred) if k]
    f = np.array([[2 * ((gt == g) & (pred == p)).sum() / ((gt == g).sum() + (pred == p).sum()) for p in p_ids]
                  for g in g_ids])
    rows, cols = linear_sum_assignment(f, maximize=True)
    p_tp = r_tp = 0
    for j, i in zip(rows, cols, strict=True):
        pb, gb = boundary_map(pred == p_ids[i]), boundary_map(gt == g_ids[j])
        p_tp += (pb & ndimage.binary_dilation(gb, disk)).sum()
        r_tp += (gb & ndimage.binary_dilation(pb, disk)).sum()
    return (p_tp, sum(boundary_map(pred == p).sum() for p in p_ids),
            r_tp, sum(boundary_map(gt == g).sum() for g in g_ids))


@pytest.mark.parametrize("seed", range(4))
def test_boundary_on_crops_equals_full_maps(seed):
    rng = np.random.default_rng(seed)
    size = (30, 40)
    gt, pred = np.zeros(size, np.int32), np.zeros(size, np.int32)
    for k in range(1, 5):  # rectangles, some at the image edges, overlapping ones repainted
        for m in (gt, pred):
            y0, x0 = rng.integers(0, 26), rng.integers(0, 36)
            m[y0:y0 + rng.integers(3, 15), x0:x0 + rng.integers(3, 15)] = k
    p_tp, p_den, r_tp, r_den = _naive_boundary_tps(pred, gt)
    s = image_metrics(pred, gt)
    assert s.boundary_p == pytest.approx(p_tp / p_den) and s.boundary_r == pytest.approx(r_tp / r_den)


def test_image_metrics_rejects_bad_maps():
    with pytest.raises(ValueError, match="shape"):
        image_metrics(np.zeros((3, 4), int), np.zeros((4, 3), int))
    with pytest.raises(ValueError, match="integer"):
        image_metrics(np.zeros((3, 4)), np.zeros((3, 4), int))


# --- COCO level ---------------------------------------------------------------------------------------------

def coco_gt(*images: list[tuple[np.ndarray, int]]) -> dict:
    """GT COCO of 20x20 images; each image a list of (mask, iscrowd)."""
    anns = []
    for image_id, objects in enumerate(images, start=1):
        for mask, crowd in objects:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "iscrowd": crowd,
                         "segmentation": masks_to_rle(mask[None])[0]})
    return {"images": [{"id": i, "file_name": f"{i}.png", "height": H, "width": W}
                       for i in range(1, len(images) + 1)],
            "categories": [{"id": 1, "name": "thing"}, {"id": 2, "name": "other"}], "annotations": anns}


def result(image_id: int, mask: np.ndarray, score: float, category_id: int = 2) -> dict:
    return {"image_id": image_id, "category_id": category_id, "score": score,
            "segmentation": masks_to_rle(mask[None])[0]}


def test_per_image_mean_not_pooled():
    small = rect(1, 1, 2, 2)
    gt = coco_gt([(small, 0)], [(SQUARE, 0)])
    # Image 1 perfect (R = 1), image 2 half (R = 0.5): the mean is 0.75; pooled pixels would give 36 / 68.
    # Categories differ from the GT's: UOIS is class-agnostic.
    out = evaluate_uois([result(1, small, 0.9), result(2, rect(4, 4, 8, 4), 0.9)], gt)
    assert out["overlap"]["R"] == pytest.approx(0.75) and out["overlap"]["P"] == 1.0
    assert out["overlap"]["F"] == pytest.approx((1 + 2 / 3) / 2)
    assert out["f75"] == 0.5
    assert (out["images"], out["gt_objects"], out["pred_objects"]) == (2, 2, 2)
    per_image = [image_metrics(labels(small), labels(small)), image_metrics(labels(rect(4, 4, 8, 4)), labels(SQUARE))]
    assert out == mean_scores(per_image)


def test_coco_scores_paint_order_crowd_and_images():
    gt = coco_gt([(SQUARE, 0), (rect(14, 14, 5, 5), 1)], [(rect(2, 2, 3, 3), 0)])
    # A low-score blob over the square listed last loses to the exact square; the one inside the crowd vanishes.
    preds = [result(1, SQUARE, 0.9), result(1, rect(14, 14, 3, 3), 0.5), result(1, rect(2, 2, 12, 12), 0.1)]
    one = evaluate_uois(preds, gt, image_ids=[1])
    assert one["images"] == 1 and one["pred_objects"] == 2
    assert one["overlap"]["R"] == 1.0 and one["overlap"]["P"] == pytest.approx(64 / (64 + 144 - 64))
    # Over every GT image, image 2 has no prediction: P = 1, R = 0 there.
    both = evaluate_uois(preds, gt)
    assert both["images"] == 2 and both["overlap"]["R"] == 0.5


def test_coco_bad_predictions_raise():
    gt = coco_gt([(SQUARE, 0)])
    with pytest.raises(InputError, match="do not match"):
        evaluate_uois([result(7, SQUARE, 1.0)], gt)
    with pytest.raises(InputError, match="do not match"):
        evaluate_uois([result(1, rect(0, 0, 2, 2, size=(10, 10)), 1.0)], gt)
    with pytest.raises(InputError, match="do not match"):
        evaluate_uois([], gt, image_ids=[5])


# --- command line -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("shapes"), n_images=6, seed=11, size_hw=(48, 64), max_objects=4)


def test_cli_evaluate_uois_table_and_json(capsys, shapes, tmp_path):
    # The GT as a complete COCO file of predictions, and as a results list: 1.0 everywhere.
    gt = json.loads(shapes.read_text())
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{k: a[k] for k in ("image_id", "category_id", "segmentation")} | {"score": 1.0}
                                   for a in gt["annotations"]]))
    for pred in (shapes, results):
        code, out, err = run(capsys, "evaluate", pred, "--gt", shapes, "--uois", "--json", tmp_path / "m.json")
        assert code == 0, err
        assert "UOIS (class-agnostic)" in out and "Boundary P/R/F" in out and "%75" in out
        assert "100.0/100.0/100.0" in out
        uois = json.loads((tmp_path / "m.json").read_text())["uois"]
        assert uois["overlap"] == uois["boundary"] == {"P": 1.0, "R": 1.0, "F": 1.0}
        assert uois["f75"] == 1.0 and uois["images"] == 6 and uois["gt_objects"] == len(gt["annotations"])
    # Without the flag: no UOIS table, no `uois` key.
    code, out, err = run(capsys, "evaluate", shapes, "--gt", shapes, "--json", tmp_path / "plain.json")
    assert code == 0, err
    assert "UOIS" not in out and "uois" not in json.loads((tmp_path / "plain.json").read_text())
    # Half of every object shaved off: lower, and printed in percent.
    for ann in gt["annotations"]:
        m = rle_to_masks([ann["segmentation"]], 48, 64)[0]
        cols = np.flatnonzero(m.any(axis=0))
        m[:, cols[0] + math.ceil(len(cols) / 2):] = False
        ann["segmentation"] = masks_to_rle(m[None])[0]
    half = tmp_path / "half.json"
    half.write_text(json.dumps(gt))
    code, out, err = run(capsys, "evaluate", half, "--gt", shapes, "--uois", "--json", tmp_path / "h.json")
    assert code == 0, err
    uois = json.loads((tmp_path / "h.json").read_text())["uois"]
    assert uois["overlap"]["P"] == pytest.approx(1.0) and uois["overlap"]["R"] < 0.8
    assert f"100.0/{100 * uois['overlap']['R']:.1f}/{100 * uois['overlap']['F']:.1f}" in out
