from __future__ import annotations

import numpy as np
import pytest
import torch

from omnilabel.errors import InputError
from omnilabel.models.sam_loader import load_sam
from omnilabel.models.tiny_clip import build_tiny_clip
from omnilabel.teachers.class_aware import ClassAwarePrompt, ClassAwareSamTeacher
from omnilabel.teachers.clip_text import ClipTextEncoder
from omnilabel.teachers.sam import SamTeacher

CATEGORIES = {1: "circle", 2: "square", 3: "traffic_light"}
NAN2, NAN4 = [np.nan] * 2, [np.nan] * 4
# points only, boxes only, point + box, interleaved, on a 120 x 160 image
POINTS = np.array([[30, 40], NAN2, [100, 60], [20, 100], NAN2, [150, 10]], float)
BOXES = np.array([NAN4, [10, 10, 80, 70], [60, 20, 150, 110], NAN4, [0, 0, 159, 119], [120, 0, 159, 40]], float)
CATS = np.array([1, 2, 3, 1, 3, 2])
CLICKS = np.array([[30, 40], [100, 60], [20, 100], [150, 10], [5, 5], [80, 80]], float)


@pytest.fixture(scope="module")
def sam(tiny_sam_path):
    return load_sam(tiny_sam_path)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    model_name, path = build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny_clip.pt", seed=0)
    return ClipTextEncoder.from_pretrained(path, model_name=model_name)


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(3).integers(0, 256, (120, 160, 3), dtype=np.uint8)


def _class_aware(sam, clip, *, seed=0):
    torch.manual_seed(seed)
    module = ClassAwarePrompt(sam.prompt_encoder, text_dim=clip.width)
    return ClassAwareSamTeacher(sam, module, clip, CATEGORIES)


def test_untrained_module_leaves_sam_bit_identical(sam, clip, image):
    plain = SamTeacher(sam)
    aware = _class_aware(sam, clip)
    emb = plain.encode(image)
    ref = plain.predict(emb, points_xy=POINTS, boxes_xyxy=BOXES)
    out = aware.predict(emb, points_xy=POINTS, boxes_xyxy=BOXES, prompt_data={"category_ids": CATS})
    assert np.array_equal(out.masks, ref.masks)
    assert np.array_equal(out.iou_scores, ref.iou_scores)
    assert np.array_equal(out.low_res_logits, ref.low_res_logits)
    # with a mask prior as well
    ref2 = plain.predict(emb, points_xy=POINTS, boxes_xyxy=BOXES, mask_logits=ref.low_res_logits)
    out2 = aware.predict(emb, points_xy=POINTS, boxes_xyxy=BOXES, mask_logits=ref.low_res_logits,
                         prompt_data={"category_ids": CATS})
    assert np.array_equal(out2.low_res_logits, ref2.low_res_logits)
    assert ref.masks.any() and not ref.masks.all()


def test_projection_only_when_widths_differ(sam, clip):
    module = ClassAwarePrompt(sam.prompt_encoder, text_dim=clip.width)
    assert clip.width == 32 and isinstance(module.text_proj, torch.nn.Linear)
    assert module.text_proj.in_features == 32 and module.text_proj.out_features == 256
    same = ClassAwarePrompt(sam.prompt_encoder, text_dim=256)
    assert isinstance(same.text_proj, torch.nn.Identity)
    assert not same.zero.weight.any() and not same.zero.bias.any()
    # F_train is a copy, not SAM's own prompt encoder
    assert module.trainable is not sam.prompt_encoder
    assert all(torch.equal(a, b) for a, b in zip(module.trainable.state_dict().values(),
                                                 sam.prompt_encoder.state_dict().values(), strict=True))


def test_trained_module_makes_masks_depend_on_class(sam, clip, image):
    aware = _class_aware(sam, clip)
    with torch.no_grad():
        aware.class_prompt.zero.weight.normal_(0, 0.5)
    emb = aware.encode(image)
    boxes = np.array([[10, 10, 80, 70]] * 3, float)
    out = aware.predict(emb, boxes_xyxy=boxes, prompt_data={"category_ids": np.array([1, 2, 3])})
    plain = SamTeacher(sam).predict(emb, boxes_xyxy=boxes[:1])
    assert np.abs(out.low_res_logits[0] - plain.low_res_logits[0]).max() > 0.05
    assert np.abs(out.low_res_logits[0] - out.low_res_logits[1]).max() > 0.05
    # the same class gives the same mask, whatever else is in the batch
    again = aware.predict(emb, boxes_xyxy=boxes[:1], prompt_data={"category_ids": np.array([1])})
    np.testing.assert_allclose(again.low_res_logits[0], out.low_res_logits[0], atol=1e-3)


def test_text_is_embedded_once_per_class_name(sam, clip, image):
    aware = _class_aware(sam, clip)
    emb = aware.encode(image)
    before = clip.forward_calls
    aware.predict(emb, points_xy=CLICKS, prompt_data={"category_ids": CATS})
    aware.predict(emb, points_xy=CLICKS, prompt_data={"category_ids": CATS[::-1].copy()})
    assert clip.forward_calls - before <= 1
    emb_rows = aware.class_embeddings([3, 1, 3])
    assert emb_rows.shape == (3, 32) and torch.equal(emb_rows[0], emb_rows[2])


def test_missing_or_unknown_classes_are_input_errors(sam, clip, image):
    aware = _class_aware(sam, clip)
    emb = aware.encode(image)
    with pytest.raises(InputError, match="category_ids"):
        aware.predict(emb, points_xy=CLICKS)
    with pytest.raises(InputError, match=r"\[9\]"):
        aware.predict(emb, points_xy=CLICKS, prompt_data={"category_ids": np.array([1, 2, 9, 1, 1, 1])})
    with pytest.raises(InputError, match="32 wide"):
        ClassAwareSamTeacher(sam, ClassAwarePrompt(sam.prompt_encoder, text_dim=64), clip, CATEGORIES)
