"""The teacher's rules on one image: prompt boxes in SAM's convention (stage 1 → stage 2 agrees with the
official ``SamPredictor`` run by hand), crowd regions, one object one annotation, ``--no-refine``, and a
teacher per role."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from omnilabel.data.images import read_image_rgb
from omnilabel.data.weak import split_coco
from omnilabel.instances import Instances
from omnilabel.models.sam_loader import load_sam
from omnilabel.ops.masks import rle_to_masks
from omnilabel.teachers.loading import TeacherSpec, load_teachers, resolve_paths
from omnilabel.teachers.pipeline import PipelineConfig, PseudomaskPipeline, Teachers
from omnilabel.teachers.sam import SamTeacher

EXAMPLE = Path(__file__).resolve().parents[2] / "examples"
CATEGORIES = {1: "circle", 2: "square", 3: "triangle", 4: "ring"}


class FixedDetector:
    """A detector that returns the same boxes for every image, and counts its calls."""

    def __init__(self, boxes_xyxy, scores, category_ids) -> None:
        self.boxes, self.scores, self.ids = (np.asarray(boxes_xyxy, dtype=float), np.asarray(scores, dtype=float),
                                             np.asarray(category_ids))
        self.forward_calls = 0

    def detect(self, image_rgb, class_names, *, category_ids, box_threshold=None):
        self.forward_calls += 1
        h, w = image_rgb.shape[:2]
        return Instances((h, w), boxes_xyxy=self.boxes, scores=self.scores, category_ids=self.ids)


def _pseudo(result) -> dict[int, dict]:
    return {a["omnilabel"]["weak_id"]: a for a in result.annotations if a["omnilabel"]["source"] == "pseudo"}


def test_two_stages_agree_with_sam_predictor_run_by_hand(tiny_sam_path, shapes_coco):
    """Stage 1 → B_sam (segment-anything's own ``batched_mask_to_box``) → stage 2, against SamPredictor."""
    from segment_anything import SamPredictor
    from segment_anything.utils.amg import batched_mask_to_box

    sam = load_sam(tiny_sam_path)
    pipe = PseudomaskPipeline(Teachers(sam=SamTeacher(sam)), CATEGORIES, config=PipelineConfig(weak="points"))
    predictor = SamPredictor(sam)
    data = split_coco(json.loads(shapes_coco.read_text()), fully=0.0, weak="points", seed=0)
    by_image: dict[int, list] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    agree = total = 0
    for im in data["images"][:6]:
        image = read_image_rgb(shapes_coco.parent / "images" / im["file_name"])
        made = _pseudo(pipe.label_image(image, by_image.get(im["id"], [])))
        predictor.set_image(image)
        for ann in by_image.get(im["id"], []):
            point = np.array([ann["point"]])
            masks, scores, _ = predictor.predict(point_coords=point, point_labels=np.array([1]), multimask_output=True)
            stage1 = masks[int(np.argmax(scores))]
            if stage1.any():
                box = batched_mask_to_box(torch.as_tensor(stage1[None]))[0].numpy().astype(float)
            else:  # the pipeline's documented fallback for an empty stage-1 mask
                box = np.array([point[0, 0] - 1, point[0, 1] - 1, point[0, 0] + 1, point[0, 1] + 1])
            stage2 = predictor.predict(point_coords=point, point_labels=np.array([1]), box=box,
                                       multimask_output=False)[0][0]
            total += 1
            ours = made.get(ann["id"])
            if ours is None:  # an empty mask is dropped
                agree += not stage2.any()
                continue
            x, y, w, h = ours["omnilabel"]["prompt"]["bbox"]
            assert [x, y, x + w, y + h] == pytest.approx(box.tolist(), abs=0.011)  # the very box SAM's own way gives
            mask = rle_to_masks([ours["segmentation"]], *stage2.shape)[0]
            union = (mask | stage2).sum()
            agree += union == 0 or (mask & stage2).sum() / union >= 0.9
    assert total >= 10 and agree / total >= 0.95


def test_crowd_annotations_stay_crowd_regions(tiny_sam_path):
    sam = SamTeacher(load_sam(tiny_sam_path))
    image = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    boxes = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "iscrowd": 1},
             {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 50, 30, 30]}]
    res = PseudomaskPipeline(Teachers(sam=sam), CATEGORIES, config=PipelineConfig(weak="boxes")).label_image(
        image, boxes)
    assert {k: a["iscrowd"] for k, a in _pseudo(res).items()} == {1: 1, 2: 0}
    # A detection covering both points: the ordinary point takes it, the crowd point keeps its own box.
    det = FixedDetector([[5.0, 5.0, 90.0, 90.0]], [0.9], [1])
    points = [{"id": 3, "image_id": 1, "category_id": 1, "point": [30.5, 30.5], "iscrowd": 1},
              {"id": 4, "image_id": 1, "category_id": 1, "point": [60.5, 60.5]}]
    res = PseudomaskPipeline(Teachers(sam=sam, detector=det), CATEGORIES,
                             config=PipelineConfig(weak="points")).label_image(image, points)
    made = _pseudo(res)
    assert made[3]["omnilabel"]["prompt_box"] == "sam" and made[3]["iscrowd"] == 1
    assert made[4]["omnilabel"]["prompt_box"] == "gdino" and made[4]["iscrowd"] == 0


