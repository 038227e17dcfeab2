from __future__ import annotations

import numpy as np
import pytest

from omnilabel.errors import InputError
from omnilabel.ops.entity import (
    adaptive_nms,
    consistency_filter,
    levels_by_area,
    mask_iou_matrix,
    mask_nms,
    superpixel_density,
)
from omnilabel.ops.entity_cover import (
    fuse_new_masks,
    greedy_cover,
    to_entity_map,
    uncovered_regions,
    usr_prompt_points,
)
from omnilabel.ops.entity_refine import (
    centroids_in_masks,
    mask_similarity,
    merge_fragments,
    select_guides,
    split_overlaps,
)
from omnilabel.ops.superpixels import superpixel_centroids


def box(rows: tuple[int, int], cols: tuple[int, int], size: int = 8) -> np.ndarray:
    """(size, size) bool mask with rows r0..r1 and cols c0..c1 set (inclusive)."""
    m = np.zeros((size, size), dtype=bool)
    m[rows[0]:rows[1] + 1, cols[0]:cols[1] + 1] = True
    return m


def stack(*masks: np.ndarray) -> np.ndarray:
    return np.stack(masks)


# --- MMG ---------------------------------------------------------------------------------------------------------


def test_levels_by_area_orders_by_area_and_best_by_score():
    masks = np.zeros((2, 3, 4, 4), dtype=bool)
    masks[0, 0, :2, :2] = True  # point 0: areas [4, 16, 1]
    masks[0, 1] = True
    masks[0, 2, 0, 0] = True
    masks[1, 0, 0, :3] = True  # point 1: areas [3, 3, 8]
    masks[1, 1, 1, :3] = True
    masks[1, 2, 2:, :] = True
    scores = np.array([[0.9, 0.5, 0.95], [0.1, 0.8, 0.8]])
    order, best = levels_by_area(masks, scores)
    # point 0: 16 > 4 > 1 -> outputs [1, 0, 2]; point 1: 8 > 3 = 3, the tie keeps output order -> [2, 0, 1]
    assert order.tolist() == [[1, 0, 2], [2, 0, 1]]
    # best: 0.95 at output 2; 0.8 = 0.8 -> the first, output 1
    assert best.tolist() == [2, 1]
    with pytest.raises(InputError):
        levels_by_area(masks[:, :2], scores[:, :2])


def test_mask_nms_suppresses_by_mask_iou():
    a = box((0, 3), (0, 3))  # 16 px
    b = a.copy()
    b[3, 3] = False  # 15 px, IoU(a, b) = 15 / 16 = 0.9375
    f = box((6, 7), (6, 7))
    masks, scores = stack(a, b, f), np.array([0.5, 0.9, 0.4])
    assert mask_nms(masks, scores, iou_thresh=0.8).tolist() == [1, 2]
    assert mask_nms(masks, scores, iou_thresh=0.95).tolist() == [1, 0, 2]


def test_mask_nms_mask_vs_box_overlap():
    inner = box((2, 5), (2, 5))  # 16 px
    ring = box((1, 6), (1, 6)) & ~inner  # 20 px, disjoint from inner
    masks, scores = stack(inner, ring), np.array([0.9, 0.8])
    # mask IoU 0 -> both kept; box IoU = 16 / 36 = 0.44 > 0.4 -> the ring is suppressed
    assert mask_nms(masks, scores, iou_thresh=0.4).tolist() == [0, 1]
    assert mask_nms(masks, scores, iou_thresh=0.4, overlap="box").tolist() == [0]


