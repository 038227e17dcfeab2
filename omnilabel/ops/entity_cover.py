"""E-SAM's Under-Segmentation Refinement (USR, §4) and the final entity map, pure functions: prompts for the
superpixels no entity covers (Eq. 9), a greedy fewest-mask cover, fusion of the new masks by IoU > ρ (Eq. 10),
and the non-overlapping id map. Conventions: ``omnilabel.ops.entity``.
"""

from __future__ import annotations

import numpy as np

from omnilabel.errors import InputError
from omnilabel.ops.entity import checked_masks, checked_vector, inside_centroid, intersections, mask_iou_matrix

__all__ = ["fuse_new_masks", "greedy_cover", "to_entity_map", "uncovered_regions", "usr_prompt_points"]


# --- USR (§4) and the final map ----------------------------------------------------------------------------------


def uncovered_regions(superpixels: np.ndarray, entities: np.ndarray, *, min_area_px: int = 1) -> np.ndarray:
    """Remaining superpixel regions S_R (§4 step 1): each superpixel minus every entity mask.

    Args:
        superpixels: (H, W) int labels. entities: (E, H, W) bool, M_E.
        min_area_px: [ours] 1, a region must keep this many pixels (the paper filters nothing; raise it to skip
            slivers left by an entity boundary).

    Returns:
        (R, H, W) bool, one per superpixel with enough uncovered pixels, by ascending label.
    """
    sp = np.asarray(superpixels)
    if sp.ndim != 2:
        raise InputError(f"superpixels must be (H, W), got shape {sp.shape}")
    covered = checked_masks("entities", entities, sp.shape).any(axis=0)
    labels, counts = np.unique(sp[~covered], return_counts=True)
    labels = labels[counts >= min_area_px]
    return (sp[None] == labels[:, None, None]) & ~covered[None]


