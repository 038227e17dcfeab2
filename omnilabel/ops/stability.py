"""Stable-SAM's test-time prompts and its stability score (``specs/stable-sam.md`` §4–5): pure numpy.

- :func:`noisy_boxes`: a GT box with DN-DETR / HQ-SAM box noise at noise scale λ (the paper's 0.4), kept when
  its IoU with the GT box reaches a threshold (training: 0.5).
- :func:`random_points`: k positive clicks drawn uniformly over a GT mask's pixels, as pixel centres.
- :func:`stability_score`: Eq. 1, ``S = (1/B) Σ_i IoU(M_i, ∪_j M_j)`` over the B masks one object gets under B
  random prompts of one type (mSF is its mean over objects).
- :class:`PromptType`, :func:`draw_prompts`: the protocol's prompt types (GT box, noisy box, N clicks) drawn from
  one GT mask with the generator :func:`instance_rng` gives that instance and type.

Mask IoU and boundary IoU are not here: ``omnilabel.ops.masks.mask_iou`` and ``omnilabel.eval.miou.boundary_iou``.
"""

from __future__ import annotations

from enum import Enum

import numpy as np

from omnilabel.ops.boxes import box_iou, masks_to_prompt_boxes_xyxy

#: Stable-SAM §5 / HQ-SAM: noisy boxes at noise scale 0.4.
DEFAULT_NOISE_SCALE = 0.4
#: Stable-SAM §4 (training): a noisy box is redrawn until its IoU with the GT box is >= 0.5.
DEFAULT_MIN_BOX_IOU = 0.5
#: Rounds of redrawing the boxes below ``min_iou`` before giving up (see :func:`noisy_boxes`). At λ = 0.4 and
#: IoU >= 0.5 most draws pass, so the cap matters only for thresholds the noise can hardly reach.
MAX_BOX_TRIES = 100


def _box_noise(box: np.ndarray, u: np.ndarray, scale: float, image_hw: tuple[int, int]) -> np.ndarray:
    """``(n, 4)`` xyxy boxes: ``(cx, cy, w, h) + u ⊙ (w/2, h/2, w, h) · scale``, back to xyxy, ordered, clamped."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cxcywh = np.array([(x0 + x1) / 2, (y0 + y1) / 2, w, h]) + u * np.array([w / 2, h / 2, w, h]) * scale
    cx, cy, nw, nh = cxcywh.T
    xs = np.sort(np.stack([cx - nw / 2, cx + nw / 2], axis=1), axis=1)
    ys = np.sort(np.stack([cy - nh / 2, cy + nh / 2], axis=1), axis=1)
    height, width = image_hw
    return np.stack([np.clip(xs[:, 0], 0, width), np.clip(ys[:, 0], 0, height),
                     np.clip(xs[:, 1], 0, width), np.clip(ys[:, 1], 0, height)], axis=1)


def noisy_boxes(box_xyxy: np.ndarray, rng: np.random.Generator, n: int, *, scale: float = DEFAULT_NOISE_SCALE,
                min_iou: float | None = DEFAULT_MIN_BOX_IOU, image_hw: tuple[int, int],
                max_tries: int = MAX_BOX_TRIES) -> np.ndarray:
    """``n`` noisy copies of a box, DN-DETR style (HQ-SAM's ``misc.box_noise``; the paper names only the scale).

    Each draw takes the box as ``(cx, cy, w, h)``, adds ``u ⊙ (w/2, h/2, w, h) · scale`` with the four components
    of ``u`` independent U(-1, 1), converts back to xyxy (coordinates re-ordered so that x0 <= x1, y0 <= y1, which
    only matters for ``scale`` >= 1) and clamps x to [0, W], y to [0, H]. With ``min_iou``, draws whose IoU with
    the box is below it are redrawn, all such rows together, for at most ``max_tries`` rounds; a row still below
    after the cap keeps the draw of highest IoU among its tries (so the result always has ``n`` rows, and a row
    misses the threshold only where the noise can hardly reach it). A box of zero width or height has IoU 0 with
    everything, so for it the filter is skipped.

    Args:
        box_xyxy: (4,) float, the GT box in pixels.
        rng: the source of the draws: ``n`` x 4 uniforms per round, row-major.
        n: boxes to draw, >= 0.
        scale: noise scale λ, >= 0 (Stable-SAM: 0.4).
        min_iou: keep draws with IoU >= this, in [0, 1]; None: no filter.
        image_hw: (H, W) of the image, for clamping.
        max_tries: rounds of redrawing, >= 1.

    Returns:
        (n, 4) float64 xyxy.

    Raises:
        ValueError: a box that is not 4 finite numbers with x0 <= x1 and y0 <= y1, a negative ``n`` or ``scale``,
            ``min_iou`` outside [0, 1], or ``max_tries`` < 1.
    """
    box = np.asarray(box_xyxy, dtype=np.float64)
    if box.shape != (4,) or not np.isfinite(box).all() or box[2] < box[0] or box[3] < box[1]:
        raise ValueError(f"box_xyxy must be 4 finite numbers [x0, y0, x1, y1] with x0 <= x1, y0 <= y1, got {box}")
    if n < 0 or not scale >= 0 or max_tries < 1:
        raise ValueError(f"need n >= 0, scale >= 0 and max_tries >= 1, got {n}, {scale}, {max_tries}")
    if min_iou is not None and not 0.0 <= min_iou <= 1.0:
        raise ValueError(f"min_iou must be in [0, 1] or None, got {min_iou}")
    out = _box_noise(box, rng.uniform(-1.0, 1.0, size=(n, 4)), scale, image_hw)
    if min_iou is None or n == 0 or (box[2] - box[0]) * (box[3] - box[1]) <= 0:
        return out
    iou = box_iou(out, box[None])[:, 0]
    for _ in range(max_tries - 1):
        redo = np.flatnonzero(iou < min_iou)
        if redo.size == 0:
            break
        again = _box_noise(box, rng.uniform(-1.0, 1.0, size=(redo.size, 4)), scale, image_hw)
        again_iou = box_iou(again, box[None])[:, 0]
        better = again_iou > iou[redo]
        out[redo[better]], iou[redo[better]] = again[better], again_iou[better]
    return out


def random_points(mask: np.ndarray, rng: np.random.Generator, n_prompts: int, k: int) -> np.ndarray:
    """``n_prompts`` prompts of ``k`` positive clicks each, uniform over the mask's pixels (HQ-SAM's test clicks).

    The ``k`` clicks of one prompt are distinct pixels when the mask has at least ``k``; otherwise they are drawn
    with replacement. Each click is the centre of its pixel: ``(col + 0.5, row + 0.5)``, so
    ``mask[int(y), int(x)]`` is True.

    Args:
        mask: (H, W) bool, non-empty.
        rng: the source of the draws (``rng.choice`` once per prompt).
        n_prompts: prompts, >= 0.
        k: clicks per prompt, >= 1.

    Returns:
        (n_prompts, k, 2) float64 pixel xy.

    Raises:
        ValueError: ``mask`` is not 2-D or is empty, or ``k`` < 1 or ``n_prompts`` < 0.
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {m.shape}")
    if k < 1 or n_prompts < 0:
        raise ValueError(f"need k >= 1 and n_prompts >= 0, got {k}, {n_prompts}")
    ys, xs = np.nonzero(m)
    if ys.size == 0:
        raise ValueError("cannot draw clicks from an empty mask")
    replace = ys.size < k
    idx = np.stack([rng.choice(ys.size, size=k, replace=replace) for _ in range(n_prompts)]) if n_prompts \
        else np.zeros((0, k), dtype=np.int64)
    return np.stack([xs[idx] + 0.5, ys[idx] + 0.5], axis=-1).astype(np.float64)


