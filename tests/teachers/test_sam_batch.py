"""Batched SAM encoding: several images per encoder pass give what one-at-a-time encoding gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnilabel.errors import InputError
from omnilabel.models.sam_loader import load_sam
from omnilabel.teachers.sam import SamTeacher

#: Three sizes: landscape, portrait and a small square, so resizing and padding differ per image.
SIZES_HW = [(200, 300), (300, 120), (64, 64)]


@pytest.fixture(scope="module")
def sam(tiny_sam_path):
    return load_sam(tiny_sam_path)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES_HW]


def test_batch_of_different_sizes_equals_one_at_a_time(sam, images):
    single = SamTeacher(sam)
    alone = [single.encode(im) for im in images]
    assert (single.encoder_calls, single.images_encoded) == (3, 3)

    batched = SamTeacher(sam)
    together = batched.encode_many(images)
    assert (batched.encoder_calls, batched.images_encoded) == (1, 3)

    points = np.array([[30.0, 40.0], [np.nan, np.nan]])
    for a, b, (h, w) in zip(alone, together, SIZES_HW, strict=True):
        assert b.features.shape == a.features.shape == (1, 256, 16, 16)
        assert b.original_size == a.original_size == (h, w)
        assert b.input_size == a.input_size
        assert torch.allclose(a.features, b.features, atol=1e-5, rtol=0)
        boxes = np.array([[np.nan] * 4, [5.0, 5.0, w * 0.6, h * 0.7]])
        out_a = single.predict(a, points_xy=points, boxes_xyxy=boxes)
        out_b = single.predict(b, points_xy=points, boxes_xyxy=boxes)
        np.testing.assert_array_equal(out_a.masks, out_b.masks)
        np.testing.assert_allclose(out_a.iou_scores, out_b.iou_scores, atol=1e-5)
    # the embeddings really differ between images: the batch did not mix them up
    assert not torch.allclose(together[0].features, together[2].features, atol=1e-3)


def test_encode_is_encode_many_of_one(sam, images):
    teacher = SamTeacher(sam)
    (many,) = teacher.encode_many(images[:1])
    one = teacher.encode(images[0])
    assert torch.equal(one.features, many.features)
    assert (one.original_size, one.input_size) == (many.original_size, many.input_size)
    assert teacher.encode_many([]) == [] and teacher.encoder_calls == 2


def test_a_bad_image_in_a_batch_names_its_position_and_encodes_nothing(sam, images):
    teacher = SamTeacher(sam)
    with pytest.raises(InputError, match=r"image 1 of 2"):
        teacher.encode_many([images[0], images[1].astype(np.float32)])
    assert teacher.encoder_calls == 0


# --- the pipeline with batched encoder passes -------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed(shapes_coco):
    import json

    from omnilabel.data.coco import annotations_by_image
    from omnilabel.data.images import read_image_rgb
    from omnilabel.data.weak import split_coco

    data = split_coco(json.loads(shapes_coco.read_text()), fully=0.25, weak="mixed", seed=0)
    by_image = annotations_by_image(data)
    items = [(read_image_rgb(shapes_coco.parent / "images" / im["file_name"]), by_image[im["id"]], None)
             for im in data["images"]]
    return data, items


@pytest.fixture(scope="module")
def pipeline(tiny_sam_path, tiny_gdino_dir, mixed):
    from omnilabel.data.coco import category_names
    from omnilabel.teachers.gdino import GDinoTeacher
    from omnilabel.teachers.pipeline import PipelineConfig, PseudomaskPipeline, Teachers

    teachers = Teachers(sam=SamTeacher(load_sam(tiny_sam_path)), detector=GDinoTeacher(tiny_gdino_dir),
                        model_ids={"sam": "tiny"})
    return PseudomaskPipeline(teachers, category_names(mixed[0]), config=PipelineConfig(weak="auto"))


def _labelled(pipeline, items, encoder_batch):
    """Results, encoder passes and images encoded of one ``label_images`` call."""
    sam = pipeline.teachers.sam
    passes, images = sam.encoder_calls, sam.images_encoded
    out = pipeline.label_images(items, encoder_batch=encoder_batch)
    return out, sam.encoder_calls - passes, sam.images_encoded - images


def test_pipeline_output_does_not_depend_on_encoder_batch(pipeline, mixed):
    data, items = mixed
    one, passes_one, encoded = _labelled(pipeline, items, 1)
    three, passes_three, encoded_three = _labelled(pipeline, items, 3)
    full_ids = set(data["omnilabel_split"]["full_image_ids"])
    assert full_ids and 3 < encoded <= len(items) - len(full_ids)  # fully annotated images need no SAM
    assert passes_one == encoded == encoded_three and passes_three == -(-encoded // 3)
    assert [r.annotations for r in three] == [r.annotations for r in one]
    assert [r.counts for r in three] == [r.counts for r in one]
    # label_image is label_images of one item
    assert [pipeline.label_image(*item).annotations for item in items[:4]] == [r.annotations for r in one[:4]]
    for r in three:
        if "encode" in r.seconds:
            assert r.seconds["encode"] > 0


def test_out_of_memory_in_a_batched_encode_falls_back_to_one_image_at_a_time(pipeline, mixed, monkeypatch):
    _, items = mixed
    expected, _, _ = _labelled(pipeline, items, 1)
    real = SamTeacher.encode_many
    sizes = []

    def small_memory(self, images_rgb):
        sizes.append(len(images_rgb))
        if len(images_rgb) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, images_rgb)

    monkeypatch.setattr(SamTeacher, "encode_many", small_memory)
    got, passes, _ = _labelled(pipeline, items, 4)
    assert [r.annotations for r in got] == [r.annotations for r in expected]
    assert max(sizes) == 4 and passes == sum(1 for s in sizes if s == 1)

    # an image that does not fit even alone fails, and only that one
    victim = next(i for i, r in enumerate(expected) if any(a["omnilabel"]["source"] == "pseudo"
                                                            for a in r.annotations))
    victim_image = items[victim][0]

    def victim_too_big(self, images_rgb):
        if len(images_rgb) > 1 or images_rgb[0] is victim_image:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, images_rgb)

    monkeypatch.setattr(SamTeacher, "encode_many", victim_too_big)
    got, _, _ = _labelled(pipeline, items, 4)
    assert isinstance(got[victim], MemoryError) and "simulated" in str(got[victim])
    assert [r.annotations for i, r in enumerate(got) if i != victim] == \
        [r.annotations for i, r in enumerate(expected) if i != victim]
    with pytest.raises(MemoryError):
        pipeline.label_image(*items[victim])


def test_encoder_batch_below_one_is_refused(pipeline, mixed):
    with pytest.raises(InputError, match="encoder_batch must be >= 1"):
        pipeline.label_images(mixed[1][:1], encoder_batch=0)