def test_consistency_filter_eq2_and_self_matches():
    o0, o1 = box((0, 3), (0, 7)), box((4, 7), (0, 7))  # 32 px each
    b0 = box((0, 3), (0, 5))  # IoU with o0 = 24 / 32 = 0.75
    b1 = box((4, 5), (0, 7))  # IoU with o1 = 16 / 32 = 0.5
    assert consistency_filter(stack(o0, o1), stack(b0, b1)).tolist() == [True, False]
    assert consistency_filter(stack(o0, o1), stack(b0, b1), gamma=0.5).tolist() == [True, True]  # >= is inclusive
    # o1 is also its own point's best mask: the literal Eq. 2 keeps it, ignoring self-matches drops it
    best = stack(b0, b1, o1)
    assert consistency_filter(stack(o0, o1), best).tolist() == [True, True]
    kept = consistency_filter(stack(o0, o1), best, object_point_ids=np.array([0, 1]),
                              best_point_ids=np.array([7, 8, 1]))
    assert kept.tolist() == [True, False]
    assert consistency_filter(stack(o0), np.zeros((0, 8, 8), dtype=bool)).tolist() == [False]


def test_superpixel_density_weights():
    sp = np.array([[5, 5, 2, 2],
                   [5, 5, 2, 2],
                   [5, 5, 9, 9],
                   [5, 5, 1, 1]])
    # areas: 5 -> 8, 2 -> 4, 9 -> 2, 1 -> 2; median = 3; w = 3 / (area + 3)
    d = superpixel_density(sp)
    assert d[0, 0] == pytest.approx(3 / 11) and d[0, 2] == pytest.approx(3 / 7)
    assert d[2, 2] == pytest.approx(3 / 5) and d[3, 3] == pytest.approx(3 / 5)
    # constant on each superpixel
    assert np.unique(d[sp == 5]).size == 1
    d2 = superpixel_density(sp, ref_area_px=2)  # 2 / (area + 2)
    np.testing.assert_allclose([d2[0, 0], d2[0, 2], d2[2, 2]], [0.2, 1 / 3, 0.5])
    with pytest.raises(InputError):
        superpixel_density(sp.astype(float))


def _two_pairs() -> tuple[np.ndarray, np.ndarray]:
    a = box((0, 3), (0, 3))
    b = a.copy()
    b[3, 3] = False  # IoU(a, b) = 0.9375
    c = box((4, 7), (4, 7))
    d = c.copy()
    d[7, 7] = False  # IoU(c, d) = 0.9375
    return stack(a, b, c, d), np.array([0.9, 0.8, 0.7, 0.6])


def test_adaptive_nms_raises_threshold_in_dense_regions():
    masks, scores = _two_pairs()
    density = np.zeros((8, 8))
    density[:4, :4] = 0.95  # a's region is dense: N = max(0.7, 0.95) -> b (0.9375) survives
    assert adaptive_nms(masks, scores, density, base_thresh=0.7).tolist() == [0, 1, 2]
    # no density: plain mask NMS at N_t
    none = adaptive_nms(masks, scores, np.zeros((8, 8)), base_thresh=0.7)
    assert none.tolist() == [0, 2] == mask_nms(masks, scores, iou_thresh=0.7).tolist()


def test_adaptive_nms_mean_vs_max_density():
    masks, scores = _two_pairs()
    density = np.zeros((8, 8))
    density[0, 0] = 0.95  # one busy pixel in a: mean 0.95 / 16 < 0.7, max 0.95
    assert adaptive_nms(masks, scores, density).tolist() == [0, 2]
    assert adaptive_nms(masks, scores, density, reduce="max").tolist() == [0, 1, 2]


# --- EMR split ---------------------------------------------------------------------------------------------------


def test_select_guides_eq6():
    o = stack(box((0, 7), (0, 7)), box((0, 7), (0, 7)), box((0, 7), (0, 7)))
    b = stack(box((0, 1), (0, 1)), box((0, 1), (0, 1)), box((0, 1), (0, 1)))
    # gaps S_B - S_O: 0.05 < 0.1 -> object; 0.125 -> best; 0.125 with tau 0.125 -> best (strict <)
    g = select_guides(o, np.array([0.9, 0.5, 0.125]), b, np.array([0.95, 0.625, 0.25]))
    assert [int(m.sum()) for m in g] == [64, 4, 4]
    g = select_guides(o, np.array([0.9, 0.5, 0.125]), b, np.array([0.95, 0.625, 0.25]), tau=0.2)
    assert [int(m.sum()) for m in g] == [64, 64, 64]


