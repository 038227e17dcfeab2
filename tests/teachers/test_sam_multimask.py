from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.utils.amg import build_all_layer_point_grids, build_point_grid

from omnilabel.errors import InputError
from omnilabel.models.sam_loader import load_sam
from omnilabel.ops.grid import point_grid
from omnilabel.teachers.sam import SamTeacher, SamTeacherConfig

SIZE_HW = (200, 300)


@pytest.fixture(scope="module")
def sam(tiny_sam_path):
    return load_sam(tiny_sam_path)


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (*SIZE_HW, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def predictor(sam, image):
    pred = SamPredictor(sam)
    pred.set_image(image)
    return pred


@pytest.fixture(scope="module")
def points():
    return point_grid(4, SIZE_HW)  # 16 points


def _collect(chunks, n):
    logits = np.full((n, 3, 64, 64), np.nan, dtype=np.float32)
    scores = np.full((n, 3), np.nan, dtype=np.float32)
    for c in chunks:
        logits[c.indices], scores[c.indices] = c.low_res_logits, c.iou_scores
    return logits, scores


def test_multimask_matches_sam_predictor_point_by_point(sam, image, predictor, points):
    teacher = SamTeacher(sam)
    emb = teacher.encode(image)
    chunks = list(teacher.decode_points_multimask(emb, points, chunk=5))
    for c in chunks:
        assert c.low_res_logits.shape == (len(c.indices), 3, 64, 64) and c.low_res_logits.dtype == np.float32
        assert c.iou_scores.shape == (len(c.indices), 3) and c.iou_scores.dtype == np.float32
    np.testing.assert_array_equal(np.concatenate([c.indices for c in chunks]), np.arange(len(points)))
    logits, scores = _collect(chunks, len(points))
    for i, p in enumerate(points):
        ref_logits_full, ref_scores, ref_low = predictor.predict(
            point_coords=p[None], point_labels=np.array([1]), multimask_output=True, return_logits=True
        )
        np.testing.assert_allclose(scores[i], ref_scores, atol=1e-4)
        np.testing.assert_allclose(logits[i], ref_low, atol=1e-3)
        masks = teacher.upsample(emb, logits[i])
        ref_masks = ref_logits_full > sam.mask_threshold
        assert masks.shape == (3, *SIZE_HW) and masks.dtype == bool
        for a, b in zip(masks, ref_masks, strict=True):
            assert (a != b).mean() < 1e-3  # equal but for pixels whose logit is ~0
            assert (a & b).sum() / max((a | b).sum(), 1) >= 0.99


@pytest.mark.parametrize("chunk", [1, 3, 7, 16, 100])
def test_chunk_size_does_not_change_results_and_counts_calls(sam, image, points, chunk):
    teacher = SamTeacher(sam)
    emb = teacher.encode(image)
    ref_logits, ref_scores = _collect(teacher.decode_points_multimask(emb, points, chunk=len(points)), len(points))
    teacher.decoder_calls = 0
    chunks = list(teacher.decode_points_multimask(emb, points, chunk=chunk))
    assert teacher.decoder_calls == len(chunks) == math.ceil(len(points) / chunk)
    logits, scores = _collect(chunks, len(points))
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_default_chunk_is_max_prompts_per_call(sam, image, points):
    teacher = SamTeacher(sam, config=SamTeacherConfig(max_prompts_per_call=6))
    emb = teacher.encode(image)
    sizes = [len(c.indices) for c in teacher.decode_points_multimask(emb, points)]
    assert sizes == [6, 6, 4] and teacher.decoder_calls == 3


def test_streaming_is_lazy(sam, image, points):
    teacher = SamTeacher(sam)
    emb = teacher.encode(image)
    it = teacher.decode_points_multimask(emb, points, chunk=4)
    assert teacher.decoder_calls == 0
    next(it)
    assert teacher.decoder_calls == 1


def test_no_points_yields_nothing(sam, image):
    teacher = SamTeacher(sam)
    assert list(teacher.decode_points_multimask(teacher.encode(image), np.zeros((0, 2)))) == []
    assert teacher.decoder_calls == 0


@pytest.mark.parametrize(
    ("points_xy", "chunk"),
    [(np.zeros((3, 3)), None), (np.array([[1.0, np.nan]]), None), (np.zeros((2, 2)), 0)],
)
def test_bad_input_raises(sam, image, points_xy, chunk):
    teacher = SamTeacher(sam)
    emb = teacher.encode(image)
    with pytest.raises(InputError):
        list(teacher.decode_points_multimask(emb, points_xy, chunk=chunk))


def test_upsample_rejects_wrong_grid(sam, image):
    teacher = SamTeacher(sam)
    with pytest.raises(InputError):
        teacher.upsample(teacher.encode(image), np.zeros((2, 32, 32), np.float32))


def test_upsample_accepts_tensor_and_chunks(sam, image, points):
    teacher = SamTeacher(sam, config=SamTeacherConfig(max_prompts_per_call=2))
    emb = teacher.encode(image)
    logits, _ = _collect(teacher.decode_points_multimask(emb, points[:3]), 3)
    flat = logits.reshape(-1, 64, 64)  # 9 masks, upsampled 2 at a time
    a = teacher.upsample(emb, flat)
    b = teacher.upsample(emb, torch.from_numpy(flat))
    assert a.shape == (9, *SIZE_HW)
    np.testing.assert_array_equal(a, b)


def test_oom_halves_the_chunk(sam, image, points, monkeypatch):
    teacher = SamTeacher(sam)
    emb = teacher.encode(image)
    real = teacher._run_decoder

    def limited(emb, batch, *, multimask):
        if len(batch.indices) > 4:
            raise torch.OutOfMemoryError("fake")
        return real(emb, batch, multimask=multimask)

    monkeypatch.setattr(teacher, "_run_decoder", limited)
    chunks = list(teacher.decode_points_multimask(emb, points, chunk=16))
    assert [len(c.indices) for c in chunks] == [4, 4, 4, 4]
    assert teacher.oom_splits == 2
    np.testing.assert_array_equal(np.concatenate([c.indices for c in chunks]), np.arange(16))


@pytest.mark.parametrize("n_per_side", [1, 4, 32, 64])
@pytest.mark.parametrize("size_hw", [(200, 300), (64, 64), (1, 7)])
def test_point_grid_equals_sam_amg(n_per_side, size_hw):
    expected = build_point_grid(n_per_side) * np.array(size_hw)[None, ::-1]
    got = point_grid(n_per_side, size_hw)
    assert got.shape == (n_per_side**2, 2) and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)