def usr_prompt_points(regions: np.ndarray, parts: np.ndarray, *,
                      contain_frac: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One SAM point prompt per uncovered region (§4 step 2, Eq. 9).

    A region lying inside a part/subpart mask is prompted at that mask's centroid, otherwise at its own centroid.
    [ours] "Inside" is ``|S_R ∩ M| / |S_R| ≥ contain_frac`` (1.0 is Eq. 9's ⊆); among several such masks the
    smallest is used (the tightest context around the hole; ties: first). [ours] A centroid outside its mask is
    moved to the nearest mask pixel centre.

    Args:
        regions: (R, H, W) bool, non-empty (``uncovered_regions``).
        parts: (P, H, W) bool, M_P^32 ∪ M_SP^32 after ``adaptive_nms``.
        contain_frac: see above.

    Returns:
        ``(points_xy, source)``: (R, 2) float64 prompt xy; (R,) int64 index of the part used, -1 for the region.
    """
    r = checked_masks("regions", regions)
    p = checked_masks("parts", parts, r.shape[1:])
    r_area = r.sum(axis=(1, 2))
    if (r_area == 0).any():
        raise InputError("regions must not be empty")
    p_area = p.sum(axis=(1, 2))
    inside = intersections(r, p) >= contain_frac * r_area[:, None]  # (R, P)
    points = np.zeros((len(r), 2))
    source = np.full(len(r), -1, dtype=np.int64)
    for i in range(len(r)):
        cands = np.flatnonzero(inside[i])
        if cands.size:
            source[i] = cands[np.argmin(p_area[cands])]
            points[i] = inside_centroid(p[source[i]])
        else:
            points[i] = inside_centroid(r[i])
    return points, source


def greedy_cover(candidates: np.ndarray, uncovered: np.ndarray, *, min_gain_px: int = 1) -> np.ndarray:
    """Fewest additional masks that fill the uncovered pixels (§4 step 4, greedy set cover).

    Repeatedly picks the mask that covers the most still-uncovered pixels (ties: lowest index), until no mask
    adds ``min_gain_px``. Greedy set cover is within a factor ln(|U|) + 1 of the fewest masks.

    Args:
        candidates: (N, H, W) bool, the USR masks M_A.
        uncovered: (H, W) bool, the pixels to fill (the union of ``uncovered_regions``).
        min_gain_px: [ours] 1, the stop rule (the paper only names "a naive greedy algorithm"); raise it so that
            masks adding only a few pixels are not kept as entities.

    Returns:
        (K,) int64 chosen indices, in the order picked.
    """
    c = checked_masks("candidates", candidates)
    rem = np.asarray(uncovered, dtype=bool)
    if rem.shape != c.shape[1:]:
        raise InputError(f"uncovered must be {c.shape[1:]}, got shape {rem.shape}")
    flat = c.reshape(len(c), c.shape[1] * c.shape[2])
    rem = rem.reshape(-1).copy()
    chosen: list[int] = []
    while len(c):
        gains = (flat & rem).sum(axis=1)
        best = int(np.argmax(gains))
        if gains[best] < max(min_gain_px, 1):
            break
        chosen.append(best)
        rem &= ~flat[best]
    return np.asarray(chosen, dtype=np.int64)


def fuse_new_masks(entities: np.ndarray, entity_scores: np.ndarray, new_masks: np.ndarray, new_scores: np.ndarray,
                   *, rho: float = 0.1, only_uncovered: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fuse the chosen USR masks into the entities (§4 step 5, Eq. 10).

    In the given order, each new mask joins the entity it has the highest IoU with if that IoU > ρ, else it becomes
    a new entity. [ours] The IoU is taken against the entities as they are then, new ones included, so two new
    masks of one hole fuse with each other. [ours] ``only_uncovered``: only pixels no entity holds yet are added,
    which keeps the entities disjoint; a new entity left empty by that is dropped.

    Args:
        entities: (E, H, W) bool, M_E. entity_scores: (E,) float.
        new_masks: (A, H, W) bool (``greedy_cover``'s picks, in pick order). new_scores: (A,) float.
        rho: ρ = 0.1 (paper, Table 4).
        only_uncovered: see above; False adds whole masks (Eq. 10 literally).

    Returns:
        ``(masks, scores, target)``: (E', H, W) bool and (E',) float64, the first E rows being the updated entities;
        (A,) int64, the row each new mask went to, -1 if dropped. An entity keeps its score ([ours]); a new one
        takes its mask's.
    """
    e = checked_masks("entities", entities)
    a = checked_masks("new_masks", new_masks, e.shape[1:])
    out = list(e.copy())
    scores = list(checked_vector("entity_scores", entity_scores, len(e)))
    new_s = checked_vector("new_scores", new_scores, len(a))
    covered = e.any(axis=0) if len(e) else np.zeros(e.shape[1:], dtype=bool)
    target = np.full(len(a), -1, dtype=np.int64)
    for i, mask in enumerate(a):
        add = mask & ~covered if only_uncovered else mask
        iou = mask_iou_matrix(mask[None], np.stack(out))[0] if out else np.zeros(0)
        if iou.size and iou.max() > rho:
            target[i] = int(np.argmax(iou))
            out[target[i]] = out[target[i]] | add
        elif add.any():
            target[i] = len(out)
            out.append(add)
            scores.append(new_s[i])
        covered |= add
    masks = np.stack(out) if out else np.zeros((0, *e.shape[1:]), dtype=bool)
    return masks, np.asarray(scores, dtype=np.float64), target


def to_entity_map(masks: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Final entity id map M̆_E: mask i gets id i + 1, 0 is no entity.

    Overlap is not expected after EMR and ``fuse_new_masks``; any that remains goes to the highest-scoring mask
    (ties: lower index), so each pixel holds at most one id. A mask can thus end up with no pixel.

    Args:
        masks: (N, H, W) bool, N ≤ 65535. scores: (N,) float.

    Returns:
        (H, W) uint16.
    """
    m = checked_masks("masks", masks)
    s = checked_vector("scores", scores, len(m))
    if len(m) > np.iinfo(np.uint16).max:
        raise InputError(f"at most 65535 entities fit a uint16 map, got {len(m)}")
    out = np.zeros(m.shape[1:], dtype=np.uint16)
    for i in np.argsort(-s, kind="stable")[::-1]:  # lowest priority first, so the highest is painted last
        out[m[i]] = i + 1
    return out