def stability_score(masks: np.ndarray) -> float:
    """Stable-SAM's stability of one object under B prompts (Eq. 1): ``(1/B) Σ_i |M_i| / |∪_j M_j|``.

    Since each ``M_i`` lies inside the union, ``IoU(M_i, ∪M) = |M_i| / |∪M|``. The score is 1 exactly when all
    masks are equal. All masks empty (an empty union, which the paper leaves undefined) counts as 1.0: the
    prompts agree, on nothing.

    Args:
        masks: (B, H, W) bool, B >= 1.

    Returns:
        Float in [0, 1].

    Raises:
        ValueError: ``masks`` is not (B, H, W) with B >= 1.
    """
    m = np.asarray(masks, dtype=bool)
    if m.ndim != 3 or len(m) == 0:
        raise ValueError(f"masks must be (B, H, W) with B >= 1, got shape {m.shape}")
    union = int(np.logical_or.reduce(m, axis=0).sum())
    if union == 0:
        return 1.0
    return float(m.reshape(len(m), -1).sum(axis=1).mean() / union)


class PromptType(str, Enum):
    """A prompt type of the protocol; the value is its name on the command line and in the output."""

    BOX = "box"
    NOISY_BOX = "noisy-box"
    POINT_1 = "1-point"
    POINTS_3 = "3-points"
    POINTS_5 = "5-points"
    POINTS_10 = "10-points"

    @property
    def n_points(self) -> int:
        """Clicks per prompt; 0 for the box types."""
        return {"1-point": 1, "3-points": 3, "5-points": 5, "10-points": 10}.get(self.value, 0)

    @property
    def seed_code(self) -> int:
        """Fixed per type (not its place in ``--prompts``), so that a subset draws the prompts a full run does."""
        return {"box": 0, "noisy-box": 1, "1-point": 2, "3-points": 3, "5-points": 4, "10-points": 5}[self.value]


def instance_rng(seed: int, image_id: int, ann_id: int, ptype: PromptType) -> np.random.Generator:
    """The generator of one instance's prompts of one type: ``default_rng([seed, image id, ann id, type code])``
    (ids taken modulo 2**64, so negative ids work too)."""
    return np.random.default_rng([seed, image_id % 2**64, ann_id % 2**64, ptype.seed_code])


def draw_prompts(mask: np.ndarray, ptype: PromptType, rng: np.random.Generator, *, k: int,
                 noise: float = DEFAULT_NOISE_SCALE, min_iou: float | None = DEFAULT_MIN_BOX_IOU) -> np.ndarray:
    """One instance's prompts of one type. The GT box is the mask's tight box in SAM's convention (inclusive
    pixel indices, ``masks_to_prompt_boxes_xyxy``), the box the teachers are trained with.

    Args:
        mask: (H, W) bool GT mask, non-empty.
        ptype: the prompt type. rng: ``instance_rng`` of this instance and type.
        k: prompts (the GT box is always one). noise, min_iou: of :func:`noisy_boxes`.

    Returns:
        Boxes: (n, 4) float64 xyxy (n = 1 for ``box``, else k); clicks: (k, N, 2) float64 pixel xy.

    Raises:
        ValueError: an empty mask.
    """
    if not np.asarray(mask).any():
        raise ValueError("cannot draw prompts from an empty mask")
    box = masks_to_prompt_boxes_xyxy(np.asarray(mask, dtype=bool)[None])[0]
    if ptype is PromptType.BOX:
        return box[None]
    if ptype is PromptType.NOISY_BOX:
        return noisy_boxes(box, rng, k, scale=noise, min_iou=min_iou, image_hw=mask.shape)
    return random_points(mask, rng, k, ptype.n_points)
