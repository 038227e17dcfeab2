from __future__ import annotations

import itertools

import numpy as np
import pytest

from omnilabel.errors import InputError
from omnilabel.ops.boxes import box_iou
from omnilabel.ops.refine import finite_cost, refine_prompts


def _refine(dino, scores, labels_dino, points, sam, labels_gt, **kw):
    return refine_prompts(
        boxes_dino_xyxy=np.asarray(dino, dtype=float).reshape(-1, 4),
        scores_dino=np.asarray(scores, dtype=float),
        labels_dino=np.asarray(labels_dino, dtype=int),
        points_gt_xy=np.asarray(points, dtype=float).reshape(-1, 2),
        boxes_sam_xyxy=np.asarray(sam, dtype=float).reshape(-1, 4),
        labels_gt=np.asarray(labels_gt, dtype=int),
        **kw,
    )


def test_valid_match_takes_the_dino_box():
    res = _refine([[0, 0, 10, 10]], [0.9], [3], [[5, 5]], [[2, 2, 8, 8]], [3])
    np.testing.assert_array_equal(res.boxes_merged_xyxy, [[0, 0, 10, 10]])
    assert res.from_dino.tolist() == [True]
    assert res.assignment.tolist() == [0]
    assert res.num_from_dino == 1
    iou = 36 / 100
    assert res.cost[0, 0] == pytest.approx(-iou - 2.0 * 0.9)


def test_class_mismatch_keeps_the_sam_box():
    res = _refine([[0, 0, 10, 10]], [0.9], [1], [[5, 5]], [[2, 2, 8, 8]], [3])
    np.testing.assert_array_equal(res.boxes_merged_xyxy, [[2, 2, 8, 8]])
    assert res.from_dino.tolist() == [False]
    assert res.assignment.tolist() == [0]  # assigned, then rejected
    assert res.cost[0, 0] == pytest.approx(5.0 - 0.36 - 1.8)


def test_point_outside_the_detection_keeps_the_sam_box():
    res = _refine([[0, 0, 10, 10]], [0.9], [3], [[11, 5]], [[2, 2, 8, 8]], [3])
    np.testing.assert_array_equal(res.boxes_merged_xyxy, [[2, 2, 8, 8]])
    assert res.from_dino.tolist() == [False]
    assert res.cost[0, 0] == pytest.approx(5.0 - 0.36 - 1.8)


def test_point_on_the_border_counts_as_inside():
    res = _refine([[0, 0, 10, 10]], [0.9], [3], [[10, 0]], [[2, 2, 8, 8]], [3])
    assert res.from_dino.tolist() == [True]


def test_detection_below_tau_c_is_never_used():
    res = _refine([[0, 0, 10, 10]], [0.05], [3], [[5, 5]], [[2, 2, 8, 8]], [3])
    assert np.isinf(res.cost[0]).all()
    np.testing.assert_array_equal(res.boxes_merged_xyxy, [[2, 2, 8, 8]])
    assert res.from_dino.tolist() == [False]
    assert res.assignment.tolist() == [0]  # the solver still pairs it, the pair is invalid


def test_score_equal_to_tau_c_is_kept():
    res = _refine([[0, 0, 10, 10]], [0.1], [3], [[5, 5]], [[2, 2, 8, 8]], [3])
    assert res.from_dino.tolist() == [True]


def test_no_detections_gives_the_sam_boxes():
    sam = [[1, 1, 4, 4], [5, 5, 9, 9]]
    res = _refine(np.zeros((0, 4)), [], [], [[2, 2], [6, 6]], sam, [0, 1])
    np.testing.assert_array_equal(res.boxes_merged_xyxy, sam)
    assert res.from_dino.tolist() == [False, False]
    assert res.assignment.tolist() == [-1, -1]
    assert res.cost.shape == (0, 2)


def test_no_instances_gives_empty_outputs():
    res = _refine([[0, 0, 10, 10]], [0.9], [3], np.zeros((0, 2)), np.zeros((0, 4)), [])
    assert res.boxes_merged_xyxy.shape == (0, 4)
    assert res.from_dino.shape == (0,) and res.assignment.shape == (0,)
    assert res.cost.shape == (1, 0)


