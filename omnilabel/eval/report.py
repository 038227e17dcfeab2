"""``omnilabel evaluate``: score a predictions file against a ground-truth file, all numbers in one dict.

Predictions are a COCO results list (``predict``'s output: AP over every GT image, an image without
predictions counting as missed) or a complete COCO file such as a pseudomask output (AP over the images it
lists, since a pseudomask file may leave some out). For an omnilabel pseudomask file whose annotations carry
``omnilabel.weak_id``, the mean mask IoU and boundary IoU against the GT masks those ids name, per weak type.
On request, the class-agnostic UOIS metrics (``omnilabel.eval.uois``) over the same images as AP.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omnilabel.data.coco import load_coco
from omnilabel.errors import InputError
from omnilabel.eval.coco_eval import evaluate_segm
from omnilabel.eval.miou import has_weak_ids, teacher_miou
from omnilabel.eval.uois import evaluate_uois
from omnilabel.io import read_json, write_json_atomic


def evaluate_files(predictions: str | Path, gt: str | Path, *, json_out: str | Path | None = None,
                   uois: bool = False) -> dict[str, Any]:
    """COCO segm AP of ``predictions`` against ``gt``; teacher mIoU per weak type for pseudomasks.

    Args:
        predictions: a COCO results list, or a complete COCO file.
        gt: ground-truth COCO with instance masks.
        json_out: also write the returned dict, less ``gt_images``, there as JSON (atomically).
        uois: also compute the class-agnostic UOIS metrics over the images AP is over.

    Returns:
        ``segm`` (AP, AP50, AP75, APs, APm, APl), ``class_agnostic`` (True for a file with class-agnostic
        pseudomasks, ``pseudomask --prompter`` without ``--clip``: its AP is then over one category, every GT and
        predicted class counted as it), ``images`` (how many images AP is over), ``gt_images``;
        for pseudomask files ``teacher``: weak type → ``count``, ``miou``, ``boundary_iou``; with ``uois``,
        ``uois``: ``overlap`` and ``boundary`` ``{"P", "R", "F"}``, ``f75`` (floats in [0, 1], per-image
        means), ``images``, ``gt_objects``, ``pred_objects`` (see ``omnilabel.eval.uois.evaluate_uois``).

    Raises:
        InputError: a file is unreadable or not COCO, or the predictions do not fit the GT.
    """
    predictions = Path(predictions)
    gt_data = load_coco(gt, allow_outside_images=True)
    pred = read_json(predictions)
    if isinstance(pred, dict):
        pred = load_coco(predictions, allow_outside_images=True)
    elif not isinstance(pred, list):
        raise InputError(f"{predictions}: expected a COCO results list or a COCO file, got {type(pred).__name__}")
    image_ids = [int(im["id"]) for im in pred["images"]] if isinstance(pred, dict) else None
    agnostic = _agnostic_category(pred)
    ap_pred, ap_gt = (pred, gt_data) if agnostic is None else _one_category(pred, gt_data, agnostic)
    result: dict[str, Any] = {"segm": evaluate_segm(ap_pred, ap_gt, image_ids=image_ids),
                              "class_agnostic": agnostic is not None,
                              "images": len(image_ids) if image_ids is not None else len(gt_data["images"]),
                              "gt_images": len(gt_data["images"])}
    if isinstance(pred, dict) and has_weak_ids(pred):
        result["teacher"] = teacher_miou(pred, gt_data)
    if uois:
        result["uois"] = evaluate_uois(pred, gt_data, image_ids=image_ids)
    if json_out is not None:
        write_json_atomic({k: v for k, v in result.items() if k != "gt_images"}, json_out)
    return result


def _agnostic_category(pred: Any) -> int | None:
    """The class-agnostic category a pseudomask file declares (``info.omnilabel.prompter.category_id``), or None."""
    if not isinstance(pred, dict):
        return None
    prompter = ((pred.get("info") or {}).get("omnilabel") or {}).get("prompter") or {}
    category = prompter.get("category_id") if isinstance(prompter, dict) else None
    return None if category is None else int(category)


def _one_category(pred: dict[str, Any], gt: dict[str, Any], category_id: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Copies of ``pred`` and ``gt`` whose every annotation has ``category_id``, the one category of both."""
    category = next((c for c in pred["categories"] if int(c["id"]) == category_id),
                    {"id": category_id, "name": "object"})

    def relabel(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "categories": [category],
                "annotations": [{**a, "category_id": category_id} for a in data["annotations"]]}

    return relabel(pred), relabel(gt)
