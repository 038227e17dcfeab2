from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from omnilabel.errors import InputError
from omnilabel.models.sam_loader import load_sam
from omnilabel.teachers.sam import PromptBatch, SamTeacher, SamTeacherConfig

NAN2 = [np.nan] * 2
NAN4 = [np.nan] * 4
# Mixed prompts on a 200 x 300 image: points only, boxes only, point + box, interleaved.
POINTS = np.array([[50, 50], NAN2, [250, 150], [120, 40], NAN2, [60, 170], [280, 20], NAN2], float)
_B = [[10, 10, 100, 80], [100, 20, 200, 90], [150, 100, 290, 190], [30, 120, 120, 195], [0, 0, 299, 199]]
BOXES = np.array([NAN4, _B[0], NAN4, _B[1], _B[2], _B[3], NAN4, _B[4]], float)


@pytest.fixture(scope="module")
def sam(tiny_sam_path):
    return load_sam(tiny_sam_path)


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def predictor(sam, image):
    pred = SamPredictor(sam)
    pred.set_image(image)
    return pred


def _reference(predictor, points, boxes, *, mask_logits=None, multimask_single_point=True):
    """SamPredictor, one prompt per call; single points take the best of 3 by predicted IoU."""
    masks, scores, logits = [], [], []
    for i in range(len(points)):
        has_pt, has_box = np.isfinite(points[i]).all(), np.isfinite(boxes[i]).all()
        kwargs = {}
        if has_pt:
            kwargs.update(point_coords=points[i : i + 1], point_labels=np.array([1]))
        if has_box:
            kwargs["box"] = boxes[i]
        if mask_logits is not None:
            kwargs["mask_input"] = mask_logits[i : i + 1]
        multi = has_pt and not has_box and mask_logits is None and multimask_single_point
        m, s, lr = predictor.predict(**kwargs, multimask_output=multi)
        j = int(np.argmax(s))
        masks.append(m[j]), scores.append(s[j]), logits.append(lr[j])
    return np.array(masks), np.array(scores), np.array(logits)


def _assert_matches(out, ref):
    ref_masks, ref_scores, ref_logits = ref
    assert out.masks.shape == ref_masks.shape and out.masks.dtype == bool
    for a, b in zip(out.masks, ref_masks, strict=True):
        iou = (a & b).sum() / max((a | b).sum(), 1)
        assert iou >= 0.99
    np.testing.assert_allclose(out.iou_scores, ref_scores, atol=1e-3)
    assert out.low_res_logits.dtype == np.float32
    np.testing.assert_allclose(out.low_res_logits, ref_logits, atol=1e-3)


@pytest.mark.parametrize("kind", ["point", "box", "point+box"])
def test_single_kind_matches_sam_predictor(sam, image, predictor, kind):
    rows = {
        "point": ~np.isnan(POINTS[:, 0]) & np.isnan(BOXES[:, 0]),
        "box": np.isnan(POINTS[:, 0]) & ~np.isnan(BOXES[:, 0]),
        "point+box": ~np.isnan(POINTS[:, 0]) & ~np.isnan(BOXES[:, 0]),
    }[kind]
    points = POINTS[rows] if "point" in kind else None
    boxes = BOXES[rows] if "box" in kind else None
    teacher = SamTeacher(sam)
    out = teacher.predict(teacher.encode(image), points_xy=points, boxes_xyxy=boxes)
    n = int(rows.sum())
    ref_points = points if points is not None else np.full((n, 2), np.nan)
    ref_boxes = boxes if boxes is not None else np.full((n, 4), np.nan)
    _assert_matches(out, _reference(predictor, ref_points, ref_boxes))
    assert teacher.decoder_calls == 1


def test_mixed_batch_matches_predictor_with_one_encoder_pass(sam, image, predictor):
    teacher = SamTeacher(sam)
    out = teacher.predict(teacher.encode(image), points_xy=POINTS, boxes_xyxy=BOXES)
    _assert_matches(out, _reference(predictor, POINTS, BOXES))
    assert out.masks.shape == (8, 200, 300)
    assert out.low_res_logits.shape == (8, 64, 64)  # 4 x the 16 x 16 embedding grid
    assert teacher.encoder_calls == 1
    assert teacher.decoder_calls == 3  # one per kind: point, box, point + box


def test_chunking_gives_identical_results(sam, image):
    whole = SamTeacher(sam)
    emb = whole.encode(image)
    chunked = SamTeacher(sam, config=SamTeacherConfig(max_prompts_per_call=2))
    a = whole.predict(emb, points_xy=POINTS, boxes_xyxy=BOXES)
    b = chunked.predict(emb, points_xy=POINTS, boxes_xyxy=BOXES)
    assert chunked.decoder_calls == 2 + 1 + 2  # 3 points, 2 boxes, 3 point + box, in chunks of 2
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_allclose(a.iou_scores, b.iou_scores, atol=1e-5)
    np.testing.assert_allclose(a.low_res_logits, b.low_res_logits, atol=1e-4)


