from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from omnilabel.data.synthetic import render_scene
from omnilabel.errors import InputError
from omnilabel.models.sam_loader import load_sam
from omnilabel.ops.grid import point_grid
from omnilabel.teachers.entity import EntityConfig, EntitySegmenter, _Gallery
from omnilabel.teachers.sam import SamTeacher

# Small grids so that the tiny SAM runs in seconds on CPU; 25 and 100 points are not multiples of the chunk.
CONFIG = EntityConfig(grid_points_per_side=5, gallery_points_per_side=10, decoder_chunk=16)
SCENES = [(0, (96, 96)), (1, (80, 112))]


@pytest.fixture(scope="module")
def teacher(tiny_sam_path):
    return SamTeacher(load_sam(tiny_sam_path))


@pytest.fixture(scope="module")
def runs(teacher):
    """(image, result, teacher encoder calls during segment) per scene."""
    out = []
    seg = EntitySegmenter(teacher, CONFIG)
    for seed, size_hw in SCENES:
        image, _ = render_scene(np.random.default_rng(seed), size_hw=size_hw, max_objects=4)
        before = teacher.encoder_calls
        result = seg.segment(image)
        out.append((image, result, teacher.encoder_calls - before))
    return out


def test_masks_are_disjoint_and_match_the_id_map(runs):
    for image, r, _ in runs:
        n = len(r.masks)
        assert r.masks.dtype == bool and r.masks.shape == (n, *image.shape[:2])
        assert r.scores.shape == (n,) and np.isfinite(r.scores).all()
        assert r.id_map.dtype == np.uint16 and r.id_map.shape == image.shape[:2]
        assert (r.masks.sum(axis=0) <= 1).all()
        assert set(np.unique(r.id_map)) - {0} == set(range(1, n + 1))
        for i in range(n):
            np.testing.assert_array_equal(r.masks[i], r.id_map == i + 1)
            assert r.masks[i].any()


def test_usr_raises_the_covered_share(runs):
    gains = []
    for _, r, _ in runs:
        s = r.stats
        assert 0.0 <= s.covered_frac_emr <= s.covered_frac_usr <= 1.0
        assert s.covered_frac_usr == pytest.approx(float((r.id_map > 0).mean()))
        gains.append(s.covered_frac_usr - s.covered_frac_emr)
    assert max(gains) > 0


def test_image_is_encoded_once(runs):
    for _, r, encoder_calls in runs:
        assert r.stats.encoder_calls == encoder_calls == 1


def test_decoder_calls_are_the_main_grid_the_gallery_points_used_and_usr(runs):
    c = CONFIG
    main_calls = math.ceil(c.grid_points_per_side**2 / c.decoder_chunk)
    for _, r, _ in runs:
        s = r.stats
        assert s.decoder_calls_usr == math.ceil(s.counts["usr_prompts"] / c.decoder_chunk)
        gallery_calls = s.decoder_calls - main_calls - s.decoder_calls_usr
        decoded = s.counts["gallery_decoded"]
        assert 0 < decoded < c.gallery_points_per_side**2  # on demand: never the whole grid here
        # split's points in one go, then merge's new ones
        assert math.ceil(decoded / c.decoder_chunk) <= gallery_calls <= math.ceil(decoded / c.decoder_chunk) + 1


def test_the_gallery_decodes_a_point_once_when_asked_as_the_whole_grid_would(teacher):
    seg = EntitySegmenter(teacher, CONFIG)
    image, _ = render_scene(np.random.default_rng(0), size_hw=(96, 96), max_objects=4)
    emb = teacher.encode(image)
    pts = point_grid(CONFIG.gallery_points_per_side, (96, 96))
    whole = seg._decode_ranked(emb, pts, levels=False)
    gallery = _Gallery(seg, emb, pts)
    calls = teacher.decoder_calls
    o, o_s, b, b_s, same = gallery.masks(np.array([3, 50, 7]))
    assert teacher.decoder_calls == calls + 1 and set(gallery.rows) == {3, 50, 7}
    gallery.masks(np.array([50, 9]))
    assert teacher.decoder_calls == calls + 2 and set(gallery.rows) == {3, 7, 9, 50}
    gallery.masks(np.array([9, 3]))
    assert teacher.decoder_calls == calls + 2
    idx = [3, 50, 7]
    g = whole.logits.shape[2:]
    np.testing.assert_array_equal(o, teacher.upsample(emb, whole.logits[idx, 0].astype(np.float32).reshape(-1, *g)))
    np.testing.assert_array_equal(b, teacher.upsample(emb, whole.logits[idx, 1].astype(np.float32).reshape(-1, *g)))
    np.testing.assert_allclose(o_s, whole.scores[idx, 0], rtol=1e-5)
    np.testing.assert_allclose(b_s, whole.scores[idx, 1], rtol=1e-5)
    np.testing.assert_array_equal(same, whole.same[idx])


