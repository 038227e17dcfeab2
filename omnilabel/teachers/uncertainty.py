"""SUM (``specs/sum.md``): the refinement module's training pairs, and uncertainty maps of pseudomasks.

The refinement module (the *refiner*) is SAM's prompt encoder and mask decoder, fine-tuned
(``finetune-teacher --prompts refine``) to turn a SAM mask into the human-labelled one; it decodes from the
same frozen image encoder as the teacher whose pseudomasks it refines. Its inputs are always the three of
SUM §3.2 together: the SAM mask's low-res **logits** as the mask prompt, the **box** of that mask, and the
**point** that prompted it.

Training pairs (:func:`build_refine_pairs`), from the fully annotated images:

- one point drawn uniformly among each GT mask's pixels (a pixel centre; the paper does not say how), from a
  generator seeded by ``(seed, instance index)``;
- the SAM that makes the pseudomasks (the base SAM, or the teacher given to ``finetune-teacher --teacher``)
  answers that point with its 3 multimask outputs; the output with the highest IoU against the GT mask (at
  the image's size) is the pair's mask prompt (its low-res logits), its tight box (SAM's convention) the box
  prompt;
- pairs with that IoU below ``min_iou`` (the paper's 0.7) are dropped; the target is the GT mask.
  SAM's automatic-mask-generator filters (predicted IoU, stability), which the paper also applies, are not:
  the pairs here come from a single click on a GT object, not from a grid of points.

The pairs are computed once per run, before training, and cached beside the image embeddings (one file
per image), so resuming a run does not recompute them.

Uncertainty (:class:`UncertaintyScorer`, SUM Eq. 3): ``u = |σ(s) − σ(r)|`` per pixel, ``s`` the logits that
made the pseudomask and ``r`` the refiner's logits given ``s``, the pseudomask's box and its prompt point,
both upsampled from the decoder's low-res grid to the image exactly as SAM makes its masks
(``Sam.postprocess_masks``), so ``s > 0`` is the pseudomask. The prompt point is the click for points; for
boxes and detections, which have no point, it is the box's centre (a documented choice: the paper's
pseudo-labels all come from points). The summary ``uncertainty_mean`` is
``omnilabel.ops.uncertainty.uncertainty_mean``: the mean of ``u`` over the mask and a 3-pixel band around it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from omnilabel.data.maps import quantize
from omnilabel.errors import InputError
from omnilabel.io import save_torch_atomic
from omnilabel.ops.boxes import masks_to_prompt_boxes_xyxy
from omnilabel.ops.uncertainty import uncertainty_from_logits, uncertainty_mean

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

    from omnilabel.teachers.finetune_data import EmbeddingCache, TrainImage, TrainInstance
    from omnilabel.teachers.sam import ImageEmbedding, SamTeacher

__all__ = ["PairSet", "UncertaintyScorer", "build_refine_pairs", "pair_dir_key", "prompt_points"]

#: Masks whose uncertainty is computed at once (each holds two image-sized float32 maps).
_CHUNK = 16


def pair_dir_key(decoder_sha256: str, seed: int, instances: Sequence[TrainInstance]) -> str:
    """Name of the folder of a run's pairs: they depend on the SAM that made them, the seed, and the GT masks
    (their ids, images and RLEs, in order), so pairs of another input are never reused."""
    h = hashlib.sha256(f"{decoder_sha256}|{seed}".encode())
    for inst in instances:
        h.update(f"|{inst.image_index}:{inst.annotation_id}:{inst.rle['counts']}".encode())
    return "pairs-" + h.hexdigest()[:16]


def _pair_point(mask: np.ndarray, seed: int, instance: int) -> np.ndarray:
    """The pair's click: the centre of a pixel drawn uniformly from the GT mask."""
    ys, xs = np.nonzero(mask)
    k = int(np.random.default_rng([seed, 11, instance]).integers(len(ys)))
    return np.array([xs[k] + 0.5, ys[k] + 0.5])


