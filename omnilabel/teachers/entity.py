"""E-SAM entity segmentation with a frozen SAM: MMG → EMR → USR (digest: specs/e-sam.md).

``EntitySegmenter.segment`` encodes the image once, decodes the main grid, the gallery grid and the USR prompts
from that one embedding, computes the Felzenszwalb superpixels once, and chains the pure steps of
``omnilabel.ops.entity`` (MMG), ``omnilabel.ops.entity_refine`` (EMR) and ``omnilabel.ops.entity_cover`` (USR).

Glue choices the paper does not make ([ours]):

- Confidence s of every mask is SAM's predicted IoU (§7.3.1); no AMG pre-filter (pred-IoU / stability) runs
  before the level split, so each point keeps its 3 outputs and the area order is defined (§7.3.2).
- Part and subpart masks go through adaptive NMS separately, each level against itself (§7.3.6).
- Memory: no grid is ever held as full-size masks. Each decoder chunk's 3 outputs are ranked by area on the
  decoder's low-res masks (``SamTeacher.lowres_masks``: 4g x 4g logits > 0, padding cropped; 256 x 256 for an
  official SAM, where SAM decides its masks) and kept as float16 logits: the 32-grid's 3 levels (3 x 1024 x
  (4g)², 0.4 GiB for an official SAM). MMG (object NMS, the best-map check, adaptive NMS with the density map
  averaged down to that grid) runs at that resolution; only the surviving objects and parts are upsampled to
  the image size.
- The 64-grid gallery is decoded on demand (``_Gallery``): only the points a step can use are decoded, their
  object (O) and best (B) outputs kept as float16 low-res logits and upsampled per use. A point's outputs depend
  on that point alone, so the result equals decoding all 4096 points first, at a fraction of the decoder calls:
  - split (§3.1): the points lying on a pixel that two or more object candidates share. ``split_overlaps`` only
    reads guides at points inside an overlap, and overlaps only shrink, so the result equals the full gallery's;
  - merge (§3.2): the points lying inside a fragment of some candidate pair (S_M ≥ threshold either way). A SAM
    mask holds its own prompt point, so a gallery mask covering ≥ ``merge_cover_frac`` of both fragments of a
    pair almost always has its point in one of them. A point's B mask is added only when it is not its O mask.
- Centroid features for Eq. 7: the (C, g, g) embedding sampled bilinearly (``grid_sample``, align_corners=False,
  border padding) at the centroid mapped into SAM's resized input frame (the embedding covers the padded square
  input at stride image_size / g).
- USR keeps, for each extra prompt, SAM's highest-scoring of the 3 outputs (§7.3.10); the greedy cover fills the
  union of the uncovered regions; fusion adds only uncovered pixels (entities stay disjoint).
- Final scores: an entity keeps the best score of the fragments merged into it; a new USR entity its SAM score.
  The final masks are read back from the id map (empty ones dropped), so mask i is exactly ``id_map == i + 1``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from omnilabel.errors import InputError
from omnilabel.ops.entity import (
    adaptive_nms,
    consistency_filter,
    levels_by_area,
    mask_nms,
    stability_scores,
    superpixel_density,
)
from omnilabel.ops.entity_cover import fuse_new_masks, greedy_cover, to_entity_map, uncovered_regions, usr_prompt_points
from omnilabel.ops.entity_refine import (
    centroids_in_masks,
    mask_similarity,
    merge_fragments,
    select_guides,
    split_overlaps,
)
from omnilabel.ops.grid import point_grid
from omnilabel.ops.superpixels import (
    FELZENSZWALB_MIN_SIZE_PX,
    FELZENSZWALB_SCALE,
    FELZENSZWALB_SIGMA,
    felzenszwalb_superpixels,
    superpixel_centroids,
)
from omnilabel.teachers.sam import ImageEmbedding, SamTeacher

__all__ = ["EntityConfig", "EntityResult", "EntitySegmenter", "EntityStats"]


@dataclass(frozen=True)
class EntityConfig:
    """Thresholds of E-SAM; paper values where it gives them (Table 4), else the ops' [ours] defaults.

    Attributes:
        grid_points_per_side: MMG grid, 32 (paper §3.2: 32 x 32 points; "32/64" best in Table 4).
        gallery_points_per_side: gallery grid, 64 (paper §3.2 / Table 4).
        decoder_chunk: points per decoder call; a memory cap, results do not depend on it.
        object_nms_iou: θ_O = 0.8, object-level NMS (paper, Table 4: 0.8 best of 0.7-0.9).
        object_nms_overlap: "mask" IoU for that NMS ([ours], ``mask_nms``: boxes of nested entities coincide).
        consistency_iou: γ_O = 0.6, object-vs-best-map IoU of Eq. 2 (paper, Table 4).
        consistency_exclude_self: [ours] False, a point's own best mask counts in Eq. 2 (the literal equation).
        part_nms_base_iou: N_t of Eq. 4, not given; [ours] 0.7, SAM AMG's ``box_nms_thresh``.
        density_reduce: how M_D(𝓜) is read over a mask; [ours] "mean" (``adaptive_nms``).
        density_ref_area_px: w_k's reference area; [ours] None = median superpixel area (resolution-free).
        felzenszwalb_scale, felzenszwalb_sigma, felzenszwalb_min_size: not given by the paper; [ours]
            scikit-image's gallery example (``omnilabel.ops.superpixels``).
        split_delta: δ = 0.05, an overlap below this share of the larger mask is cut from it (paper, Table 4).
        split_min_keep: [ours] 0.5, a candidate left with less than this share of its area after the split is
            dropped (its pixels stay with the masks that took them; what is left uncovered goes to USR). Object NMS
            at θ_O = 0.8 keeps near-duplicates (mask IoU up to 0.8), and the split turns each into a sliver entity
            beside the mask that took its overlap. Measured with the shipped example teacher on 15 example images:
            33.6 → 3.7 entities per image, class-agnostic AP 0.46 → 0.66 (0.3: 0.66; on 30 images 0.5 and 0.7 give
            0.71). 0 is the paper's literal procedure.
        guide_tau: τ = 0.1, score gap of Eq. 6 that favours the gallery's object mask (paper, Table 4).
        same_guide_iou: [ours] 0.9, guides this similar count as one mask in the "most frequent" vote.
        merge_top_k: k of Eq. 7, not given; [ours] 8 neighbours.
        merge_min_similarity: "high S_M", not given; [ours] 2.0, a quarter of k.
        merge_require_adjacent: [ours] True, Eq. 7 speaks of adjacent masks.
        merge_cover_frac, merge_cover_iou: "a gallery mask encompasses both", not given; [ours] 0.8 and 0.7.
        usr_min_region_px: [ours] 1, smallest uncovered superpixel remainder that gets a prompt (paper: no filter).
        usr_contain_frac: [ours] 1.0, Eq. 9's ⊆ for "the hole lies inside a part mask".
        usr_min_gain_px: [ours] 1, the greedy cover stops when no mask adds this many uncovered pixels.
        fuse_rho: ρ = 0.1, IoU above which a USR mask joins an entity (paper, Table 4).
        pred_iou_thresh: SAM AMG's quality filter on the predicted IoU (AMG: 0.88); 0 = off, as E-SAM keeps
            every output of every point so that the three levels are defined (§7.3.2). Applied to object and
            part masks before their NMS.
        stability_score_thresh: AMG's stability filter (AMG: 0.95, ``stability_scores`` at the decoder's
            resolution); 0 = off, for the same reason. stability_score_offset: AMG's 1.0.
    """

    grid_points_per_side: int = 32
    gallery_points_per_side: int = 64
    decoder_chunk: int = 64
    object_nms_iou: float = 0.8
    object_nms_overlap: Literal["mask", "box"] = "mask"
    consistency_iou: float = 0.6
    consistency_exclude_self: bool = False
    part_nms_base_iou: float = 0.7
    density_reduce: Literal["mean", "max"] = "mean"
    density_ref_area_px: float | None = None
    felzenszwalb_scale: float = FELZENSZWALB_SCALE
    felzenszwalb_sigma: float = FELZENSZWALB_SIGMA
    felzenszwalb_min_size: int = FELZENSZWALB_MIN_SIZE_PX
    split_delta: float = 0.05
    split_min_keep: float = 0.5
    guide_tau: float = 0.1
    same_guide_iou: float = 0.9
    merge_top_k: int = 8
    merge_min_similarity: float = 2.0
    merge_require_adjacent: bool = True
    merge_cover_frac: float = 0.8
    merge_cover_iou: float = 0.7
    usr_min_region_px: int = 1
    usr_contain_frac: float = 1.0
    usr_min_gain_px: int = 1
    fuse_rho: float = 0.1
    pred_iou_thresh: float = 0.0
    stability_score_thresh: float = 0.0
    stability_score_offset: float = 1.0

    def __post_init__(self) -> None:
        problems = [f"{name} must be >= 1, got {getattr(self, name)}"
                    for name in ("grid_points_per_side", "gallery_points_per_side", "decoder_chunk", "merge_top_k",
                                 "usr_min_region_px", "usr_min_gain_px", "felzenszwalb_min_size")
                    if getattr(self, name) < 1]
        problems += [f"{name} must be in [0, 1], got {getattr(self, name)}"
                     for name in ("object_nms_iou", "consistency_iou", "part_nms_base_iou", "split_delta",
                                  "same_guide_iou", "merge_cover_frac", "merge_cover_iou", "usr_contain_frac",
                                  "fuse_rho", "stability_score_thresh", "split_min_keep")
                     if not 0.0 <= getattr(self, name) <= 1.0]
        if problems:
            raise InputError("bad EntityConfig", problems)


@dataclass
class EntityStats:
    """Cost and coverage of one ``segment`` call.

    Attributes:
        seconds: wall seconds per stage: "encode", "superpixels", "mmg" (the main grid's decoding included),
            "emr" (the gallery points it decodes included), "usr", "total".
        encoder_calls: image-encoder passes (1).
        decoder_calls: mask-decoder calls, all grids and USR prompts.
        decoder_calls_usr: of those, the USR prompts' calls.
        covered_frac_emr: share of pixels in some entity after MMG + EMR, in [0, 1].
        covered_frac_usr: the same after USR (≥ covered_frac_emr: fusion only adds pixels).
        counts: number of masks after each step ("objects_nms", "objects_kept", "parts", "split", "merged",
            "usr_prompts", "usr_chosen", "final"), and "gallery_decoded", the gallery points decoded.
    """

    seconds: dict[str, float] = field(default_factory=dict)
    encoder_calls: int = 0
    decoder_calls: int = 0
    decoder_calls_usr: int = 0
    covered_frac_emr: float = 0.0
    covered_frac_usr: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class EntityResult:
    """Non-overlapping entity masks of one image.

    Attributes:
        masks: (N, H, W) bool, pairwise disjoint, none empty; mask i is ``id_map == i + 1``.
        scores: (N,) float64 confidence (SAM's predicted IoU, see the module docstring).
        id_map: (H, W) uint16, 0 = no entity, i + 1 = mask i.
        stats: cost and coverage.
    """

    masks: np.ndarray
    scores: np.ndarray
    id_map: np.ndarray
    stats: EntityStats

    def __post_init__(self) -> None:
        if self.masks.ndim != 3 or self.scores.shape != (len(self.masks),) or self.id_map.shape != self.masks.shape[1:]:
            raise InputError(f"EntityResult: masks (N, H, W), scores (N,), id_map (H, W) expected, got "
                             f"{self.masks.shape}, {self.scores.shape}, {self.id_map.shape}")


@dataclass
class _Ranked:
    """A grid's outputs ranked by area at the decoder's resolution, kept as low-res logits.

    ``levels=True`` (the MMG grid): logits (N, 3, 4g, 4g) float16 in level order O, P, SP; ``best`` (N,) the level
    of the highest-scoring output. ``levels=False`` (the gallery): logits (N, 2, 4g, 4g), the object (O) and best
    (B) outputs; ``best`` is 0 where B is O, else 1. ``scores`` matches ``logits``' first two dimensions.
    """

    points_xy: np.ndarray
    logits: np.ndarray
    scores: np.ndarray
    best: np.ndarray
    lowres_hw: tuple[int, int]

    @property
    def same(self) -> np.ndarray:
        return self.best == 0


class _Gallery:
    """The 64-grid gallery, decoded on demand: a point is decoded (O and B low-res logits, ``_Ranked``) the first
    time a step asks for its masks, and kept. Only the points a step can use are ever decoded (module docstring);
    each point's outputs depend on that point alone, so this equals decoding the whole grid first."""

    def __init__(self, segmenter: EntitySegmenter, emb: ImageEmbedding, points_xy: np.ndarray) -> None:
        self.segmenter, self.emb, self.points_xy = segmenter, emb, np.asarray(points_xy)
        self.rows: dict[int, tuple[np.ndarray, np.ndarray, bool]] = {}  # point → (logits (2, 4g, 4g), scores, same)

    def masks(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Full-size O masks (n, H, W), their scores (n,), B masks, their scores, and (n,) "B is O", of ``idx``."""
        new = [int(i) for i in idx if int(i) not in self.rows]
        if new:
            ranked = self.segmenter._decode_ranked(self.emb, self.points_xy[new], levels=False)
            for j, i in enumerate(new):
                self.rows[i] = (ranked.logits[j], ranked.scores[j], bool(ranked.same[j]))
        sam, hw = self.segmenter.sam, self.emb.original_size
        if len(idx) == 0:
            empty = np.zeros((0, *hw), dtype=bool)
            return empty, np.zeros(0), empty, np.zeros(0), np.zeros(0, dtype=bool)
        rows = [self.rows[int(i)] for i in idx]
        lr = np.stack([r[0] for r in rows]).astype(np.float32)
        full = sam.upsample(self.emb, lr.reshape(-1, *lr.shape[2:])).reshape(len(idx), 2, *hw)
        scores = np.stack([r[1] for r in rows])
        return full[:, 0], scores[:, 0], full[:, 1], scores[:, 1], np.array([r[2] for r in rows])


class EntitySegmenter:
    """E-SAM on a frozen SAM: ``segment(image)`` → non-overlapping entity masks.

    Args:
        sam: the SAM teacher (its counters ``encoder_calls`` / ``decoder_calls`` feed the stats).
        config: thresholds; default ``EntityConfig()``.
    """

    def __init__(self, sam: SamTeacher, config: EntityConfig | None = None) -> None:
        self.sam = sam
        self.config = config or EntityConfig()

    def segment(self, image_rgb: np.ndarray) -> EntityResult:
        """Segment every entity of one image.

        Args:
            image_rgb: (H, W, 3) uint8 RGB.

        Returns:
            The ``EntityResult``.

        Raises:
            InputError: the image is not (H, W, 3) uint8.
        """
        cfg, sam = self.config, self.sam
        stats = EntityStats()
        enc0, dec0 = sam.encoder_calls, sam.decoder_calls
        t_start = time.perf_counter()
        clock = _Clock(stats.seconds)

        emb = sam.encode(image_rgb)
        clock("encode")
        sp = felzenszwalb_superpixels(image_rgb, scale=cfg.felzenszwalb_scale, sigma=cfg.felzenszwalb_sigma,
                                      min_size=cfg.felzenszwalb_min_size)
        centroids = superpixel_centroids(sp)
        clock("superpixels")
        hw = emb.original_size

        # MMG (§2) on the decoder's low-res masks; full size only for the objects and parts that survive.
        main = self._decode_ranked(emb, point_grid(cfg.grid_points_per_side, hw), levels=True)
        rows = np.arange(len(main.points_xy))
        good = self._quality(main)
        obj_lr = sam.lowres_masks(emb, main.logits[:, 0])
        obj_s = main.scores[:, 0]
        ok0 = np.flatnonzero(good[:, 0])
        keep = ok0[mask_nms(obj_lr[ok0], obj_s[ok0], iou_thresh=cfg.object_nms_iou, overlap=cfg.object_nms_overlap)]
        stats.counts["objects_nms"] = len(keep)
        ids = (keep, rows) if cfg.consistency_exclude_self else (None, None)
        best_lr = sam.lowres_masks(emb, main.logits[rows, main.best])
        ok = consistency_filter(obj_lr[keep], best_lr, gamma=cfg.consistency_iou, object_point_ids=ids[0],
                                best_point_ids=ids[1])
        keep = keep[ok]
        del obj_lr, best_lr
        cands, cand_s = _nonempty(sam.upsample(emb, main.logits[keep, 0].astype(np.float32)), obj_s[keep])
        stats.counts["objects_kept"] = len(cands)
        density = _area_resize(superpixel_density(sp, ref_area_px=cfg.density_ref_area_px), main.lowres_hw)
        part_logits = []
        for level in (1, 2):
            ok = np.flatnonzero(good[:, level])
            m = sam.lowres_masks(emb, main.logits[ok, level])
            k = ok[adaptive_nms(m, main.scores[ok, level], density, base_thresh=cfg.part_nms_base_iou,
                                reduce=cfg.density_reduce)]
            part_logits.append(main.logits[k, level])
        parts_all, _ = _nonempty(sam.upsample(emb, np.concatenate(part_logits).astype(np.float32)),
                                 np.zeros(sum(map(len, part_logits))))
        stats.counts["parts"] = len(parts_all)
        del main, part_logits
        gallery = _Gallery(self, emb, point_grid(cfg.gallery_points_per_side, hw))
        clock("mmg")

        # EMR split (§3.1): guides only for gallery points on a shared pixel.
        shared = cands.sum(axis=0) >= 2
        g_idx = np.flatnonzero(_on(shared, gallery.points_xy))
        o_g, o_s, b_g, b_s, _ = gallery.masks(g_idx)
        guides = select_guides(o_g, o_s, b_g, b_s, tau=cfg.guide_tau)
        split = split_overlaps(cands, cand_s, guide_masks=guides, guide_points_xy=gallery.points_xy[g_idx],
                               delta=cfg.split_delta, same_guide_iou=cfg.same_guide_iou)
        left = split.sum(axis=(1, 2))
        kept = (left > 0) & (left >= cfg.split_min_keep * cands.sum(axis=(1, 2)))
        split, cand_s = split[kept], cand_s[kept]
        stats.counts["split"] = len(split)
        # EMR merge (§3.2): Eq. 7 on encoder features at the superpixel centroids, Eq. 8 with the gallery.
        feats = _sample_features(sam, emb, centroids)
        sim = mask_similarity(feats, centroids_in_masks(centroids, split), top_k=cfg.merge_top_k)
        sym = np.maximum(sim, sim.T)
        np.fill_diagonal(sym, -np.inf)
        involved = (sym >= cfg.merge_min_similarity).any(axis=1)
        region = split[involved].any(axis=0) if involved.any() else np.zeros(hw, dtype=bool)
        g_idx = np.flatnonzero(_on(region, gallery.points_xy))
        o_g, _, b_g, _, same = gallery.masks(g_idx)
        gal = np.concatenate([o_g, b_g[~same]])
        entities, ent_s, _ = merge_fragments(split, cand_s, sim, gal, min_similarity=cfg.merge_min_similarity,
                                             require_adjacent=cfg.merge_require_adjacent,
                                             cover_frac=cfg.merge_cover_frac, cover_iou=cfg.merge_cover_iou)
        if len(entities) == 0:
            entities, ent_s = np.zeros((0, *hw), dtype=bool), np.zeros(0)
        stats.counts["merged"] = len(entities)
        stats.covered_frac_emr = float(entities.any(axis=0).mean()) if len(entities) else 0.0
        stats.counts["gallery_decoded"] = len(gallery.rows)
        del gallery, o_g, b_g, gal, guides
        clock("emr")

        # USR (§4): prompts for uncovered superpixels, best output each, greedy cover, fusion.
        dec_usr0 = sam.decoder_calls
        regions = uncovered_regions(sp, entities, min_area_px=cfg.usr_min_region_px)
        stats.counts["usr_prompts"] = len(regions)
        if len(regions):
            pts, _ = usr_prompt_points(regions, parts_all, contain_frac=cfg.usr_contain_frac)
            new, new_s = self._decode_best(emb, pts)
            chosen = greedy_cover(new, regions.any(axis=0), min_gain_px=cfg.usr_min_gain_px)
            entities, ent_s, _ = fuse_new_masks(entities, ent_s, new[chosen], new_s[chosen], rho=cfg.fuse_rho,
                                                only_uncovered=True)
            stats.counts["usr_chosen"] = len(chosen)
        else:
            stats.counts["usr_chosen"] = 0
        stats.decoder_calls_usr = sam.decoder_calls - dec_usr0

        # Final map; masks read back from it so that mask i == (id_map == i + 1).
        id_map = to_entity_map(entities, ent_s) if len(entities) else np.zeros(hw, dtype=np.uint16)
        present = np.flatnonzero(np.bincount(id_map.ravel(), minlength=len(entities) + 1)[1:] > 0)
        lut = np.zeros(len(entities) + 1, dtype=np.uint16)
        lut[present + 1] = np.arange(1, len(present) + 1, dtype=np.uint16)
        id_map = lut[id_map]
        masks = id_map[None] == np.arange(1, len(present) + 1, dtype=np.uint16)[:, None, None]
        scores = np.asarray(ent_s, dtype=np.float64)[present]
        stats.covered_frac_usr = float((id_map > 0).mean())
        stats.counts["final"] = len(masks)
        clock("usr")
        stats.seconds["total"] = time.perf_counter() - t_start
        stats.encoder_calls = sam.encoder_calls - enc0
        stats.decoder_calls = sam.decoder_calls - dec0
        return EntityResult(masks=masks, scores=scores, id_map=id_map, stats=stats)

    # --- decoding ------------------------------------------------------------------------------------------------

    def _decode_ranked(self, emb: ImageEmbedding, points_xy: np.ndarray, *, levels: bool) -> _Ranked:
        """Decode a grid chunk by chunk; rank each point's 3 outputs by low-res area (``levels_by_area``) and keep
        their logits as float16 (see ``_Ranked``); no full-size mask is made here."""
        n, k = len(points_xy), 3 if levels else 2
        g = tuple(self.sam.sam.prompt_encoder.mask_input_size)
        logits = np.zeros((n, k, *g), dtype=np.float16)
        scores, best = np.zeros((n, k)), np.zeros(n, dtype=np.int64)
        hw = self.sam.lowres_masks(emb, np.zeros((1, *g), dtype=np.float32)).shape[1:]
        for c in self.sam.decode_points_multimask(emb, points_xy, chunk=self.config.decoder_chunk):
            lr = c.low_res_logits
            order, b = levels_by_area(self.sam.lowres_masks(emb, lr), c.iou_scores)
            r = np.arange(len(lr))[:, None]
            if levels:
                cols = order
                best[c.indices] = np.argmax(order == b[:, None], axis=1)
            else:
                cols = np.stack([order[:, 0], b], axis=1)
                best[c.indices] = (order[:, 0] != b).astype(np.int64)
            logits[c.indices] = lr[r, cols]
            scores[c.indices] = c.iou_scores[r, cols]
        return _Ranked(np.asarray(points_xy), logits, scores, best, (int(hw[0]), int(hw[1])))

    def _quality(self, ranked: _Ranked) -> np.ndarray:
        """(N, 3) bool: the outputs that pass AMG's quality filters (all of them with the default config)."""
        cfg = self.config
        good = ranked.scores >= cfg.pred_iou_thresh
        if cfg.stability_score_thresh > 0:
            h, w = ranked.lowres_hw
            for level in range(ranked.logits.shape[1]):
                good[:, level] &= stability_scores(ranked.logits[:, level, :h, :w],
                                                   threshold=self.sam.config.mask_threshold,
                                                   offset=cfg.stability_score_offset) >= cfg.stability_score_thresh
        return good

    def _decode_best(self, emb: ImageEmbedding, points_xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """SAM's highest-scoring output per point: (N, H, W) bool and (N,) float64."""
        masks = np.zeros((len(points_xy), *emb.original_size), dtype=bool)
        scores = np.zeros(len(points_xy))
        for c in self.sam.decode_points_multimask(emb, points_xy, chunk=self.config.decoder_chunk):
            best = c.iou_scores.argmax(axis=1)
            r = np.arange(len(best))
            masks[c.indices] = self.sam.upsample(emb, c.low_res_logits[r, best])
            scores[c.indices] = c.iou_scores[r, best]
        return masks, scores


class _Clock:
    """Adds the seconds since the previous call to ``seconds[stage]``."""

    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds, self.last = seconds, time.perf_counter()

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self.last
        self.last = now


def _nonempty(masks: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop the masks a full-size upsampling left empty (a low-res mask of a few pixels can vanish)."""
    keep = masks.any(axis=(1, 2))
    return masks[keep], scores[keep]


def _area_resize(values: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(H, W) float map averaged down to the low-res mask grid (h, w) (area interpolation)."""
    t = torch.as_tensor(values, dtype=torch.float64)[None, None]
    return torch.nn.functional.interpolate(t, size=hw, mode="area")[0, 0].numpy()


def _on(mask: np.ndarray, points_xy: np.ndarray) -> np.ndarray:
    """(N,) bool: the pixel (floor(y), floor(x)) of each point is in the (H, W) mask."""
    cols = np.clip(np.floor(points_xy[:, 0]).astype(np.int64), 0, mask.shape[1] - 1)
    rows = np.clip(np.floor(points_xy[:, 1]).astype(np.int64), 0, mask.shape[0] - 1)
    return mask[rows, cols]


def _sample_features(sam: SamTeacher, emb: ImageEmbedding, points_xy: np.ndarray) -> np.ndarray:
    """(K, C) float64 encoder features, bilinear at image xy mapped into SAM's padded square input frame."""
    if len(points_xy) == 0:
        return np.zeros((0, emb.features.shape[1]))
    xy_in = sam.transform.apply_coords(np.asarray(points_xy, dtype=np.float64), emb.original_size)
    grid = torch.as_tensor(2.0 * xy_in / sam.image_size - 1.0, dtype=torch.float32, device=emb.features.device)
    with torch.inference_mode():
        f = torch.nn.functional.grid_sample(emb.features.float(), grid[None, :, None, :], mode="bilinear",
                                            padding_mode="border", align_corners=False)
    return f[0, :, :, 0].T.cpu().numpy().astype(np.float64)