NO_GUIDES = {"guide_masks": np.zeros((0, 12, 12), dtype=bool), "guide_points_xy": np.zeros((0, 2))}


def test_split_small_overlap_is_cut_from_the_larger_mask():
    p = box((0, 9), (0, 9), 12)  # 100 px
    q = box((9, 11), (9, 11), 12)  # 9 px; OR = pixel (9, 9), r = 1 / 100 < 0.05
    out = split_overlaps(stack(p, q), np.array([0.9, 0.5]), **NO_GUIDES)
    assert not out[0, 9, 9] and out[1, 9, 9]
    assert out.sum(axis=(1, 2)).tolist() == [99, 9]
    # equal areas (25 px each, r = 1 / 25 = 0.04): cut from the lower-scoring one
    p, q = box((0, 4), (0, 4), 12), box((4, 8), (4, 8), 12)
    out = split_overlaps(stack(p, q), np.array([0.9, 0.5]), **NO_GUIDES)
    assert out[0, 4, 4] and not out[1, 4, 4]


def _guided_pair() -> tuple[np.ndarray, np.ndarray]:
    # p = cols 0-5 (48 px), q = cols 2-7 (48 px), OR = cols 2-5 (32 px), r = 32 / 48 >= 0.05
    return stack(box((0, 7), (0, 5)), box((0, 7), (2, 7))), np.array([0.9, 0.8])


def test_split_large_overlap_follows_the_voted_guide():
    masks, scores = _guided_pair()
    g = box((0, 7), (0, 3))
    g2 = g.copy()
    g2[7, 0] = False  # IoU(g, g2) = 31 / 32 > 0.9: the same mask
    whole = box((0, 7), (0, 7))  # IoU with g = 0.5: a different mask
    guides = stack(whole, whole, g, g2)
    points = np.array([[0.5, 0.5],  # pixel (0, 0): only in p, not in OR -> no vote
                       [2.5, 2.5], [3.5, 4.5], [4.5, 6.5]])  # in OR: votes whole 1, g 2, g2 2 -> g
    out = split_overlaps(masks, scores, guide_masks=guides, guide_points_xy=points)
    # IoU(g, p) = 32 / 48 > IoU(g, q) = 16 / 64: p takes OR ∩ g (cols 2-3), q the rest of OR (cols 4-5)
    np.testing.assert_array_equal(out[0], box((0, 7), (0, 3)))
    np.testing.assert_array_equal(out[1], box((0, 7), (4, 7)))
    # only the whole-image guide inside OR: IoU 0.75 with both, p wins the tie and keeps all of OR
    out = split_overlaps(masks, scores, guide_masks=guides[:2], guide_points_xy=points[:2])
    np.testing.assert_array_equal(out[0], box((0, 7), (0, 5)))
    np.testing.assert_array_equal(out[1], box((0, 7), (6, 7)))


def test_split_without_gallery_point_gives_overlap_to_higher_score():
    masks, _ = _guided_pair()
    none = {"guide_masks": np.zeros((0, 8, 8), dtype=bool), "guide_points_xy": np.zeros((0, 2))}
    out = split_overlaps(masks, np.array([0.8, 0.9]), **none)
    np.testing.assert_array_equal(out[0], box((0, 7), (0, 1)))
    np.testing.assert_array_equal(out[1], box((0, 7), (2, 7)))


def test_split_random_masks_become_disjoint_subsets():
    rng = np.random.default_rng(0)
    masks = np.stack([box(tuple(sorted(rng.integers(0, 12, 2))), tuple(sorted(rng.integers(0, 12, 2))), 12)
                      for _ in range(8)])
    guides = rng.random((20, 12, 12)) < 0.5
    out = split_overlaps(masks, rng.random(8), guide_masks=guides, guide_points_xy=rng.uniform(0, 12, (20, 2)))
    assert (out.sum(axis=0) <= 1).all()
    assert not (out & ~masks).any()