def build_refine_pairs(sam: Sam, cache: EmbeddingCache, images: Sequence[TrainImage],
                       instances: Sequence[TrainInstance], *, pair_dir: str | Path, seed: int, rank: int = 0,
                       world_size: int = 1, device: str = "cpu") -> int:
    """Compute and cache this rank's share of the refiner's training pairs (images the cache lacks).

    Image ``i`` is this rank's when ``i % world_size == rank``; its file ``<image_id>.pt`` holds, for each of
    its instances in order: ``index`` (the instance's position in ``instances``), ``logits`` (4g, 4g) of the
    chosen SAM output, ``point`` (2,) and ``box`` (4,) in image pixels, ``iou`` with the GT.

    Args:
        sam: the SAM whose masks the refiner will refine; its encoder made ``cache``'s embeddings.
        cache: the run's image embeddings (every image already encoded).
        images, instances: the training set.
        pair_dir: the folder of the pair files (:func:`pair_dir_key` under the embeddings).
        seed: the run's seed (draws the clicks).

    Returns:
        How many images this rank computed.
    """
    from omnilabel.teachers.finetune_data import decode_mask
    from omnilabel.teachers.sam import ImageEmbedding, SamTeacher

    pair_dir = Path(pair_dir)
    pair_dir.mkdir(parents=True, exist_ok=True)
    teacher = SamTeacher(sam, device=device)
    by_image: dict[int, list[int]] = {}
    for k, inst in enumerate(instances):
        by_image.setdefault(inst.image_index, []).append(k)
    done = 0
    for i, im in enumerate(images):
        path = pair_dir / f"{im.image_id}.pt"
        if i % world_size != rank or path.is_file():
            continue
        features, input_size, original_size = cache.load(im.image_id)
        emb = ImageEmbedding(features[None].to(teacher.device, torch.float32), tuple(original_size),  # type: ignore[arg-type]
                             tuple(input_size))
        index = by_image.get(i, [])
        gts = np.stack([decode_mask(instances[k]) for k in index])
        points = np.stack([_pair_point(gt, seed, k) for gt, k in zip(gts, index, strict=True)])
        low = np.concatenate([c.low_res_logits for c in teacher.decode_points_multimask(emb, points)])
        pred = teacher.upsample(emb, low.reshape(-1, *low.shape[2:])).reshape(len(index), 3, *gts.shape[1:])
        gt_b = gts[:, None]
        inter = (pred & gt_b).reshape(len(index), 3, -1).sum(-1)
        union = (pred | gt_b).reshape(len(index), 3, -1).sum(-1)
        ious = inter / np.maximum(union, 1)
        best = ious.argmax(axis=1)
        rows = np.arange(len(index))
        chosen = pred[rows, best]
        save_torch_atomic({
            "index": torch.as_tensor(index, dtype=torch.int64),
            "logits": torch.from_numpy(np.ascontiguousarray(low[rows, best])),
            "point": torch.as_tensor(points, dtype=torch.float64),
            "box": torch.as_tensor(masks_to_prompt_boxes_xyxy(chosen), dtype=torch.float64),
            "iou": torch.as_tensor(ious[rows, best], dtype=torch.float64)}, path)
        done += 1
    return done


@dataclass
class PairSet:
    """The kept training pairs of a run, their mask logits read from the pair files when needed.

    Attributes:
        instance: (P,) int64 instance index of each kept pair.
        point: (P, 2) float64 click. box: (P, 4) float64 box of the SAM mask, both in image pixels.
        iou: (P,) IoU of the SAM mask with the GT.
        dropped: how many pairs fell below ``min_iou``.
    """

    instance: np.ndarray
    point: np.ndarray
    box: np.ndarray
    iou: np.ndarray
    dropped: int
    _files: dict[int, Path]
    _slot: dict[int, tuple[int, int]]

    @classmethod
    def read(cls, pair_dir: str | Path, images: Sequence[TrainImage], *, min_iou: float) -> PairSet:
        """The pairs of every image, keeping those with IoU >= ``min_iou``.

        Raises:
            InputError: no pair is left (the message gives the best IoU seen and what to do).
        """
        pair_dir = Path(pair_dir)
        inst, pts, bxs, ious, files, slot = [], [], [], [], {}, {}
        total, best = 0, 0.0
        for im in images:
            path = pair_dir / f"{im.image_id}.pt"
            obj = torch.load(path, map_location="cpu", weights_only=True)
            iou = obj["iou"].numpy()
            total += len(iou)
            best = max(best, float(iou.max(initial=0.0)))
            for j in np.flatnonzero(iou >= min_iou):
                k = int(obj["index"][j])
                inst.append(k)
                pts.append(obj["point"][j].numpy())
                bxs.append(obj["box"][j].numpy())
                ious.append(float(iou[j]))
                files[k] = path
                slot[k] = (im.image_id, int(j))
        if not inst:
            raise InputError(f"no training pair for the refiner: all {total} GT masks' SAM masks have IoU with "
                             f"the GT below --min-iou {min_iou} (the best is {best:.3f}); the refiner learns "
                             "to correct masks SAM nearly got right. Lower --min-iou, or train from the SAM "
                             "that makes the pseudomasks (--teacher / --sam)")
        return cls(np.asarray(inst, dtype=np.int64), np.stack(pts), np.stack(bxs), np.asarray(ious),
                   total - len(inst), files, slot)

    def __len__(self) -> int:
        return len(self.instance)

    def logits(self, instance: int, memory: dict[Path, torch.Tensor]) -> torch.Tensor:
        """(4g, 4g) mask-prompt logits of an instance's pair; ``memory`` holds the files read so far."""
        path = self._files[instance]
        if path not in memory:
            memory[path] = torch.load(path, map_location="cpu", weights_only=True)["logits"]
        return memory[path][self._slot[instance][1]]


