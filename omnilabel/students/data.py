"""Training data for the student: which annotations it learns from, augmentation, batches.

Annotations: every annotation with a ``segmentation`` (polygons, RLE or compressed RLE) is a target; ground
truth (``omnilabel.source`` ``gt``, or no ``omnilabel`` object) always, pseudomasks (``source`` ``pseudo``)
when their ``score`` is at least ``min_score``. Crowd annotations (``iscrowd`` 1) and annotations without a
mask (weak boxes, points, tags left over) are skipped, as are images left without a target (detectron2's
``FILTER_EMPTY_ANNOTATIONS``). Each target carries a weight: 1 for ground truth, ``pseudo_weight`` for a
pseudomask (see ``omnilabel.students.loss`` for what it scales).

Certainty (``train-student --uncertainty``): a pseudomask target also carries its uncertainty map ``u``
(``omnilabel.data.maps``), read per sample like the masks; the sample then has one certainty map
``c = 1 - u`` per target, (N, H, W) float32 in [0, 1], 1 everywhere for ground truth. It goes through exactly
the crop, resize, pad and flip of the masks (bilinear, antialiased, like the image; the masks are nearest),
and the padding is ``c = 1`` (:data:`CERTAINTY_PAD`): a padded pixel is certainly not the object, as it is
for ground truth. Without ``--uncertainty`` no certainty map is built.

Masks are decoded per sample, in the DataLoader's workers, so memory holds COCO strings, not bitmaps.

Augmentation (Mask2Former's large-scale jitter, LSJ): scale the image so it fits a square of
``image_size · s`` (``s`` uniform in ``scale_range``, 0.1-2.0), take a random ``image_size`` square crop
(padding where the scaled image is smaller), flip horizontally with probability ``hflip_prob``. A target
cropped away entirely is dropped.

Evaluation (:func:`eval_size_hw`, :func:`eval_resize`) resizes as Mask2Former's COCO test does when the
student has evaluation sizes (``paper``: shorter side 800, longer side at most 1333, detectron2's
``ResizeShortestEdge``) and pads bottom/right to a multiple of 32 (``SIZE_DIVISIBILITY``); without them
(``tiny``, and students trained before they existed) it resizes the longer side to ``image_size`` and pads
to an ``image_size`` square.

Every random draw comes from a seed the sampler hands out with the index, so a batch is the same whatever
the number of DataLoader workers, and a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from omnilabel.data.coco import annotations_by_image, resolve_image_path
from omnilabel.data.images import read_image_rgb
from omnilabel.data.maps import read_annotation_map
from omnilabel.errors import InputError
from omnilabel.ops.masks import rle_to_masks

#: ImageNet mean and std of RGB in [0, 255] (what the ResNet backbones were trained with).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
#: Evaluation inputs are padded to a multiple of this (the backbone's stride; Mask2Former: 32).
SIZE_DIVISIBILITY = 32
#: Certainty of the padding LSJ adds: the padding is certainly not the object, so it counts fully there, as
#: without ``--uncertainty``.
CERTAINTY_PAD = 1.0


@dataclass(frozen=True)
class Sample:
    """One training image: plain data, so it pickles to DataLoader workers.

    Attributes:
        path: the image file. height, width: its size (from the COCO file).
        segmentations: the targets' COCO segmentations (any form).
        labels: contiguous class labels in [0, K). weights: loss weights >= 0.
        uncertainty_maps: only with ``--uncertainty``: per target, ``(annotation id, uncertainty map file)``
            for a pseudomask, None for ground truth (certainty 1).
    """

    path: str
    height: int
    width: int
    segmentations: list[Any]
    labels: list[int]
    weights: list[float]
    uncertainty_maps: list[tuple[int, str] | None] | None = None


def target_kind(ann: dict[str, Any], *, min_score: float = 0.0) -> str:
    """What :func:`training_samples` makes of an annotation: ``gt`` or ``pseudo`` (a target), or why it is
    dropped: ``crowd``, ``no_mask``, ``low_score``."""
    source = (ann.get("omnilabel") or {}).get("source", "gt")
    if ann.get("iscrowd", 0):
        return "crowd"
    if ann.get("segmentation") in (None, [], {}):
        return "no_mask"
    if source == "pseudo" and float(ann.get("score", 1.0)) < min_score:
        return "low_score"
    return "pseudo" if source == "pseudo" else "gt"


def training_samples(data: dict[str, Any], images_dir: Path, *, category_ids: Sequence[int], min_score: float = 0.0,
                     pseudo_weight: float = 1.0, allow_outside_images: bool = False,
                     uncertainty_paths: Mapping[int, Path] | None = None) -> tuple[list[Sample], Counter]:
    """The student's training images from a validated COCO dict (see the module docstring for the rules).

    Args:
        data: COCO dict (ground truth and/or an omnilabel pseudomask file).
        images_dir: folder ``file_name`` values are relative to.
        category_ids: COCO category ids; label ``i`` is ``category_ids[i]``.
        min_score: pseudomasks with a lower ``score`` are dropped (ground truth never is).
        pseudo_weight: loss weight of a pseudomask.
        allow_outside_images: accept absolute ``file_name``s or ones that climb out of ``images_dir``.
        uncertainty_paths: ``{annotation id: uncertainty map file}`` covering every pseudomask target
            (``omnilabel.students.certainty.pseudomask_uncertainty_paths``); given, samples carry
            ``uncertainty_maps``. None: they do not.

    Returns:
        ``(samples, counts)``; counts of ``gt``, ``pseudo`` targets kept, ``low_score``, ``crowd``,
        ``no_mask`` annotations dropped, ``empty_images`` skipped.

    Raises:
        InputError: with ``uncertainty_paths``, a pseudomask target missing from it.
    """
    label_of = {cid: i for i, cid in enumerate(category_ids)}
    counts: Counter = Counter()
    samples = []
    by_image = annotations_by_image(data)
    for img in data["images"]:
        segs, labels, weights, maps = [], [], [], []
        for ann in by_image[img["id"]]:
            kind = target_kind(ann, min_score=min_score)
            counts[kind] += 1
            if kind not in ("gt", "pseudo"):
                continue
            segs.append(ann["segmentation"])
            labels.append(label_of[ann["category_id"]])
            weights.append(pseudo_weight if kind == "pseudo" else 1.0)
            if uncertainty_paths is not None:
                maps.append(_map_of(ann, uncertainty_paths) if kind == "pseudo" else None)
        if not segs:
            counts["empty_images"] += 1
            continue
        path = resolve_image_path(images_dir, img["file_name"], allow_outside_images=allow_outside_images)
        samples.append(Sample(str(path), int(img["height"]), int(img["width"]), segs, labels, weights,
                              maps if uncertainty_paths is not None else None))
    return samples, counts


def _map_of(ann: dict[str, Any], uncertainty_paths: Mapping[int, Path]) -> tuple[int, str]:
    path = uncertainty_paths.get(ann["id"])
    if path is None:
        raise InputError(f"annotation id={ann['id']}: omnilabel.uncertainty: no uncertainty map for this "
                         "pseudomask; run `omnilabel uncertainty` on the file first")
    return int(ann["id"]), str(path)


def read_certainty(uncertainty_maps: Sequence[tuple[int, str] | None], size_hw: tuple[int, int]) -> np.ndarray:
    """The certainty ``c = 1 - u`` of each target of a sample, read now (one sample at a time, never a dataset).

    Args:
        uncertainty_maps: a sample's ``uncertainty_maps``: ``(annotation id, map file)`` or None (ground truth).
        size_hw: the decoded image's ``(H, W)``; every map must have it.

    Returns:
        (N, H, W) float32 in [0, 1]; 1 everywhere for ground truth.

    Raises:
        InputError: naming the annotation id and the file: a map is unreadable, out of range, or not of the
            image's size.
    """
    certainty = np.ones((len(uncertainty_maps), *size_hw), dtype=np.float32)
    for i, ref in enumerate(uncertainty_maps):
        if ref is None:
            continue
        ann_id, path = ref
        certainty[i] = 1.0 - read_annotation_map(ann_id, path, size_hw)
    return certainty


def _resize(t: torch.Tensor, size_hw: tuple[int, int], *, masks: bool) -> torch.Tensor:
    """(C, H, W) float image (bilinear, antialiased) or (N, H, W) masks (nearest) to ``size_hw``."""
    if t.shape[0] == 0:
        return t.new_zeros((0, *size_hw))
    if tuple(t.shape[-2:]) == size_hw:
        return t
    if masks:
        return F.interpolate(t[None].float(), size=size_hw, mode="nearest-exact")[0] > 0.5
    return F.interpolate(t[None], size=size_hw, mode="bilinear", align_corners=False, antialias=True)[0]


def normalize(image_rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB → (3, H, W) float32, ImageNet-normalised."""
    t = torch.from_numpy(np.ascontiguousarray(image_rgb)).permute(2, 0, 1).float()
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    return (t - mean) / std


