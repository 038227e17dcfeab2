"""E-SAM's Entity-level Mask Refinement (EMR, §3), pure functions: split overlapping object masks with the
mask gallery's guidance (Eq. 5–6), then merge fragments whose superpixel centroids are feature neighbours
(Eq. 7) where one gallery mask covers both (Eq. 8). Conventions: ``omnilabel.ops.entity``; superpixel
centroids come from ``omnilabel.ops.superpixels.superpixel_centroids``.
"""

from __future__ import annotations

import numpy as np

from omnilabel.errors import InputError
from omnilabel.ops.entity import checked_masks, checked_vector, flat_masks, intersections, mask_iou_matrix

__all__ = ["centroids_in_masks", "mask_similarity", "merge_fragments", "select_guides", "split_overlaps"]


# --- EMR split (§3.1) --------------------------------------------------------------------------------------------


def select_guides(object_masks: np.ndarray, object_scores: np.ndarray, best_masks: np.ndarray,
                  best_scores: np.ndarray, *, tau: float = 0.1) -> np.ndarray:
    """Guidance mask of each gallery point (§3.1 step 3b, Eq. 6): ``M^64O if S^64B - S^64O < τ else M^64B``.

    Args:
        object_masks: (G, H, W) bool object-level gallery masks M_O^64, one per 64-grid point.
        object_scores: (G,) float S^64O. best_masks: (G, H, W) bool M_B^64. best_scores: (G,) float S^64B.
        tau: τ = 0.1 (paper, Table 4); favours the larger object mask unless the best one is clearly surer.

    Returns:
        (G, H, W) bool guidance masks.
    """
    o = checked_masks("object_masks", object_masks)
    b = checked_masks("best_masks", best_masks, o.shape[1:])
    if len(b) != len(o):
        raise InputError(f"object_masks and best_masks must be equally many, got {len(o)} and {len(b)}")
    gap = checked_vector("best_scores", best_scores, len(o)) - checked_vector("object_scores", object_scores, len(o))
    use_object = gap < tau
    return np.where(use_object[:, None, None], o, b)