def test_point_grid_equals_automatic_mask_generator_scaling(sam):
    # SamAutomaticMaskGenerator._process_crop: point_grids[layer] * cropped_im_size[::-1] (one layer, no crop).
    gen = SamAutomaticMaskGenerator(sam, points_per_side=32)
    assert len(gen.point_grids) == 1
    np.testing.assert_allclose(point_grid(32, SIZE_HW), gen.point_grids[0] * np.array(SIZE_HW)[None, ::-1])
    np.testing.assert_allclose(point_grid(64, SIZE_HW), build_all_layer_point_grids(64, 0, 1)[0] * [300, 200])


@pytest.mark.parametrize(("n", "size_hw"), [(0, (10, 10)), (4, (0, 10))])
def test_point_grid_rejects_bad_input(n, size_hw):
    with pytest.raises(InputError):
        point_grid(n, size_hw)


def test_a_prompt_of_several_clicks_decodes_as_segment_anything_does(tiny_sam_path):
    """``predict`` with (N, k, 2) clicks equals SamPredictor given the same k positive clicks, single output."""
    sam = load_sam(tiny_sam_path)
    teacher, predictor = SamTeacher(sam), SamPredictor(sam)
    image = np.random.default_rng(3).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    emb = teacher.encode(image)
    predictor.set_image(image)
    clicks = np.array([[[10.5, 20.5], [30.5, 40.5], [50.0, 12.0]], [[60.0, 60.0], [5.0, 5.0], [80.0, 30.0]]])
    out = teacher.predict(emb, points_xy=clicks)
    for i in range(len(clicks)):
        masks, scores, _ = predictor.predict(point_coords=clicks[i], point_labels=np.ones(3), multimask_output=False)
        np.testing.assert_array_equal(out.masks[i], masks[0])
        assert out.iou_scores[i] == pytest.approx(scores[0], abs=1e-5)