# --- EMR merge ---------------------------------------------------------------------------------------------------


def test_superpixel_centroids_and_membership():
    sp = np.ones((4, 4), dtype=np.int64)
    sp[:, 0] = 0
    cents = superpixel_centroids(sp)
    # label 0: x = 0.5, y = mean(0.5, 1.5, 2.5, 3.5) = 2.0; label 1: x = mean(1.5, 2.5, 3.5) = 2.5, y = 2.0
    np.testing.assert_allclose(cents, [[0.5, 2.0], [2.5, 2.0]])
    m = np.zeros((2, 4, 4), dtype=bool)
    m[0, :, 0] = True
    m[1, :, 2:] = True
    assert centroids_in_masks(cents, m).tolist() == [[True, False], [False, True]]


def test_mask_similarity_eq7_by_hand():
    feats = np.array([[1, 0], [1, 0.1], [0, 1], [0.1, 1]])
    mem = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]], dtype=bool)
    # k = 1: nn(c0) = c1, nn(c1) = c0, nn(c2) = c3, nn(c3) = c2 (self excluded)
    np.testing.assert_allclose(mask_similarity(feats, mem, top_k=1),
                               [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    # k = 2, cosines: c0·c1 .995, c0·c3 .0995, c0·c2 0, c1·c3 .198, c1·c2 .0995
    # nn(c0) = c1, c3; nn(c1) = c0, c3; nn(c2) = c3, c1; nn(c3) = c2, c1
    # S_M(2, ·): c2 -> m2, m1; c3 -> m2, m1 -> m1: 2 / 2, m2: 2 / 2
    np.testing.assert_allclose(mask_similarity(feats, mem, top_k=2),
                               [[0, 1, 1, 0], [1, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]])


def _strips() -> tuple[np.ndarray, np.ndarray]:
    # a = cols 0-1, b = cols 2-3, c = cols 4-5, 16 px each, side by side
    return stack(box((0, 7), (0, 1)), box((0, 7), (2, 3)), box((0, 7), (4, 5))), np.array([0.5, 0.9, 0.7])


def test_merge_needs_similarity_and_a_covering_gallery_mask():
    masks, scores = _strips()
    sim = np.zeros((3, 3))
    sim[1, 0] = 2.5  # asymmetric: only b sees a; max-symmetrised 2.5 >= 2
    gab = box((0, 7), (0, 3))[None]
    merged, ms, group = merge_fragments(masks, scores, sim, gab)
    assert group.tolist() == [0, 0, 1]
    np.testing.assert_array_equal(merged[0], box((0, 7), (0, 3)))
    assert ms.tolist() == [0.9, 0.7]
    # a gallery mask covering both but too large: IoU(g, a ∪ b) = 32 / 64 < 0.7 -> no merge
    whole = box((0, 7), (0, 7))[None]
    assert merge_fragments(masks, scores, sim, whole)[2].tolist() == [0, 1, 2]
    # similarity below 2.0 -> no merge even with a covering mask
    assert merge_fragments(masks, scores, sim * 0.7, gab)[2].tolist() == [0, 1, 2]


def test_merge_needs_adjacency_by_default():
    masks, scores = _strips()
    sim = np.zeros((3, 3))
    sim[0, 2] = 4  # a and c do not touch
    gac = (box((0, 7), (0, 1)) | box((0, 7), (4, 5)))[None]
    assert merge_fragments(masks, scores, sim, gac)[2].tolist() == [0, 1, 2]
    assert merge_fragments(masks, scores, sim, gac, require_adjacent=False)[2].tolist() == [0, 1, 0]


def test_merge_groups_must_be_covered_as_a_whole():
    masks, scores = _strips()
    sim = np.zeros((3, 3))
    sim[0, 1], sim[1, 2] = 4, 3  # (a, b) first, then (b, c)
    gab, gbc = box((0, 7), (0, 3)), box((0, 7), (2, 5))
    # after a + b merge, gbc holds only 16 / 32 of {a, b} -> c stays apart
    assert merge_fragments(masks, scores, sim, stack(gab, gbc))[2].tolist() == [0, 0, 1]
    merged, _, group = merge_fragments(masks, scores, sim, stack(gab, gbc, box((0, 7), (0, 5))))
    assert group.tolist() == [0, 0, 0]
    np.testing.assert_array_equal(merged[0], box((0, 7), (0, 5)))


# --- USR and the final map ---------------------------------------------------------------------------------------


def test_uncovered_regions():
    sp = np.array([[0, 0, 0, 0],
                   [0, 0, 0, 0],
                   [1, 1, 2, 2],
                   [1, 1, 2, 2]])
    ent = np.zeros((1, 4, 4), dtype=bool)
    ent[0, :2] = True
    ent[0, 2, 2] = True
    # label 0 fully covered; label 1 keeps 4 px; label 2 keeps 3 px
    regions = uncovered_regions(sp, ent)
    assert regions.sum(axis=(1, 2)).tolist() == [4, 3]
    assert not regions[1, 2, 2] and regions[1, 3, 3]
    assert uncovered_regions(sp, ent, min_area_px=4).sum(axis=(1, 2)).tolist() == [4]


def test_usr_prompt_points_eq9():
    parts = stack(box((0, 3), (0, 3)), box((0, 5), (0, 7)))  # 16 px and 48 px
    regions = stack(box((0, 1), (0, 1)), box((6, 7), (6, 7)))
    pts, src = usr_prompt_points(regions, parts)
    # region 0 lies in both parts -> the smaller, part 0, centroid (2.0, 2.0); region 1 in none -> its own (7.0, 7.0)
    assert src.tolist() == [0, -1]
    np.testing.assert_allclose(pts, [[2.0, 2.0], [7.0, 7.0]])
    # half contained: only with contain_frac <= 0.5
    half = box((0, 1), (0, 0))[None]
    assert usr_prompt_points(regions[:1], half)[1].tolist() == [-1]
    assert usr_prompt_points(regions[:1], half, contain_frac=0.5)[1].tolist() == [0]


def test_usr_prompt_point_of_a_ring_is_snapped_inside():
    ring = box((0, 4), (0, 4), 5) & ~box((1, 3), (1, 3), 5)
    # centroid (2.5, 2.5) is the hole; the nearest ring pixel centres are at distance 2, the first in raster
    # order is (row 0, col 2) -> (2.5, 0.5)
    pts, src = usr_prompt_points(ring[None], np.zeros((0, 5, 5), dtype=bool))
    np.testing.assert_allclose(pts, [[2.5, 0.5]])
    assert src.tolist() == [-1]


def test_greedy_cover_picks_fewest():
    uncovered = box((0, 1), (0, 7))  # 16 px
    c0, c1, c3 = box((0, 1), (0, 3)), box((0, 1), (4, 7)), box((0, 1), (0, 1))
    c2 = box((0, 1), (2, 7)) | box((5, 5), (0, 7))  # 12 new px (row 5 is not uncovered)
    cands = stack(c0, c1, c2, c3)
    # c2 first (12), then cols 0-1 are left: c0 and c3 both add 4, the lower index wins
    assert greedy_cover(cands, uncovered).tolist() == [2, 0]
    assert greedy_cover(cands, uncovered, min_gain_px=5).tolist() == [2]
    assert greedy_cover(cands, np.zeros((8, 8), dtype=bool)).tolist() == []
    assert greedy_cover(np.zeros((0, 8, 8), dtype=bool), uncovered).tolist() == []


def test_fuse_new_masks_eq10():
    ent = box((0, 3), (0, 3))[None]  # 16 px
    a0 = box((0, 3), (2, 5))  # IoU 8 / 24 = 0.33 > 0.1 -> joins entity 0, adds cols 4-5
    a1 = box((6, 7), (0, 7))  # IoU 0 -> new entity 1
    a2 = box((0, 7), (7, 7))  # IoU with entity 1: 2 / 22 = 0.09 <= 0.1 -> new entity 2, minus rows 6-7
    a3 = box((7, 7), (0, 0))  # IoU 1 / 16 with entity 1 -> new, but nothing uncovered -> dropped
    new = stack(a0, a1, a2, a3)
    masks, scores, target = fuse_new_masks(ent, np.array([0.9]), new, np.array([0.1, 0.2, 0.3, 0.4]))
    assert target.tolist() == [0, 1, 2, -1]
    np.testing.assert_array_equal(masks[0], box((0, 3), (0, 5)))
    np.testing.assert_array_equal(masks[2], box((0, 5), (7, 7)))
    assert scores.tolist() == [0.9, 0.2, 0.3]
    assert (masks.sum(axis=0) <= 1).all()
    # literal Eq. 10: whole masks, so entity 2 keeps rows 6-7 and overlaps entity 1
    masks, _, target = fuse_new_masks(ent, np.array([0.9]), new, np.array([0.1, 0.2, 0.3, 0.4]),
                                      only_uncovered=False)
    assert masks[2].sum() == 8 and target.tolist() == [0, 1, 2, 3]


def test_to_entity_map_resolves_overlap_by_score():
    m = np.zeros((4, 4, 4), dtype=bool)
    m[0, :2] = True  # rows 0-1, score 0.5
    m[1, :, :2] = True  # cols 0-1, score 0.9 -> wins the top-left 2x2
    m[2, 3, 3] = True
    ids = to_entity_map(m, np.array([0.5, 0.9, 0.1, 0.3]))  # m[3] is empty
    assert ids.dtype == np.uint16
    np.testing.assert_array_equal(ids, [[2, 2, 1, 1],
                                        [2, 2, 1, 1],
                                        [2, 2, 0, 0],
                                        [2, 2, 0, 3]])
    # equal scores: the lower index wins
    assert to_entity_map(m, np.array([0.5, 0.5, 0.1, 0.3]))[0].tolist() == [1, 1, 1, 1]


def test_mask_iou_matrix_and_shape_errors():
    a, b = box((0, 3), (0, 3)), box((0, 3), (2, 5))
    np.testing.assert_allclose(mask_iou_matrix(stack(a, b), stack(b, np.zeros((8, 8), bool))),
                               [[8 / 24, 0], [1, 0]])
    with pytest.raises(InputError):
        mask_nms(stack(a), np.array([0.1, 0.2]))
    with pytest.raises(InputError):
        adaptive_nms(stack(a), np.array([0.1]), np.zeros((4, 4)))


def test_nms_suppression_is_strictly_greater():
    a = box((0, 1), (0, 3))  # 8 px
    b = box((0, 3), (0, 3))  # 16 px, IoU(a, b) = 8 / 16 = 0.5
    masks, scores = stack(a, b), np.array([0.9, 0.8])
    assert mask_nms(masks, scores, iou_thresh=0.5).tolist() == [0, 1]
    assert mask_nms(masks, scores, iou_thresh=0.49).tolist() == [0]
    assert adaptive_nms(masks, scores, np.zeros((8, 8)), base_thresh=0.5).tolist() == [0, 1]


def test_stability_score_is_the_area_ratio_of_the_tight_and_loose_masks():
    from omnilabel.ops.entity import stability_scores

    logits = np.full((2, 4, 4), -5.0)
    logits[0, :2, :2] = 3.0  # 4 px above +1 and -1
    logits[0, 2, 0] = 0.5  # 1 px only above -1
    logits[1, 0, 0] = 0.2  # 1 px above -1, none above +1
    np.testing.assert_allclose(stability_scores(logits), [4 / 5, 0.0])
    assert stability_scores(np.full((1, 3, 3), -9.0))[0] == 1.0
    np.testing.assert_allclose(stability_scores(logits, offset=0.1), [1.0, 1.0])
