from __future__ import annotations

import copy
import json

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from omnilabel.errors import InputError
from omnilabel.eval.coco_eval import (
    METRIC_NAMES,
    count_unscorable,
    evaluate_segm,
    predictions_to_results,
)

H, W = 64, 64
# (image id, category id, y0, x0, height, width): small (< 32^2 px) and medium objects, none large.
BOXES = [
    (1, 1, 4, 4, 12, 10),
    (1, 2, 20, 30, 30, 28),
    (1, 1, 40, 4, 16, 16),
    (2, 2, 2, 2, 40, 36),
    (2, 1, 50, 44, 10, 14),
    (3, 2, 10, 10, 20, 9),
]


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _rect(y0: int, x0: int, h: int, w: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[y0:y0 + h, x0:x0 + w] = True
    return mask


def _polygon(y0: int, x0: int, h: int, w: int) -> list[list[float]]:
    return [[x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]]


def make_gt(seg_format: str = "rle") -> dict:
    anns = []
    for ann_id, (img, cat, y0, x0, h, w) in enumerate(BOXES, start=1):
        seg = _rle(_rect(y0, x0, h, w)) if seg_format == "rle" else _polygon(y0, x0, h, w)
        anns.append({"id": ann_id, "image_id": img, "category_id": cat, "segmentation": seg,
                     "area": float(h * w), "bbox": [x0, y0, w, h], "iscrowd": 0})
    return {"images": [{"id": i, "file_name": f"{i}.png", "height": H, "width": W} for i in (1, 2, 3, 4)],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
            "annotations": anns}


def gt_as_results(gt: dict) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": a["segmentation"],
             "score": 1.0} for a in gt["annotations"]]


def eroded_results(gt: dict, *, px: int) -> list[dict]:
    kernel = np.ones((2 * px + 1, 2 * px + 1), np.uint8)
    out = []
    for k, a in enumerate(gt["annotations"]):
        mask = _rect(*BOXES[k][2:]).astype(np.uint8)
        out.append({"image_id": a["image_id"], "category_id": a["category_id"],
                    "segmentation": _rle(cv2.erode(mask, kernel).astype(bool)), "score": 0.9 - 0.1 * k})
    return out


def as_coco_file(results: list[dict], gt: dict) -> dict:
    anns = [{"id": 100 + k, **r, "bbox": [0, 0, 1, 1], "area": 1.0, "iscrowd": 0,
             "omnilabel": {"source": "pseudo", "weak": "points", "weak_id": k + 1}}
            for k, r in enumerate(results)]
    return {"images": gt["images"], "categories": gt["categories"], "annotations": anns}


@pytest.mark.parametrize("seg_format", ["rle", "polygon"])
@pytest.mark.parametrize("form", ["results", "coco_file"])
def test_gt_as_prediction_scores_one(seg_format: str, form: str) -> None:
    gt = make_gt(seg_format)
    results = gt_as_results(gt)
    pred = results if form == "results" else as_coco_file(results, gt)
    metrics = evaluate_segm(pred, gt)
    assert set(metrics) == set(METRIC_NAMES)
    for name in ("AP", "AP50", "AP75", "APs", "APm"):
        assert metrics[name] == pytest.approx(1.0), name
    assert metrics["APl"] == -1.0  # no large object in the GT


def test_bbox_iou_type_gt_as_prediction() -> None:
    gt = make_gt()
    pred = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt["annotations"]]
    assert evaluate_segm(pred, gt, iou_type="bbox")["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("px", [2, 3])
def test_eroded_masks_score_lower(px: int) -> None:
    gt = make_gt()
    metrics = evaluate_segm(eroded_results(gt, px=px), gt)
    assert 0.0 <= metrics["AP"] < 1.0
    assert metrics["AP75"] <= metrics["AP50"]


def test_matches_pycocotools_run_on_files(tmp_path) -> None:
    gt = make_gt()
    results = eroded_results(gt, px=2)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(results))
    coco_gt = COCO(str(tmp_path / "gt.json"))
    evaluator = COCOeval(coco_gt, coco_gt.loadRes(str(tmp_path / "dt.json")), iouType="segm")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    metrics = evaluate_segm(results, gt)
    assert [metrics[n] for n in METRIC_NAMES] == pytest.approx(list(evaluator.stats[:6]))


def test_results_list_and_coco_file_agree() -> None:
    gt = make_gt()
    results = eroded_results(gt, px=2)
    from_list = evaluate_segm(results, gt)
    from_file = evaluate_segm(as_coco_file(results, gt), gt)
    assert from_list == from_file
    assert 0.0 < from_list["AP"] < 1.0


def test_coco_file_score_defaults_to_one() -> None:
    gt = make_gt()
    pred = as_coco_file(gt_as_results(gt), gt)
    for ann in pred["annotations"]:
        del ann["score"]
    assert all(r["score"] == 1.0 for r in predictions_to_results(pred))
    assert evaluate_segm(pred, gt)["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("pred", [[], {"images": [], "categories": [], "annotations": []}],
                         ids=["empty_list", "empty_file"])