def test_crowd_pseudomasks_are_not_trained_on(tiny_sam_path, tmp_path):
    """pycocotools and the student see the crowd pseudomask as a crowd region."""
    from pycocotools.coco import COCO

    from omnilabel.students.data import training_samples

    sam = SamTeacher(load_sam(tiny_sam_path))
    image = np.random.default_rng(1).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 60, 60], "iscrowd": 1},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [40, 40, 50, 50]}]
    res = PseudomaskPipeline(Teachers(sam=sam), CATEGORIES, config=PipelineConfig(weak="boxes")).label_image(
        image, anns)
    out = {"images": [{"id": 1, "file_name": "x.png", "height": 96, "width": 96}],
           "categories": [{"id": c, "name": n} for c, n in CATEGORIES.items()],
           "annotations": [{"id": i + 1, "image_id": 1, **a} for i, a in enumerate(res.annotations)]}
    (tmp_path / "p.json").write_text(json.dumps(out))
    coco = COCO(str(tmp_path / "p.json"))
    assert [a["iscrowd"] for a in coco.dataset["annotations"]] == [1, 0]
    _, counts = training_samples(out, tmp_path, category_ids=list(CATEGORIES))
    assert counts["crowd"] == 1 and counts["pseudo"] == 1


@pytest.fixture(scope="module")
def example_teacher() -> Teachers:
    """The shipped teacher (a trained small SAM): its masks follow the objects, as overlap rules need."""
    spec = TeacherSpec(teacher=str(EXAMPLE / "teacher" / "shapes-sam.pt"), detector="none")
    return load_teachers(spec, resolve_paths(spec, load_detector=False))


def _scene() -> tuple[np.ndarray, list[dict]]:
    gt = json.loads((EXAMPLE / "shapes" / "gt.json").read_text())
    image_id = 11
    anns = [a for a in gt["annotations"] if a["image_id"] == image_id]
    im = next(i for i in gt["images"] if i["id"] == image_id)
    return read_image_rgb(EXAMPLE / "shapes" / "images" / im["file_name"]), anns


def _xyxy(ann: dict) -> list[float]:
    x, y, w, h = ann["bbox"]
    return [x, y, x + w, y + h]


def test_a_tag_detection_of_an_annotated_object_is_dropped(example_teacher):
    image, gt = _scene()
    a, b = gt[0], next(g for g in gt[1:] if g["category_id"] != gt[0]["category_id"])
    cls = a["category_id"]
    # The detector finds a's object twice-over (as class cls, and as another class) and b's as class cls.
    det = FixedDetector([_xyxy(a), _xyxy(a), _xyxy(b)], [0.9, 0.8, 0.7], [cls, cls % 4 + 1, cls])
    teachers = Teachers(sam=example_teacher.sam, detector=det, model_ids={"sam": "example"})
    pipe = PseudomaskPipeline(teachers, CATEGORIES, config=PipelineConfig(weak="auto"))
    tags = [{"id": 90, "image_id": 11, "category_id": c} for c in sorted({cls, cls % 4 + 1})]
    for annotated in ({**a, "segmentation": None, "bbox": a["bbox"]},  # a's box
                      {k: v for k, v in a.items() if k != "bbox"}):  # a's GT mask
        res = pipe.label_image(image, [annotated, *tags])
        dets = [x for x in res.annotations if x["omnilabel"]["weak"] == "tags"]
        assert res.counts["duplicate"] == 1
        # kept: the other class on a's object, and b's object; dropped: a's object again as its own class
        assert sorted((d["category_id"], tuple(d["omnilabel"]["prompt"]["bbox"])) for d in dets) == sorted(
            [(cls % 4 + 1, tuple(round(v, 2) for v in a["bbox"])), (cls, tuple(round(v, 2) for v in b["bbox"]))])


def test_no_refine_keeps_the_stage_one_masks(tiny_sam_path):
    sam = SamTeacher(load_sam(tiny_sam_path))
    det = FixedDetector([[5.0, 5.0, 90.0, 90.0]], [0.9], [1])
    image = np.random.default_rng(2).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    points = [{"id": 1, "image_id": 1, "category_id": 1, "point": [30.5, 30.5]},
              {"id": 2, "image_id": 1, "category_id": 2, "point": [70.5, 20.5]}]
    res = PseudomaskPipeline(Teachers(sam=sam, detector=det), CATEGORIES,
                             config=PipelineConfig(weak="points", refine=False)).label_image(image, points)
    assert det.forward_calls == 0
    stage1 = sam.predict(sam.encode(image), points_xy=np.array([p["point"] for p in points]))
    made = _pseudo(res)
    for i, p in enumerate(points):
        if p["id"] not in made:
            assert not stage1.masks[i].any()
            continue
        a = made[p["id"]]
        assert a["omnilabel"]["prompt"] == {"point": p["point"]} and "prompt_box" not in a["omnilabel"]
        assert np.array_equal(rle_to_masks([a["segmentation"]], 96, 96)[0], stage1.masks[i])


def test_each_role_decodes_with_its_own_teacher_from_one_encoding(tiny_sam_path):
    base = load_sam(tiny_sam_path)
    encoder, box, point, refine = (SamTeacher(base) for _ in range(4))
    teachers = Teachers(sam=encoder, box_sam=box, point_sam=point, refine_sam=refine)
    image = np.random.default_rng(3).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "point": [30.5, 30.5]},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 50, 30, 30]}]
    PseudomaskPipeline(teachers, CATEGORIES, config=PipelineConfig(weak="auto")).label_image(image, anns)
    assert (encoder.encoder_calls, encoder.decoder_calls) == (1, 0)
    assert (box.encoder_calls, point.encoder_calls, refine.encoder_calls) == (0, 0, 0)
    assert box.decoder_calls == point.decoder_calls == refine.decoder_calls == 1