def test_stats_time_every_stage(runs):
    for _, r, _ in runs:
        assert {"encode", "superpixels", "mmg", "emr", "usr", "total"} <= set(r.stats.seconds)
        assert all(v >= 0 for v in r.stats.seconds.values())


@pytest.mark.parametrize("levels", [True, False])
def test_grids_are_kept_as_low_res_logits_ranked_by_area(teacher, levels):
    seg = EntitySegmenter(teacher, CONFIG)
    image, _ = render_scene(np.random.default_rng(0), size_hw=(96, 96), max_objects=4)
    emb = teacher.encode(image)
    pts = np.array([[10.5, 20.5], [50.0, 60.0], [90.0, 5.0]])
    ranked = seg._decode_ranked(emb, pts, levels=levels)
    g = tuple(teacher.sam.prompt_encoder.mask_input_size)
    assert ranked.logits.shape == (3, 3 if levels else 2, *g) and ranked.logits.dtype == np.float16
    chunk = next(teacher.decode_points_multimask(emb, pts))
    areas = teacher.lowres_masks(emb, chunk.low_res_logits).sum(axis=(2, 3))
    rows = np.arange(3)
    by_area = np.argsort(-areas, axis=1, kind="stable")
    np.testing.assert_allclose(ranked.scores[:, 0], chunk.iou_scores[rows, by_area[:, 0]], rtol=1e-6)
    np.testing.assert_allclose(ranked.scores[rows, ranked.best], chunk.iou_scores.max(axis=1), rtol=1e-6)
    if levels:
        np.testing.assert_allclose(ranked.scores, chunk.iou_scores[rows[:, None], by_area], rtol=1e-6)
        assert (np.diff(teacher.lowres_masks(emb, ranked.logits).sum(axis=(2, 3)), axis=1) <= 0).all()


def test_low_res_masks_agree_with_the_upsampled_ones(teacher):
    image, _ = render_scene(np.random.default_rng(1), size_hw=(80, 112), max_objects=4)
    emb = teacher.encode(image)
    chunk = next(teacher.decode_points_multimask(emb, np.array([[20.0, 30.0], [60.0, 40.0]])))
    lr = chunk.low_res_logits.reshape(-1, *chunk.low_res_logits.shape[2:])
    small = teacher.lowres_masks(emb, lr)
    full = teacher.upsample(emb, lr)
    # The low-res grid covers the resized input, padding cropped: its aspect follows the image's.
    assert small.shape[2] > small.shape[1]
    # Compare at the small grid: the full mask sampled at each low-res cell centre.
    rows = np.minimum(((np.arange(small.shape[1]) + 0.5) * full.shape[1] / small.shape[1]).astype(int), 79)
    cols = np.minimum(((np.arange(small.shape[2]) + 0.5) * full.shape[2] / small.shape[2]).astype(int), 111)
    sampled = full[:, rows][:, :, cols]
    assert (sampled == small).mean() > 0.9


def test_amg_quality_filters_are_off_by_default_and_drop_masks_when_set(teacher):
    image, _ = render_scene(np.random.default_rng(0), size_hw=(96, 96), max_objects=4)
    plain = EntitySegmenter(teacher, CONFIG).segment(image).stats.counts
    strict = EntitySegmenter(teacher, replace(CONFIG, stability_score_thresh=1.0, pred_iou_thresh=2.0))
    counts = strict.segment(image).stats.counts
    assert plain["objects_nms"] > 0 and plain["parts"] > 0
    assert counts["objects_nms"] == counts["parts"] == 0


@pytest.mark.parametrize("bad", [{"grid_points_per_side": 0}, {"decoder_chunk": 0}, {"object_nms_iou": 1.5},
                                 {"fuse_rho": -0.1}])
def test_config_rejects_bad_values(bad):
    with pytest.raises(InputError):
        EntityConfig(**bad)

