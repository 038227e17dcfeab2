"""Stable-SAM's Robust Training Strategy (RTS, digest §4): each training prompt drawn from a mixture of
prompt qualities, from the GT mask.

The mixture (paper Sec. 9; HQ-SAM's training code where the paper defers to it):

- **GT box**: the mask's tight box (SAM's convention, inclusive pixel indices, as ``finetune_data``).
- **Noisy box**: DN-DETR's box noise as HQ-SAM's ``misc.box_noise`` applies it, noise scale λ = 0.4: in
  (cx, cy, w, h), add ``u ⊙ (w/2, h/2, w, h) · λ`` with u ~ U(−1, 1)⁴, back to corners, clamped to the
  image; redrawn until its IoU with the GT box is at least 0.5 (the paper's filter).
- **Points**: 1, 3, 5 or 10 positive points (Sec. 9's list; Sec. 4.4 omits 5), pixel centres drawn uniformly
  among the mask's pixels, without replacement (with it only when the mask has fewer pixels), no negatives.
- **Coarse mask**: HQ-SAM's ``misc.masks_noise`` (after Mask Transfiner) at the decoder's mask-prompt
  resolution: the GT in SAM's padded input frame, area-resized to 4g × 4g (256 × 256 for official SAMs)
  with values in [0, 1]; the "incoherent" region where ``|m − up(down_8(m))| ≥ 0.01`` (bilinear, ×8); N(0, 1)
  noise added there only, thresholded at 0.5. It is the prompt's only input (as in HQ-SAM).

Choices where the paper is silent:

- The four prompt types are drawn with equal probability, and then the point count uniformly among
  1/3/5/10 (HQ-SAM draws its prompt type uniformly; the paper gives no probabilities).
- Box IoU is that of the boxes as pixel areas: an inclusive box ``[x1, y1, x2, y2]`` covers
  ``[x1, x2 + 1) × [y1, y2 + 1)``; the noise is applied to that extent and clamped to ``[0, W] × [0, H]``,
  so a noisy box stays inside the image. A noisy box narrower than a pixel is redrawn. After 100 draws
  without IoU ≥ 0.5 the GT box is used (never in practice: about 90 % of draws pass away from the image
  border).
- SAM reads mask prompts as logits thresholded at 0, so the coarse mask is given as ±10 (inside/outside)
  rather than HQ-SAM's raw 0/255: 0 would read as "undecided" background.
- No synthetic occlusion (Sec. 4.4 gives no recipe), no large-scale jitter (the embeddings are cached).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from omnilabel.ops.boxes import masks_to_prompt_boxes_xyxy

__all__ = ["MASK_PROMPT_LOGIT", "POINT_COUNTS", "RTS_KINDS", "RtsPrompt", "box_iou_px", "coarse_mask",
           "noisy_box_xyxy", "sample_rts_prompt"]

RtsKind = Literal["box", "noisy_box", "points", "mask"]
#: The prompt types of the mixture, drawn with equal probability.
RTS_KINDS: tuple[RtsKind, ...] = ("box", "noisy_box", "points", "mask")
#: Positive point counts (paper Sec. 9).
POINT_COUNTS: tuple[int, ...] = (1, 3, 5, 10)
#: DN-DETR noise scale λ (paper: "noise scale 0.4").
NOISE_SCALE = 0.4
#: Least IoU of a training noisy box with the GT box (paper).
MIN_BOX_IOU = 0.5
#: Draws of a noisy box before falling back to the GT box.
MAX_BOX_DRAWS = 100
#: HQ-SAM's coarse-mask recipe: down-sampling factor and residue threshold of the incoherent region.
INCOHERENT_FACTOR = 8
INCOHERENT_THRESH = 0.01
#: Magnitude of the coarse mask given to SAM as mask-prompt logits.
MASK_PROMPT_LOGIT = 10.0


@dataclass(frozen=True)
class RtsPrompt:
    """One drawn prompt, in the original image's pixels.

    Attributes:
        kind: ``box``, ``noisy_box``, ``points`` or ``mask`` (the coarse mask is made in SAM's input frame,
            by ``coarse_mask``, from the same generator).
        points_xy: (k, 2) float64 pixel centres, k in ``POINT_COUNTS``, or None.
        box_xyxy: (4,) float64 in SAM's convention, or None.
    """

    kind: RtsKind
    points_xy: np.ndarray | None = None
    box_xyxy: np.ndarray | None = None


def box_iou_px(a_xyxy: np.ndarray, b_xyxy: np.ndarray) -> float:
    """IoU of two inclusive-pixel boxes as areas (``[x1, x2 + 1) × [y1, y2 + 1)``)."""
    a = np.asarray(a_xyxy, np.float64) + (0, 0, 1, 1)
    b = np.asarray(b_xyxy, np.float64) + (0, 0, 1, 1)
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def noisy_box_xyxy(box_xyxy: np.ndarray, rng: np.random.Generator, *, image_hw: tuple[int, int],
                   noise_scale: float = NOISE_SCALE, min_iou: float = MIN_BOX_IOU,
                   max_draws: int = MAX_BOX_DRAWS) -> np.ndarray:
    """A noisy copy of a box (DN-DETR / HQ-SAM noise), redrawn until IoU with it is at least ``min_iou``.

    Args:
        box_xyxy: (4,) inclusive-pixel box (SAM's convention).
        rng: the generator of this prompt.
        image_hw: (H, W) of the image; the noisy box stays within ``[0, W − 1] × [0, H − 1]``.
        noise_scale: λ. min_iou: the filter. max_draws: draws before returning the box itself.

    Returns:
        (4,) float64 inclusive-pixel box with ``x1 <= x2``, ``y1 <= y2``.
    """
    h_img, w_img = image_hw
    gt = np.asarray(box_xyxy, np.float64)
    x1, y1, x2, y2 = gt + (0, 0, 1, 1)
    cxcywh = np.array([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])
    spread = np.array([cxcywh[2] / 2, cxcywh[3] / 2, cxcywh[2], cxcywh[3]]) * noise_scale
    for _ in range(max_draws):
        cx, cy, w, h = cxcywh + rng.uniform(-1.0, 1.0, 4) * spread
        edges = np.clip([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 0, [w_img, h_img, w_img, h_img])
        if edges[2] - edges[0] < 1 or edges[3] - edges[1] < 1:
            continue
        box = edges - (0, 0, 1, 1)
        if box_iou_px(box, gt) >= min_iou:
            return box
    return gt.copy()


def _points(mask: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    pick = rng.choice(len(ys), size=k, replace=len(ys) < k)
    return np.stack([xs[pick] + 0.5, ys[pick] + 0.5], axis=1).astype(np.float64)


def sample_rts_prompt(mask: np.ndarray, rng: np.random.Generator, *,
                      kinds: tuple[RtsKind, ...] = RTS_KINDS,
                      point_counts: tuple[int, ...] = POINT_COUNTS) -> RtsPrompt:
    """One training prompt of the RTS mixture from a GT mask.

    Args:
        mask: (H, W) bool, non-empty, at the original image size.
        rng: the generator of this instance at this step.
        kinds: the prompt types drawn from (uniformly). point_counts: the point counts (uniformly).

    Returns:
        The prompt; for ``mask`` the caller makes the coarse mask (``coarse_mask``) with the same ``rng``.
    """
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind in ("box", "noisy_box"):
        box = masks_to_prompt_boxes_xyxy(mask[None])[0]
        if kind == "noisy_box":
            box = noisy_box_xyxy(box, rng, image_hw=(int(mask.shape[0]), int(mask.shape[1])))
        return RtsPrompt(kind, box_xyxy=box)
    if kind == "points":
        k = int(point_counts[int(rng.integers(len(point_counts)))])
        return RtsPrompt(kind, points_xy=_points(mask, k, rng))
    return RtsPrompt(kind)


def coarse_mask(gt: np.ndarray | torch.Tensor, rng: np.random.Generator, *, factor: int = INCOHERENT_FACTOR,
                thresh: float = INCOHERENT_THRESH) -> np.ndarray:
    """HQ-SAM's coarse mask: the GT with N(0, 1) noise in its incoherent (boundary) region, thresholded.

    Args:
        gt: (h, w) float GT mask in [0, 1] (h, w multiples of ``factor``), e.g. the GT in SAM's padded input
            frame at the mask-prompt resolution.
        rng: the generator of this prompt.
        factor: the down-sampling factor that finds the incoherent region. thresh: its residue threshold.

    Returns:
        (h, w) bool.
    """
    m = torch.as_tensor(np.asarray(gt, np.float32) if not isinstance(gt, torch.Tensor) else gt,
                        dtype=torch.float32).cpu()[None, None]
    h, w = m.shape[-2:]
    small = F.interpolate(m, size=(h // factor, w // factor), mode="bilinear", align_corners=False)
    recovered = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    incoherent = ((m - recovered).abs() >= thresh).float()
    noise = torch.as_tensor(rng.standard_normal((h, w)), dtype=torch.float32)[None, None]
    return ((m + noise * incoherent) > 0.5)[0, 0].numpy()


def mask_prompt_logits(coarse: np.ndarray) -> np.ndarray:
    """(h, w) bool → (h, w) float32 mask-prompt logits, ±``MASK_PROMPT_LOGIT``."""
    return np.where(coarse, MASK_PROMPT_LOGIT, -MASK_PROMPT_LOGIT).astype(np.float32)