def test_single_output_for_points_when_multimask_off(sam, image, predictor):
    points = POINTS[~np.isnan(POINTS[:, 0])]
    teacher = SamTeacher(sam, config=SamTeacherConfig(multimask_single_point=False))
    out = teacher.predict(teacher.encode(image), points_xy=points)
    ref = _reference(predictor, points, np.full((len(points), 4), np.nan), multimask_single_point=False)
    _assert_matches(out, ref)
    multi = SamTeacher(sam).predict(teacher.encode(image), points_xy=points)
    assert not np.allclose(multi.iou_scores, out.iou_scores)


def test_mask_logits_prompt_matches_predictor(sam, image, predictor):
    teacher = SamTeacher(sam)
    emb = teacher.encode(image)
    first = teacher.predict(emb, points_xy=POINTS, boxes_xyxy=BOXES)
    out = teacher.predict(emb, points_xy=POINTS, boxes_xyxy=BOXES, mask_logits=first.low_res_logits)
    _assert_matches(out, _reference(predictor, POINTS, BOXES, mask_logits=first.low_res_logits))
    assert not np.allclose(out.low_res_logits, first.low_res_logits)
    # A mask alone is a prompt too.
    none = np.full((2, 2), np.nan)
    alone = teacher.predict(emb, points_xy=none, mask_logits=first.low_res_logits[:2])
    ref = predictor.predict(mask_input=first.low_res_logits[:1], multimask_output=False)
    np.testing.assert_allclose(alone.low_res_logits[0], ref[2][0], atol=1e-3)


def test_masks_follow_prompts_and_image(sam, image):
    teacher = SamTeacher(sam)
    out = teacher.predict(teacher.encode(image), points_xy=POINTS, boxes_xyxy=BOXES)
    flat = out.masks.reshape(len(out.masks), -1)
    for i in range(len(flat)):
        assert 0.02 < flat[i].mean() < 0.98  # neither empty nor full
        for j in range(i):
            assert (flat[i] != flat[j]).mean() > 0.02, (i, j)
    other = np.random.default_rng(1).integers(0, 256, image.shape, dtype=np.uint8)
    out2 = teacher.predict(teacher.encode(other), points_xy=POINTS, boxes_xyxy=BOXES)
    assert (out2.masks != out.masks).mean() > 0.02


def test_prompt_hook_sees_sliced_prompt_data(sam, image):
    class Recording(SamTeacher):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.seen: list[tuple[list[int], list[int]]] = []

        def encode_prompts(self, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
            self.seen.append((batch.indices.tolist(), batch.data["category_ids"].tolist()))
            sparse, dense = super().encode_prompts(batch)
            return sparse * 0.0, dense

    teacher = Recording(sam, config=SamTeacherConfig(max_prompts_per_call=2))
    category_ids = np.arange(100, 108)
    emb = teacher.encode(image)
    out = teacher.predict(emb, points_xy=POINTS, boxes_xyxy=BOXES, prompt_data={"category_ids": category_ids})
    seen = sorted(i for idx, _ in teacher.seen for i in idx)
    assert seen == list(range(8))
    for idx, cats in teacher.seen:
        assert cats == [100 + i for i in idx]
    # Zeroed sparse embeddings make every prompt of one kind alike: the hook really feeds the decoder.
    plain = SamTeacher(sam).predict(emb, points_xy=POINTS, boxes_xyxy=BOXES)
    assert not np.allclose(out.iou_scores, plain.iou_scores)


def test_no_prompts(sam, image):
    teacher = SamTeacher(sam)
    out = teacher.predict(teacher.encode(image), points_xy=np.zeros((0, 2)))
    assert out.masks.shape == (0, 200, 300) and out.iou_scores.shape == (0,)
    assert out.low_res_logits.shape == (0, 64, 64)
    assert teacher.decoder_calls == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"points_xy": np.array([[1.0, np.nan]])}, "all finite"),
        ({"points_xy": np.array([[np.nan, np.nan]])}, "point, a box or a mask"),
        ({"points_xy": np.zeros((2, 3))}, "bad SAM prompts"),
        ({"points_xy": np.zeros((2, 2)), "boxes_xyxy": np.zeros((3, 4))}, "bad SAM prompts"),
        ({"points_xy": np.zeros((1, 2)), "mask_logits": np.zeros((1, 256, 256))}, "bad SAM prompts"),
        ({"points_xy": np.zeros((2, 2)), "prompt_data": {"ids": [1]}}, "prompt_data"),
    ],
)
def test_bad_prompts_raise_input_error(sam, image, kwargs, match):
    teacher = SamTeacher(sam)
    with pytest.raises(InputError, match=match):
        teacher.predict(teacher.encode(image), **kwargs)


@pytest.mark.parametrize("img", [np.zeros((10, 10), np.uint8), np.zeros((10, 10, 3), np.float32)])
def test_bad_image_raises_input_error(sam, img):
    with pytest.raises(InputError):
        SamTeacher(sam).encode(img)
