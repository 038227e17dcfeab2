"""Student inference on decoded images: batched forward passes and Mask2Former's instance post-processing.

Post-processing follows Mask2Former's ``instance_inference``: class probabilities (softmax, "no object"
dropped) of every (query, class) pair are ranked and the ``top_k`` best kept — one query may give several
classes; each mask is the query's logits upsampled to the padded input, cropped to the image, resized to the
original size and thresholded at 0; the score is the class probability times the mean foreground
probability inside the mask. Empty masks and scores under ``score_thresh`` are dropped.

Batches: images are resized as the student was trained to be evaluated (``omnilabel.students.data``) and
padded bottom/right to their frame (a multiple of 32, or the ``image_size`` square). Only images with the
same frame share a forward pass: the network attends over the padding too (``transformers``' Mask2Former
does not mask it), so padding an image further to fit a larger neighbour would change its prediction. An
image's prediction is therefore the one it gets alone — Mask2Former's COCO test, one image per GPU — up to
float rounding, whatever else is in the call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from omnilabel.models.precision import autocast
from omnilabel.ops.masks import masks_to_rle
from omnilabel.students.data import eval_padded_hw, eval_resize, eval_size_hw, normalize


@dataclass(frozen=True)
class PredictConfig:
    """Inference settings.

    Attributes:
        score_thresh: predictions scoring lower are dropped (Mask2Former keeps the top 100 whatever the
            score, which COCO AP rewards; raise it to keep fewer).
        top_k: most predictions per image (Mask2Former: ``TEST.DETECTIONS_PER_IMAGE`` 100).
        batch_size: images per forward pass.
    """

    score_thresh: float = 0.0
    top_k: int = 100
    batch_size: int = 8


def postprocess(class_logits: torch.Tensor, mask_logits: torch.Tensor, *, padded_hw: tuple[int, int],
                inner_hw: tuple[int, int], out_hw: tuple[int, int], top_k: int = 100, score_thresh: float = 0.0,
                chunk: int = 25) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's instances from the model's outputs (see the module docstring).

    Args:
        class_logits: (Q, K + 1) float, last column "no object".
        mask_logits: (Q, Hp / 4, Wp / 4) float, at 1/4 of the padded input.
        padded_hw: ``(Hp, Wp)`` of the padded input the network saw.
        inner_hw: ``(h, w)`` of the resized image inside that frame (top-left).
        out_hw: ``(H, W)`` of the original image.
        top_k: most instances kept. score_thresh: lowest score kept.
        chunk: masks upsampled at a time (bounds memory for large images).

    Returns:
        ``(masks (N, H, W) bool, scores (N,) float32 in [0, 1], labels (N,) int64 in [0, K))``, by
        decreasing score.
    """
    num_queries, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
    probs = class_logits.float().softmax(-1)[:, :-1]
    scores, flat = probs.flatten().topk(min(top_k, num_queries * num_classes))
    queries, labels = flat // num_classes, flat % num_classes
    masks, mask_scores = [], []
    for lo in range(0, len(queries), chunk):
        logits = mask_logits[queries[lo:lo + chunk]].float()[None]
        logits = F.interpolate(logits, size=padded_hw, mode="bilinear", align_corners=False)
        logits = logits[:, :, :inner_hw[0], :inner_hw[1]]
        logits = F.interpolate(logits, size=out_hw, mode="bilinear", align_corners=False)[0]
        binary = logits > 0
        mask_scores.append((logits.sigmoid() * binary).flatten(1).sum(1) / binary.flatten(1).sum(1).clamp(min=1))
        masks.append(binary.cpu())
    if not masks:
        return np.zeros((0, *out_hw), dtype=bool), np.zeros(0, np.float32), np.zeros(0, np.int64)
    final = (scores * torch.cat(mask_scores)).cpu()
    all_masks = torch.cat(masks)
    keep = (final >= score_thresh) & all_masks.flatten(1).any(1)
    order = torch.argsort(final[keep], descending=True)
    return (all_masks[keep][order].numpy(), final[keep][order].numpy().astype(np.float32),
            labels.cpu()[keep][order].numpy().astype(np.int64))


@torch.no_grad()
def predict_images(model: torch.nn.Module, images: Sequence[np.ndarray], *, image_size: int,
                   min_size: int | None = None, max_size: int | None = None, config: PredictConfig = PredictConfig(),
                   device: torch.device | str = "cpu") -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Run the student over images, up to ``config.batch_size`` images of the same padded frame at a time.

    Args:
        model: a student in eval mode on ``device``.
        images: (H, W, 3) uint8 RGB each, any sizes.
        image_size, min_size, max_size: the student's evaluation size (``student.json``; see
            ``omnilabel.students.data.eval_size_hw``): with ``min_size``, the shorter side to ``min_size``
            and the longer at most ``max_size``, padded to multiples of 32; without, the longer side to
            ``image_size``, padded to that square.
        config: batch size, ``top_k``, ``score_thresh``.
        device: where the model is.

    Returns:
        Per image, in order, :func:`postprocess`'s ``(masks, scores, labels)``; each the same (up to float
        rounding) as when predicted alone.
    """
    device = torch.device(device)
    inner = [eval_size_hw(*img.shape[:2], image_size=image_size, min_size=min_size, max_size=max_size)
             for img in images]
    by_frame: dict[tuple[int, int], list[int]] = {}
    for i, hw in enumerate(inner):
        by_frame.setdefault(eval_padded_hw(hw, image_size=image_size, min_size=min_size), []).append(i)
    out: list[Any] = [None] * len(images)
    for frame, indices in by_frame.items():
        for lo in range(0, len(indices), config.batch_size):
            batch = indices[lo:lo + config.batch_size]
            pixels = torch.stack([eval_resize(normalize(images[i]), image_size=image_size, min_size=min_size,
                                              max_size=max_size)[0] for i in batch]).to(device)
            with autocast(device):
                outputs = model(pixel_values=pixels)
            for j, i in enumerate(batch):
                out[i] = postprocess(outputs.class_queries_logits[j], outputs.masks_queries_logits[j],
                                     padded_hw=frame, inner_hw=inner[i], out_hw=images[i].shape[:2],
                                     top_k=config.top_k, score_thresh=config.score_thresh)
    return out


def coco_results(image_id: int, masks: np.ndarray, scores: np.ndarray, labels: np.ndarray, *,
                 category_ids: Sequence[int]) -> list[dict[str, Any]]:
    """COCO results records of one image: ``image_id``, ``category_id``, ``segmentation`` (compressed RLE,
    ``counts`` a str), ``score``, ``bbox`` ``[x, y, w, h]``.

    Args:
        masks: (N, H, W) bool. scores: (N,) float. labels: (N,) int in [0, K).
        category_ids: label ``i`` → ``category_ids[i]``.
    """
    from pycocotools import mask as mask_utils

    rles = masks_to_rle(masks)
    boxes = mask_utils.toBbox([{"size": r["size"], "counts": r["counts"].encode("ascii")} for r in rles]) \
        if rles else []
    return [{"image_id": int(image_id), "category_id": int(category_ids[int(label)]), "segmentation": rle,
             "score": round(float(score), 6), "bbox": [round(float(v), 2) for v in box]}
            for rle, score, label, box in zip(rles, scores, labels, boxes, strict=True)]