def test_fewer_detections_than_instances():
    # One detection covering instance 1 only; instance 0 has no detection left.
    res = _refine(
        [[20, 20, 30, 30]], [0.8], [0],
        [[2, 2], [25, 25]], [[0, 0, 5, 5], [21, 21, 29, 29]], [0, 0],
    )
    assert res.assignment.tolist() == [-1, 0]
    assert res.from_dino.tolist() == [False, True]
    np.testing.assert_array_equal(res.boxes_merged_xyxy, [[0, 0, 5, 5], [20, 20, 30, 30]])


def test_more_detections_than_instances_picks_the_best():
    # Three detections around one point: a weak one, a strong tight one, and a wrong-class one.
    dino = [[0, 0, 20, 20], [4, 4, 11, 11], [4, 4, 11, 11]]
    res = _refine(dino, [0.3, 0.9, 0.95], [7, 7, 2], [[6, 6]], [[5, 5, 10, 10]], [7])
    assert res.assignment.tolist() == [1]
    assert res.from_dino.tolist() == [True]
    np.testing.assert_array_equal(res.boxes_merged_xyxy, [[4, 4, 11, 11]])


def test_two_instances_competing_for_one_detection():
    # Both points lie in the single detection; its box overlaps instance 1's SAM box best, so instance 1
    # gets it and instance 0 falls back to its own SAM box.
    dino = [[0, 0, 20, 10]]
    points = [[3, 5], [15, 5]]
    sam = [[0, 0, 6, 10], [4, 0, 20, 10]]
    res = _refine(dino, [0.9], [1], points, sam, [1, 1])
    assert res.assignment.tolist() == [-1, 0]
    assert res.from_dino.tolist() == [False, True]
    np.testing.assert_array_equal(res.boxes_merged_xyxy, [[0, 0, 6, 10], [0, 0, 20, 10]])


def test_all_rows_infinite_still_resolves_to_sam_boxes():
    sam = [[0, 0, 5, 5], [10, 10, 15, 15]]
    res = _refine([[0, 0, 5, 5], [10, 10, 15, 15]], [0.01, 0.02], [0, 0], [[1, 1], [11, 11]], sam, [0, 0])
    assert np.isinf(res.cost).all()
    np.testing.assert_array_equal(res.boxes_merged_xyxy, sam)
    assert not res.from_dino.any()


def test_a_finite_row_is_preferred_over_an_infinite_one():
    # The low-score detection fits instance 0 perfectly but is below τ_c; the matching must give instance 0
    # the other (valid) detection rather than spend it on the infinite row.
    dino = [[0, 0, 10, 10], [0, 0, 12, 12]]
    res = _refine(dino, [0.05, 0.5], [0, 0], [[5, 5]], [[0, 0, 10, 10]], [0])
    assert res.assignment.tolist() == [1]
    assert res.from_dino.tolist() == [True]


def test_alpha_beta_tau_are_honoured():
    res = _refine([[0, 0, 10, 10]], [0.5], [1], [[5, 5]], [[0, 0, 10, 10]], [2], alpha=1.0, beta=0.0)
    assert res.cost[0, 0] == pytest.approx(1.0 - 1.0)
    res = _refine([[0, 0, 10, 10]], [0.5], [2], [[5, 5]], [[0, 0, 10, 10]], [2], tau_c=0.6)
    assert not res.from_dino.any()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scores": [0.9, 0.8]},  # N mismatch
        {"sam": [[0, 0, 1, 1], [0, 0, 2, 2]]},  # N' mismatch
        {"points": [[np.nan, 1.0]]},
        {"dino": [[0, 0, 10]]},
    ],
)
def test_bad_inputs_raise_input_error(kwargs):
    args = {
        "dino": [[0, 0, 10, 10]], "scores": [0.9], "labels_dino": [1],
        "points": [[5, 5]], "sam": [[0, 0, 5, 5]], "labels_gt": [1],
    }
    args.update(kwargs)
    with pytest.raises(InputError):
        refine_prompts(
            boxes_dino_xyxy=np.asarray(args["dino"], dtype=float),
            scores_dino=np.asarray(args["scores"], dtype=float),
            labels_dino=np.asarray(args["labels_dino"]),
            points_gt_xy=np.asarray(args["points"], dtype=float),
            boxes_sam_xyxy=np.asarray(args["sam"], dtype=float),
            labels_gt=np.asarray(args["labels_gt"]),
        )