def lsj(image: torch.Tensor, masks: torch.Tensor, *, rng: np.random.Generator, image_size: int,
        scale_range: tuple[float, float] = (0.1, 2.0), hflip_prob: float = 0.5
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Large-scale jitter + horizontal flip (see the module docstring).

    Args:
        image: (3, H, W) float32, normalised (padding is 0, the mean colour).
        masks: (N, H, W) bool.
        rng: the only source of randomness.
        image_size: output side S in pixels.
        scale_range: range of the uniform scale ``s``. hflip_prob: flip probability.

    Returns:
        ``(image (3, S, S) float32, masks (N, S, S) bool)``, aligned pixel for pixel.
    """
    out_img, out_masks, _ = lsj_with_certainty(image, masks, None, rng=rng, image_size=image_size,
                                               scale_range=scale_range, hflip_prob=hflip_prob)
    return out_img, out_masks


def lsj_with_certainty(image: torch.Tensor, masks: torch.Tensor, certainty: torch.Tensor | None, *,
                       rng: np.random.Generator, image_size: int, scale_range: tuple[float, float] = (0.1, 2.0),
                       hflip_prob: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`lsj` that also carries one certainty map per mask through the same crop, resize, pad and flip.

    The same draws from ``rng`` as :func:`lsj`, so image and masks are the same with or without certainty.

    Args:
        image, masks, rng, image_size, scale_range, hflip_prob: as :func:`lsj`.
        certainty: (N, H, W) float32 in [0, 1], or None. Resized bilinearly (antialiased), padded with
            :data:`CERTAINTY_PAD`. It is resized as ``1 - c`` (the uncertainty), so that where ``c`` is 1 —
            ground truth, and pixels far from a pseudomask — it stays exactly 1 (a resized constant 1 may not).

    Returns:
        ``(image (3, S, S), masks (N, S, S) bool, certainty (N, S, S) float32 in [0, 1] or None)``.
    """
    _, height, width = image.shape
    s = rng.uniform(*scale_range)
    factor = min(image_size * s / height, image_size * s / width)
    new_h, new_w = max(round(height * factor), 1), max(round(width * factor), 1)
    crop_h, crop_w = min(new_h, image_size), min(new_w, image_size)
    y0 = int(rng.integers(0, new_h - crop_h + 1))
    x0 = int(rng.integers(0, new_w - crop_w + 1))
    flip = rng.random() < hflip_prob
    # Crop the source region first, so only what is kept gets resized (LSJ scales up to 2x).
    sy0, sx0 = math.floor(y0 / factor), math.floor(x0 / factor)
    sy1, sx1 = min(math.ceil((y0 + crop_h) / factor), height), min(math.ceil((x0 + crop_w) / factor), width)
    out_hw = (max(round((sy1 - sy0) * factor), 1), max(round((sx1 - sx0) * factor), 1))
    oy, ox = y0 - round(sy0 * factor), x0 - round(sx0 * factor)

    def place(t: torch.Tensor, *, masks: bool, fill: float, complement: bool = False) -> torch.Tensor:
        """Crop (then take ``1 - t`` if ``complement``), resize, paste top-left into an S x S canvas of ``fill``,
        flip."""
        region = t[:, sy0:sy1, sx0:sx1]
        region = _resize(1.0 - region if complement else region, out_hw, masks=masks)[:, oy:oy + crop_h,
                                                                                       ox:ox + crop_w]
        out = torch.full((t.shape[0], image_size, image_size), fill, dtype=region.dtype)
        out[:, :region.shape[1], :region.shape[2]] = region
        return out.flip(-1) if flip else out

    out_certainty = None
    if certainty is not None:
        uncertainty = place(certainty.float(), masks=False, fill=1.0 - CERTAINTY_PAD, complement=True)
        out_certainty = (1.0 - uncertainty).clamp_(0.0, 1.0)
    return place(image, masks=False, fill=0.0), place(masks, masks=True, fill=False), out_certainty


def eval_size_hw(height: int, width: int, *, image_size: int, min_size: int | None = None,
                 max_size: int | None = None) -> tuple[int, int]:
    """The size an image is resized to for evaluation (before padding).

    With ``min_size``: detectron2's ``ResizeShortestEdge(min_size, max_size)`` — the shorter side to
    ``min_size``, then both scaled down so the longer side is at most ``max_size``, rounded half up. Without:
    the longer side to ``image_size``.

    Args:
        height, width: the image's size in pixels (> 0).
        image_size: side S of the square used when ``min_size`` is None.
        min_size: target of the shorter side, or None. max_size: cap of the longer side, or None (no cap).

    Returns:
        ``(h, w)`` in pixels, each >= 1.
    """
    if min_size is None:
        factor = image_size / max(height, width)
        return (min(max(round(height * factor), 1), image_size), min(max(round(width * factor), 1), image_size))
    scale = min_size / min(height, width)
    new_h, new_w = height * scale, width * scale
    if max_size is not None and max(new_h, new_w) > max_size:
        scale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return max(int(new_h + 0.5), 1), max(int(new_w + 0.5), 1)


def eval_padded_hw(inner_hw: tuple[int, int], *, image_size: int, min_size: int | None = None
                   ) -> tuple[int, int]:
    """The padded frame of one resized image: ``inner_hw`` rounded up to a multiple of ``SIZE_DIVISIBILITY``,
    or the ``image_size`` square when ``min_size`` is None."""
    if min_size is None:
        return image_size, image_size
    (h, w), d = inner_hw, SIZE_DIVISIBILITY
    return -(-h // d) * d, -(-w // d) * d


def eval_resize(image: torch.Tensor, *, image_size: int, min_size: int | None = None, max_size: int | None = None
                ) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize for evaluation (:func:`eval_size_hw`) and pad bottom/right (:func:`eval_padded_hw`).

    Args:
        image: (3, H, W) float32, normalised (padding is 0, the mean colour).
        image_size, min_size, max_size: see :func:`eval_size_hw`.

    Returns:
        ``(image (3, Hp, Wp), (h, w))``: the padded image — S x S without ``min_size``, else (h, w) rounded up
        to multiples of 32 — and the size ``(h, w)`` of the image inside it (top-left).
    """
    _, height, width = image.shape
    new_hw = eval_size_hw(height, width, image_size=image_size, min_size=min_size, max_size=max_size)
    out = image.new_zeros((3, *eval_padded_hw(new_hw, image_size=image_size, min_size=min_size)))
    out[:, :new_hw[0], :new_hw[1]] = _resize(image, new_hw, masks=False)
    return out, new_hw


class TrainDataset(torch.utils.data.Dataset):
    """Items are ``(index, seed)`` pairs from :class:`EpochBatchSampler`; each returns one augmented sample,
    with ``certainty`` when the sample carries ``uncertainty_maps``.

    Args:
        samples: the training images.
        image_size: side S of the square crops.
        scale_range: LSJ scale range. hflip_prob: flip probability.
    """

    def __init__(self, samples: Sequence[Sample], *, image_size: int, scale_range: tuple[float, float] = (0.1, 2.0),
                 hflip_prob: float = 0.5) -> None:
        self.samples = list(samples)
        self.image_size = image_size
        self.scale_range = scale_range
        self.hflip_prob = hflip_prob

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = item
        sample = self.samples[index]
        rgb = read_image_rgb(sample.path)
        height, width = rgb.shape[:2]
        masks = torch.from_numpy(rle_to_masks(sample.segmentations, height, width))
        certainty = None
        if sample.uncertainty_maps is not None:
            certainty = torch.from_numpy(read_certainty(sample.uncertainty_maps, (height, width)))
        image, masks, certainty = lsj_with_certainty(
            normalize(rgb), masks, certainty, rng=np.random.default_rng(seed), image_size=self.image_size,
            scale_range=self.scale_range, hflip_prob=self.hflip_prob)
        keep = masks.flatten(1).any(1)
        item = {"pixel_values": image, "mask_labels": masks[keep],
                "class_labels": torch.tensor(sample.labels, dtype=torch.int64)[keep],
                "weights": torch.tensor(sample.weights, dtype=torch.float32)[keep]}
        if certainty is not None:
            item["certainty"] = certainty[keep]
        return item


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Stack images to (B, 3, S, S); masks (float32 in {0, 1}), labels, weights and, when the items have it,
    ``certainty`` ((N_b, S, S) float32 in [0, 1]) stay per-image lists."""
    batch = {"pixel_values": torch.stack([it["pixel_values"] for it in items]),
             "mask_labels": [it["mask_labels"].float() for it in items],
             "class_labels": [it["class_labels"] for it in items],
             "weights": [it["weights"] for it in items]}
    if "certainty" in items[0]:
        batch["certainty"] = [it["certainty"] for it in items]
    return batch


class EpochBatchSampler(torch.utils.data.Sampler):
    """This worker's batches of one epoch: ``(index, augmentation seed)`` lists.

    The epoch's order is a permutation drawn from ``(seed, epoch)``, repeated to fill ``steps_per_epoch``
    global batches; global batch ``k`` is positions ``[k * B, (k + 1) * B)``, of which worker ``rank`` takes
    the slice ``[rank * B / W, (rank + 1) * B / W)``. ``skip_steps`` starts mid-epoch (resume).

    Args:
        n: dataset size (> 0). batch_size: global batch B, divisible by ``world_size`` W.
        seed: run seed. epoch: epoch number. rank, world_size: this worker and the number of workers.
        skip_steps: batches of this epoch already done.
    """

    def __init__(self, n: int, *, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                 skip_steps: int = 0) -> None:
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.rank, self.world_size, self.skip_steps = rank, world_size, skip_steps

    @staticmethod
    def steps_per_epoch(n: int, batch_size: int) -> int:
        return max(math.ceil(n / batch_size), 1)

    def __len__(self) -> int:
        return self.steps_per_epoch(self.n, self.batch_size) - self.skip_steps

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        steps = self.steps_per_epoch(self.n, self.batch_size)
        order = np.concatenate([rng.permutation(self.n) for _ in range(math.ceil(steps * self.batch_size / self.n))])
        seeds = rng.integers(0, 2**31 - 1, size=len(order))
        per = self.batch_size // self.world_size
        for step in range(self.skip_steps, steps):
            lo = step * self.batch_size + self.rank * per
            yield [(int(order[i]), int(seeds[i])) for i in range(lo, lo + per)]