def prompt_points(points_xy: np.ndarray, boxes_xyxy: np.ndarray) -> np.ndarray:
    """The refiner's point of each pseudomask: its click, or for a box prompt (NaN point) the box's centre."""
    pts = np.array(points_xy, dtype=np.float64, copy=True)
    missing = ~np.isfinite(pts).all(axis=1)
    b = np.asarray(boxes_xyxy, dtype=np.float64)[missing]
    pts[missing] = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], axis=1) if len(b) else pts[missing]
    return pts


class UncertaintyScorer:
    """Uncertainty maps of pseudomasks from their logits, with a refiner on the job's shared encoder.

    Args:
        refiner: the refiner's ``SamTeacher`` (attached to the encoder that made the embeddings).
        band_px: width of the band around a mask that ``uncertainty_mean`` also averages over.
    """

    def __init__(self, refiner: SamTeacher, *, band_px: int = 3) -> None:
        self.refiner = refiner
        self.band_px = int(band_px)

    def score(self, emb: ImageEmbedding, low_res_logits: np.ndarray, points_xy: np.ndarray
              ) -> list[tuple[np.ndarray, float]]:
        """``(u, uncertainty_mean)`` of each pseudomask, ``u`` (H, W) uint16 ``round(u · 65535)`` as its map file
        stores it (``omnilabel.data.maps.quantize``: a 12-MP image's maps take 24 MB each, not 48).

        Args:
            emb: the image's embedding (the one the pseudomasks were decoded from).
            low_res_logits: (N, 4g, 4g) the logits ``s`` that made each pseudomask.
            points_xy: (N, 2) each pseudomask's prompt point (see :func:`prompt_points`).

        Raises:
            InputError: the arrays disagree on N.
        """
        s_low = np.asarray(low_res_logits, dtype=np.float32)
        pts = np.asarray(points_xy, dtype=np.float64)
        if s_low.ndim != 3 or len(pts) != len(s_low):
            raise InputError(f"uncertainty: {len(pts)} points for logits of shape {s_low.shape}")
        sam = self.refiner.sam
        out: list[tuple[np.ndarray, float]] = []
        for start in range(0, len(s_low), _CHUNK):
            s_chunk = torch.as_tensor(s_low[start:start + _CHUNK], device=self.refiner.device)
            with torch.inference_mode():
                s_full = sam.postprocess_masks(s_chunk[:, None], emb.input_size, emb.original_size)[:, 0]
            masks = (s_full > 0).cpu().numpy()
            boxes = masks_to_prompt_boxes_xyxy(masks)
            r_low = self.refiner.predict(emb, points_xy=pts[start:start + _CHUNK], boxes_xyxy=boxes,
                                         mask_logits=s_low[start:start + _CHUNK]).low_res_logits
            with torch.inference_mode():
                r_full = sam.postprocess_masks(torch.as_tensor(r_low, device=self.refiner.device)[:, None],
                                               emb.input_size, emb.original_size)[:, 0]
                u = uncertainty_from_logits(s_full.float(), r_full.float()).clamp_(0.0, 1.0).cpu().numpy()
            for k in range(len(u)):
                out.append((quantize(u[k]), uncertainty_mean(u[k], masks[k], band_px=self.band_px)))
        return out