def _point_pixels(points_xy: np.ndarray, hw: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
    cols = np.clip(np.floor(p[:, 0]).astype(np.int64), 0, hw[1] - 1)
    rows = np.clip(np.floor(p[:, 1]).astype(np.int64), 0, hw[0] - 1)
    return rows, cols


def split_overlaps(masks: np.ndarray, scores: np.ndarray, *, guide_masks: np.ndarray, guide_points_xy: np.ndarray,
                   delta: float = 0.05, same_guide_iou: float = 0.9) -> np.ndarray:
    """Split overlapping entity candidates into non-overlapping masks (§3.1, Eq. 5-6).

    Masks are visited by descending score; each mask p is resolved against every later mask q it still overlaps
    (pixels only ever leave masks, so earlier pairs stay disjoint). With ``OR = M_p ∩ M_q`` (Eq. 5) and
    ``r = |OR| / max(|M_p|, |M_q|)``:

    - r < δ: OR is removed from the larger mask ([ours] equal areas: from q, the lower-scoring one).
    - else the guidance masks of the gallery points inside OR vote: each guide counts the guides with IoU
      > ``same_guide_iou`` with it, itself included, and the most counted wins (the paper's "most frequent" mask;
      [ours] near-identical guides from neighbouring points count as one mask; ties go to the first point).
      [ours] The OR pixels inside the winning guide go to whichever of p, q has the higher IoU with it (p on ties),
      the rest of OR to the other. [ours] No gallery point inside OR: OR goes to p, the higher-scoring mask.

    Args:
        masks: (N, H, W) bool, M̂_O^32. scores: (N,) float.
        guide_masks: (G, H, W) bool, the guidance mask of each gallery point (``select_guides``).
        guide_points_xy: (G, 2) float, the gallery's 64-grid prompt points.
        delta: δ = 0.05 (paper, Table 4).
        same_guide_iou: [ours] 0.9, see above.

    Returns:
        (N, H, W) bool, pairwise disjoint, in input order.
    """
    m = checked_masks("masks", masks).copy()
    s = checked_vector("scores", scores, len(m))
    guides = checked_masks("guide_masks", guide_masks, m.shape[1:])
    rows, cols = _point_pixels(guide_points_xy, m.shape[1:])
    if len(rows) != len(guides):
        raise InputError(f"guide_points_xy must be ({len(guides)}, 2), got {len(rows)} points")
    touching = intersections(m, m) > 0  # masks only shrink, so pairs disjoint now stay disjoint
    order = np.argsort(-s, kind="stable")
    for a, p in enumerate(order):
        for q in order[a + 1:]:
            if not touching[p, q]:
                continue
            ov = m[p] & m[q]
            n_ov = int(ov.sum())
            if n_ov == 0:
                continue
            area_p, area_q = int(m[p].sum()), int(m[q].sum())
            if n_ov / max(area_p, area_q) < delta:
                m[p if area_p > area_q else q] &= ~ov
                continue
            inside = np.flatnonzero(ov[rows, cols])
            if inside.size == 0:
                m[q] &= ~ov
                continue
            cands = guides[inside]
            votes = (mask_iou_matrix(cands, cands) > same_guide_iou).sum(axis=1)
            g = cands[int(np.argmax(votes))]
            iou_p, iou_q = mask_iou_matrix(g[None], m[[p, q]])[0]
            win, lose = (p, q) if iou_p >= iou_q else (q, p)
            m[lose] &= ~(ov & g)
            m[win] &= ~(ov & ~g)
    return m


# --- EMR merge (§3.2) --------------------------------------------------------------------------------------------


def centroids_in_masks(centroids_xy: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Membership C_i of Eq. 7: which centroids lie in which mask.

    Args:
        centroids_xy: (K, 2) float. masks: (N, H, W) bool.

    Returns:
        (N, K) bool; the pixel read is (floor(y), floor(x)).
    """
    m = checked_masks("masks", masks)
    rows, cols = _point_pixels(centroids_xy, m.shape[1:])
    return m[:, rows, cols]


def mask_similarity(features: np.ndarray, membership: np.ndarray, *, top_k: int = 8) -> np.ndarray:
    """Adjacent-mask similarity S_M (§3.2 step 2, Eq. 7), from the centroid cosine-similarity matrix S_C.

    ``S_M(i, j) = mean over centroids c of mask i of |Top_k(S_C(c, ·)) ∩ C_j|``: how many of a centroid's k most
    similar centroids lie in mask j. Asymmetric, in [0, k].

    Args:
        features: (K, C) float encoder features at the K centroids.
        membership: (N, K) bool, ``centroids_in_masks``.
        top_k: k; not given by the paper. [ours] 8, and a centroid is not its own neighbour (it would take a slot
            and only ever count for S_M(i, i)). k is capped at K - 1.

    Returns:
        (N, N) float64; rows of masks without centroids are 0.
    """
    f = np.asarray(features, dtype=np.float64)
    mem = np.asarray(membership, dtype=bool)
    if f.ndim != 2 or mem.ndim != 2 or mem.shape[1] != len(f):
        raise InputError(f"features must be (K, C) and membership (N, K), got {f.shape} and {mem.shape}")
    if top_k < 1:
        raise InputError(f"top_k must be >= 1, got {top_k}")
    k = min(top_k, len(f) - 1)
    if k < 1:
        return np.zeros((len(mem), len(mem)))
    unit = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    s_c = unit @ unit.T
    np.fill_diagonal(s_c, -np.inf)
    neighbours = np.argsort(-s_c, axis=1, kind="stable")[:, :k]  # (K, k)
    hits = mem[:, neighbours].sum(axis=2)  # (N, K): neighbours of centroid c that lie in mask j
    n_c = mem.sum(axis=1)
    return (mem.astype(np.float64) @ hits.T) / np.maximum(n_c, 1)[:, None]


def _adjacent(m: np.ndarray) -> np.ndarray:
    """(N, N) bool: masks that overlap or touch along a side (4-connectivity)."""
    grown = m.copy()
    grown[:, 1:] |= m[:, :-1]
    grown[:, :-1] |= m[:, 1:]
    grown[:, :, 1:] |= m[:, :, :-1]
    grown[:, :, :-1] |= m[:, :, 1:]
    return intersections(grown, m) > 0


def merge_fragments(masks: np.ndarray, scores: np.ndarray, similarity: np.ndarray, gallery: np.ndarray, *,
                    min_similarity: float = 2.0, require_adjacent: bool = True, cover_frac: float = 0.8,
                    cover_iou: float = 0.7) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge fragments of one entity (§3.2 step 3, Eq. 8): similar by Eq. 7 **and** covered by one gallery mask.

    Candidate pairs (i, j) have ``max(S_M(i, j), S_M(j, i)) ≥ min_similarity`` ([ours] max: a small fragment's
    centroids point into the big mask while most of the big mask's point into itself, so the small side's view is
    the evidence); they are tried by descending similarity. [ours] Merging is transitive through union-find, but each
    merge must pass the cover test for the two whole groups, so every merged entity has one gallery mask over it.
    [ours] A gallery mask g covers groups A and B when ``|g∩A|/|A| ≥ cover_frac``, ``|g∩B|/|B| ≥ cover_frac`` and
    ``IoU(g, A∪B) ≥ cover_iou``. [ours] The merged mask is A ∪ B (Eq. 8's "M_a^64 ∪ M_b^64" read as the union of
    the two entities; taking g's pixels would undo the split).

    Args:
        masks: (N, H, W) bool, disjoint (``split_overlaps``). scores: (N,) float.
        similarity: (N, N) float S_M (``mask_similarity``).
        gallery: (G, H, W) bool, G = M_O^64 ∪ M_B^64.
        min_similarity: [ours] 2.0, a quarter of the default k = 8 neighbours.
        require_adjacent: [ours] True, only masks that touch (Eq. 7 speaks of "adjacent" masks).
        cover_frac, cover_iou: [ours] 0.8 and 0.7.

    Returns:
        ``(merged, merged_scores, group)``: (M, H, W) bool, ordered by each group's first input mask; (M,) float64,
        the best score of the group ([ours]); (N,) int64, the output index of each input mask.
    """
    m = checked_masks("masks", masks)
    s = checked_vector("scores", scores, len(m))
    sim = np.asarray(similarity, dtype=np.float64)
    if sim.shape != (len(m), len(m)):
        raise InputError(f"similarity must be ({len(m)}, {len(m)}), got shape {sim.shape}")
    gal = flat_masks(checked_masks("gallery", gallery, m.shape[1:]))
    g_area = gal.sum(axis=1)
    sym = np.maximum(sim, sim.T)
    ok = np.triu(sym >= min_similarity, k=1)
    if require_adjacent:
        ok &= _adjacent(m)
    ii, jj = np.nonzero(ok)
    parent = np.arange(len(m))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for t in np.argsort(-sym[ii, jj], kind="stable"):
        ra, rb = root(int(ii[t])), root(int(jj[t]))
        if ra == rb or len(gal) == 0:
            continue
        group_a = m[np.flatnonzero([root(i) == ra for i in range(len(m))])].any(axis=0).reshape(-1)
        group_b = m[np.flatnonzero([root(i) == rb for i in range(len(m))])].any(axis=0).reshape(-1)
        in_a, in_b = gal @ group_a, gal @ group_b  # disjoint groups: |g ∩ (A ∪ B)| = in_a + in_b
        area_a, area_b = group_a.sum(), group_b.sum()
        iou = (in_a + in_b) / np.maximum(g_area + area_a + area_b - in_a - in_b, 1)
        if ((in_a >= cover_frac * area_a) & (in_b >= cover_frac * area_b) & (iou >= cover_iou)).any():
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([root(i) for i in range(len(m))], dtype=np.int64)
    firsts, group = np.unique(roots, return_inverse=True)
    merged = np.stack([m[roots == r].any(axis=0) for r in firsts]) if len(m) else m.copy()
    merged_scores = np.array([s[roots == r].max() for r in firsts], dtype=np.float64)
    return merged, merged_scores, group.reshape(-1).astype(np.int64)
