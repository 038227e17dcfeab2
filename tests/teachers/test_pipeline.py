"""The teacher pipeline on one image at a time: settings, encoder passes, GT passthrough, refinement."""

from __future__ import annotations

import json

import numpy as np
import pytest

from omnilabel.data.coco import annotations_by_image, category_names
from omnilabel.data.images import read_image_rgb
from omnilabel.data.weak import split_coco
from omnilabel.models.sam_loader import load_sam
from omnilabel.teachers.gdino import GDinoTeacher
from omnilabel.teachers.pipeline import PipelineConfig, PseudomaskPipeline, Teachers
from omnilabel.teachers.sam import SamTeacher


@pytest.fixture(scope="module")
def models(tiny_sam_path, tiny_gdino_dir):
    return SamTeacher(load_sam(tiny_sam_path)), GDinoTeacher(tiny_gdino_dir)


@pytest.fixture(scope="module")
def gt(shapes_coco):
    return json.loads(shapes_coco.read_text())


def _weak(gt, weak, fully=0.25):
    return split_coco(gt, fully=fully, weak=weak, seed=0)


def _run(models, data, images_dir, mode, *, detector=True):
    sam, gdino = models
    teachers = Teachers(sam=sam, detector=gdino if detector else None, model_ids={"sam": "tiny"})
    pipe = PseudomaskPipeline(teachers, category_names(data), config=PipelineConfig(weak=mode))
    sam.encoder_calls = 0
    gdino.forward_calls = 0
    by_image = annotations_by_image(data)
    results = {}
    for im in data["images"]:
        image = read_image_rgb(images_dir / im["file_name"])
        results[im["id"]] = pipe.label_image(image, by_image[im["id"]])
    return results


@pytest.mark.parametrize(("mode", "split"), [("points", "points"), ("boxes", "boxes"), ("tags", "tags"),
                                             ("none", "tags"), ("auto", "mixed")])
def test_one_encoder_pass_per_image_and_gt_untouched(models, gt, shapes_coco, mode, split):
    data = _weak(gt, split)
    results = _run(models, data, shapes_coco.parent / "images", mode)
    sam, gdino = models
    full_images = set(data["omnilabel_split"]["full_image_ids"])
    encoded = [i for i, r in results.items() if any(a["omnilabel"]["source"] == "pseudo" for a in r.annotations)]
    # every image that got a pseudomask was encoded exactly once; fully annotated images never
    assert sam.encoder_calls == len(encoded) <= len(data["images"]) - len(full_images)
    assert not full_images & set(encoded)
    # GDino: at most one forward pass per image (4 classes fit one prompt); none for boxes
    assert gdino.forward_calls <= len(data["images"]) - len(full_images)
    if mode == "boxes":
        assert gdino.forward_calls == 0
    by_id = {a["id"]: a for a in data["annotations"]}
    for image_id, res in results.items():
        gts = [a for a in res.annotations if a["omnilabel"]["source"] == "gt"]
        for a in gts:
            src = by_id[a["omnilabel"]["weak_id"]]
            assert a["segmentation"] == src["segmentation"] and a["category_id"] == src["category_id"]
        if image_id in full_images:
            assert len(gts) == len(res.annotations) == sum(1 for a in data["annotations"]
                                                           if a["image_id"] == image_id)


@pytest.mark.parametrize("mode", ["points", "boxes"])
def test_one_pseudomask_per_weak_annotation(models, gt, shapes_coco, mode):
    data = _weak(gt, mode)
    results = _run(models, data, shapes_coco.parent / "images", mode)
    weak_ids = [a["id"] for a in data["annotations"] if "segmentation" not in a]
    made = [a["omnilabel"]["weak_id"] for r in results.values() for a in r.annotations
            if a["omnilabel"]["source"] == "pseudo"]
    empty = sum(r.counts["empty"] for r in results.values())
    assert len(made) == len(set(made))
    assert set(made) <= set(weak_ids)
    assert len(made) + empty == len(weak_ids)
    assert len(made) >= 0.8 * len(weak_ids)
    for r in results.values():
        for a in r.annotations:
            if a["omnilabel"]["source"] == "pseudo":
                assert a["omnilabel"]["weak"] == mode and 0.0 <= a["score"] <= 1.0
                if mode == "points":
                    assert a["omnilabel"]["prompt_box"] in ("gdino", "sam")


def test_points_without_detector_use_sam_box(models, gt, shapes_coco):
    data = _weak(gt, "points")
    results = _run(models, data, shapes_coco.parent / "images", "points", detector=False)
    assert models[1].forward_calls == 0
    boxes = [a["omnilabel"]["prompt_box"] for r in results.values() for a in r.annotations
             if a["omnilabel"]["source"] == "pseudo"]
    assert boxes and set(boxes) == {"sam"}


def test_tags_class_comes_from_the_image_tags(models, gt, shapes_coco):
    data = _weak(gt, "tags")
    results = _run(models, data, shapes_coco.parent / "images", "tags")
    tags = {}
    for a in data["annotations"]:
        tags.setdefault(a["image_id"], set()).add(a["category_id"])
    n = 0
    for image_id, res in results.items():
        for a in res.annotations:
            if a["omnilabel"]["source"] == "pseudo":
                n += 1
                assert a["category_id"] in tags[image_id]
                assert a["omnilabel"]["weak"] == "tags" and a["omnilabel"]["weak_id"] is None
                assert a["score"] <= a["omnilabel"]["detector_score"] + 1e-9
                assert a["omnilabel"]["detector_score"] >= 0.3
    assert n > 0


def test_refinement_takes_a_matching_detection(models):
    """A GDino box that contains the point, has the class and overlaps B_sam replaces it (Algorithm 1)."""
    from omnilabel.instances import Instances

    sam, _ = models

    class FixedDetector:
        forward_calls = 0

        def detect(self, image_rgb, class_names, *, category_ids, box_threshold=None):
            self.forward_calls += 1
            return Instances((96, 96), boxes_xyxy=np.array([[10.0, 10.0, 60.0, 60.0], [0.0, 0.0, 5.0, 5.0]]),
                             scores=np.array([0.9, 0.05]), category_ids=np.array([1, 1]))

    det = FixedDetector()
    pipe = PseudomaskPipeline(Teachers(sam=sam, detector=det), {1: "circle", 2: "square"},
                              config=PipelineConfig(weak="points"))
    image = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "point": [30.5, 30.5]},
            {"id": 2, "image_id": 1, "category_id": 2, "point": [80.5, 80.5]}]
    res = pipe.label_image(image, anns)
    by_weak = {a["omnilabel"]["weak_id"]: a for a in res.annotations}
    assert det.forward_calls == 1
    assert by_weak[1]["omnilabel"]["prompt_box"] == "gdino"
    assert by_weak[2]["omnilabel"]["prompt_box"] == "sam"