def test_empty_predictions_score_zero(pred) -> None:
    metrics = evaluate_segm(pred, make_gt())
    for name in ("AP", "AP50", "AP75", "APs", "APm"):
        assert metrics[name] == 0.0, name
    assert metrics["APl"] == -1.0


def test_predictions_to_results_drops_recomputed_fields() -> None:
    gt = make_gt("polygon")
    pred = as_coco_file(gt_as_results(gt), gt)
    results = predictions_to_results(pred)
    assert len(results) == len(gt["annotations"])
    for r in results:
        assert set(r) == {"image_id", "category_id", "segmentation", "score"}
        assert isinstance(r["segmentation"]["counts"], str)
        assert r["segmentation"]["size"] == [H, W]
    # pycocotools recomputes area and bbox from the mask, not from the dropped fake values
    coco_gt = COCO()
    coco_gt.dataset = make_gt()
    coco_gt.createIndex()
    res = coco_gt.loadRes(results)
    assert [a["area"] for a in res.dataset["annotations"]] == [h * w for *_, h, w in BOXES]


def test_annotations_without_segmentation_are_skipped_and_counted() -> None:
    gt = make_gt()
    pred = gt_as_results(gt) + [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1.0},
                                {"image_id": 2, "category_id": 2, "score": 0.5}]
    assert count_unscorable(pred) == 2
    assert count_unscorable(pred, iou_type="bbox") == 1
    assert len(predictions_to_results(pred)) == len(gt["annotations"])
    assert evaluate_segm(pred, gt)["AP"] == pytest.approx(1.0)


def test_inputs_are_not_modified() -> None:
    gt = make_gt()
    pred = as_coco_file(eroded_results(gt, px=2), gt)
    gt_before, pred_before = copy.deepcopy(gt), copy.deepcopy(pred)
    evaluate_segm(pred, gt)
    assert gt == gt_before and pred == pred_before


def test_unknown_image_id_raises_naming_it() -> None:
    gt = make_gt()
    pred = gt_as_results(gt)
    pred[0] = {**pred[0], "image_id": 77}
    with pytest.raises(InputError, match="image id 77"):
        evaluate_segm(pred, gt)


def test_gt_without_segmentation_raises_naming_annotation() -> None:
    gt = make_gt()
    del gt["annotations"][2]["segmentation"]
    with pytest.raises(InputError) as info:
        evaluate_segm(gt_as_results(make_gt()), gt)
    assert "annotation id 3" in str(info.value) and "'segmentation'" in str(info.value)
    # box AP needs no masks: the same GT is fine there
    assert evaluate_segm(gt_as_results(make_gt()), gt, iou_type="bbox")["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"category_id": None}, "'category_id'"),
        ({"score": "high"}, "'score'"),
        ({"category_id": 9}, "category id 9"),
        ({"segmentation": {"size": [H, W + 1], "counts": _rle(np.ones((H, W + 1), bool))["counts"]}},
         "mask size"),
    ],
    ids=["no_category", "bad_score", "unknown_category", "wrong_size"],
)
def test_malformed_prediction_raises(change: dict, expected: str) -> None:
    gt = make_gt()
    pred = gt_as_results(gt)
    pred[1] = {**pred[1], **change}
    with pytest.raises(InputError, match=expected):
        evaluate_segm(pred, gt)


def test_polygon_result_without_image_size_raises() -> None:
    pred = [{"image_id": 1, "category_id": 1, "segmentation": _polygon(0, 0, 4, 4), "score": 1.0}]
    with pytest.raises(InputError, match="segmentation"):
        predictions_to_results(pred)
    assert predictions_to_results(pred, image_sizes={1: (H, W)})[0]["segmentation"]["size"] == [H, W]


def test_unknown_iou_type_raises() -> None:
    with pytest.raises(InputError, match="iou_type"):
        evaluate_segm([], make_gt(), iou_type="keypoints")  # type: ignore[arg-type]


def test_image_ids_restrict_ap_to_the_images_a_file_covers() -> None:
    gt = make_gt()
    on_1_2 = [r for r in gt_as_results(gt) if r["image_id"] in (1, 2)]
    assert evaluate_segm(on_1_2, gt)["AP"] < 0.9  # image 3's object is missed
    assert evaluate_segm(on_1_2, gt, image_ids=[1, 2])["AP"] == pytest.approx(1.0)
    with pytest.raises(InputError, match="image id 9: not in the ground truth"):
        evaluate_segm(on_1_2, gt, image_ids=[1, 9])


def test_evaluate_command_scores_a_coco_file_over_its_own_images(capsys, tmp_path) -> None:
    from cli_runner import run_in_process

    gt = make_gt()
    pred = as_coco_file([r for r in gt_as_results(gt) if r["image_id"] in (1, 2)], gt)
    pred["images"] = [im for im in gt["images"] if im["id"] in (1, 2)]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text(json.dumps(pred))
    code, out, err = run_in_process(capsys, "evaluate", tmp_path / "pred.json", "--gt", tmp_path / "gt.json",
                                    "--json", tmp_path / "m.json")
    assert code == 0, err
    assert "its 2 of the GT's 4 images" in " ".join(out.split())
    numbers = json.loads((tmp_path / "m.json").read_text())
    assert numbers["images"] == 2 and numbers["segm"]["AP"] == pytest.approx(1.0)