def test_finite_cost_exceeds_any_finite_total():
    c = np.array([[-3.0, np.inf], [np.inf, 4.0], [np.inf, np.inf]])
    f = finite_cost(c)
    assert np.isfinite(f).all()
    big = f[0, 1]
    assert big > 2 * (3.0 + 4.0)
    np.testing.assert_array_equal(f[np.isfinite(c)], c[np.isfinite(c)])
    assert finite_cost(np.full((2, 2), np.inf)).max() > 0


def _brute_force_min(cost: np.ndarray) -> tuple[float, int]:
    """Minimum total over all matchings of size min(N, N'), and the most finite pairs any of them has."""
    n, m = cost.shape
    best, best_finite = np.inf, 0
    if n >= m:
        matchings = (list(zip(rows, range(m), strict=True)) for rows in itertools.permutations(range(n), m))
    else:
        matchings = (list(zip(range(n), cols, strict=True)) for cols in itertools.permutations(range(m), n))
    finite = finite_cost(cost)
    for pairs in matchings:
        best = min(best, sum(finite[i, j] for i, j in pairs))
        best_finite = max(best_finite, sum(bool(np.isfinite(cost[i, j])) for i, j in pairs))
    return best, best_finite


def test_matches_brute_force_on_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n, n_inst = rng.integers(0, 6), rng.integers(1, 6)
        xy0 = rng.uniform(0, 20, size=(n, 2))
        dino = np.concatenate([xy0, xy0 + rng.uniform(2, 15, size=(n, 2))], axis=1)
        s0 = rng.uniform(0, 20, size=(n_inst, 2))
        sam = np.concatenate([s0, s0 + rng.uniform(2, 15, size=(n_inst, 2))], axis=1)
        points = sam[:, :2] + rng.uniform(0, 1, size=(n_inst, 2)) * (sam[:, 2:] - sam[:, :2])
        scores = rng.uniform(0, 1, size=n)
        labels_dino = rng.integers(0, 2, size=n)
        labels_gt = rng.integers(0, 2, size=n_inst)
        res = _refine(dino, scores, labels_dino, points, sam, labels_gt)

        # The cost matrix is Algorithm 1's, entry by entry.
        iou = box_iou(dino, sam)
        for i in range(n):
            for j in range(n_inst):
                if scores[i] < 0.1:
                    assert res.cost[i, j] == np.inf
                    continue
                x, y = points[j]
                inside = dino[i, 0] <= x <= dino[i, 2] and dino[i, 1] <= y <= dino[i, 3]
                penalty = 5.0 if (labels_dino[i] != labels_gt[j] or not inside) else 0.0
                assert res.cost[i, j] == pytest.approx(penalty - iou[i, j] - 2.0 * scores[i])

        # The chosen matching is a valid injective map of minimum total cost.
        pairs = [(int(i), j) for j, i in enumerate(res.assignment) if i >= 0]
        assert len(pairs) == min(n, n_inst)
        assert len({i for i, _ in pairs}) == len(pairs)
        if n == 0:
            np.testing.assert_array_equal(res.boxes_merged_xyxy, sam)
            continue
        finite = finite_cost(res.cost)
        best, best_finite = _brute_force_min(res.cost)
        assert sum(finite[i, j] for i, j in pairs) == pytest.approx(best, abs=1e-9)
        assert sum(bool(np.isfinite(res.cost[i, j])) for i, j in pairs) == best_finite

        # Each merged box follows the paper's final loop.
        for j in range(n_inst):
            i = res.assignment[j]
            valid = (
                i >= 0 and np.isfinite(res.cost[i, j]) and labels_dino[i] == labels_gt[j]
                and dino[i, 0] <= points[j, 0] <= dino[i, 2] and dino[i, 1] <= points[j, 1] <= dino[i, 3]
            )
            assert res.from_dino[j] == valid
            np.testing.assert_array_equal(res.boxes_merged_xyxy[j], dino[i] if valid else sam[j])
