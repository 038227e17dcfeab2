"""Training data of teacher fine-tuning: fully annotated instances, prompts drawn from their GT masks, and the
cache of image embeddings.

Choices where the paper is silent (Sections 3.1, 3.4, 4.1 give only "prompts from GT"):

- A point prompt is the centre of a pixel drawn uniformly among the mask's pixels — the same convention as
  ``omnilabel split`` uses to simulate point annotations, so training and inference points agree.
- A box prompt is the mask's tight box in SAM's convention, inclusive pixel indices (a one-pixel mask at
  (x, y) gives ``[x, y, x, y]``, as ``segment_anything.utils.amg.batched_mask_to_box``; SAM's prompt
  encoder adds 0.5 to reach pixel centres), the convention of B_sam, the box of a stage-1 mask that
  prompts BP-SAM at inference (``omnilabel.teachers.pipeline``).
- Every box prompt is then jittered as in SAM's own training (SAM paper, appendix "Training algorithm";
  ``FinetuneConfig.box_jitter``, on by default): in SAM's input frame (after ``ResizeLongestSide``, where
  SAM's pixel limit was meant), each x coordinate moves by N(0, (0.1·w)²) and each y coordinate by
  N(0, (0.1·h)²), each move clipped to ±20 px; the box is re-ordered and clipped to the image's extent in
  that frame (``omnilabel.ops.boxes.jitter_boxes_xyxy``). At inference a box comes from Grounding DINO or
  a stage-1 mask, never exactly from the GT. Point prompts are not jittered: points are user clicks.
- BP-SAM (``points+boxes``) draws for each instance one of point, box or both with equal probability.
- Instances are drawn without replacement in seeded epochs: global batch position ``p`` of step ``s`` is
  instance ``perm_e[(s * B + p) mod N]`` with ``e = (s * B + p) // N`` and ``perm_e`` a permutation
  seeded by ``(seed, e)``. The prompt of that position (its box jitter drawn from the same generator,
  after the prompt's own draws), and the points its loss is sampled at, come from generators seeded by
  ``(seed, s, p)``. So what a run computes depends on the seed and the global batch size only, not on
  the number of workers, and resuming needs no saved RNG state: the step is the state.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from omnilabel.data.coco import resolve_image_path
from omnilabel.errors import InputError
from omnilabel.io import save_torch_atomic
from omnilabel.ops.boxes import masks_to_prompt_boxes_xyxy
from omnilabel.ops.masks import rle_to_masks, segmentation_to_rle

PromptMode = Literal["points", "boxes", "points+boxes", "refine"]
PROMPT_MODES: tuple[str, ...] = ("points", "boxes", "points+boxes", "refine")


def parse_prompt_mode(text: str) -> PromptMode:
    """``points``, ``boxes`` or ``points+boxes`` (also written ``points,boxes`` or ``boxes+points``), or
    ``refine`` (SUM's refinement module: a SAM mask's logits + its box + its point, ``teachers.uncertainty``).

    Raises:
        InputError: anything else.
    """
    if str(text).strip().lower() == "refine":
        return "refine"
    parts = {p.strip().lower() for p in str(text).replace(",", "+").split("+") if p.strip()}
    if parts == {"points"}:
        return "points"
    if parts == {"boxes"}:
        return "boxes"
    if parts == {"points", "boxes"}:
        return "points+boxes"
    raise InputError(f"--prompts must be points, boxes, points+boxes or refine, got {text!r}")


@dataclass(frozen=True)
class TrainImage:
    """A fully annotated image. ``path`` is its file; ``height``, ``width`` its COCO size in pixels."""

    image_id: int
    path: str
    height: int
    width: int


@dataclass(frozen=True)
class TrainInstance:
    """One GT mask to train on.

    Attributes:
        image_index: position of its image in the list of ``TrainImage``.
        annotation_id: its COCO annotation id.
        category_id: its COCO category id.
        rle: compressed COCO RLE, ``counts`` as str.
        uncertainty: for a pseudomask of SUM training (``--unlabeled``), its uncertainty map file; None for GT.
    """

    image_index: int
    annotation_id: int
    category_id: int
    rle: dict[str, Any]
    uncertainty: str | None = None


def _missing_images(missing: list[str], which: str) -> InputError:
    """The error for image files that are not there, listing the first 20."""
    return InputError(f"{len(missing)} image(s) {which} are missing (is --images right?)",
                      missing[:20] + ([f"... and {len(missing) - 20} more"] if len(missing) > 20 else []))


def _plain_rle(segmentation: Any, image: dict[str, Any]) -> dict[str, Any] | None:
    """A segmentation as compressed RLE with ``counts`` as str (it pickles and prints), None when empty."""
    rle = segmentation_to_rle(segmentation, int(image["height"]), int(image["width"]))
    if int(mask_utils.area(rle)) == 0:
        return None
    counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def collect_training_set(data: dict[str, Any], images_dir: str | Path, *, allow_outside_images: bool = False,
                         source: str = "<coco>", pseudo: bool = True) -> tuple[list[TrainImage], list[TrainInstance]]:
    """The images with masks and their non-crowd, non-empty masks, in file order.

    Args:
        data: a validated COCO dict (``omnilabel.data.coco.load_coco``).
        images_dir: folder the ``file_name``s are relative to.
        allow_outside_images: accept ``file_name``s outside ``images_dir``.
        source: the file's name, for errors.
        pseudo: also take pseudomasks (``omnilabel.source`` = ``pseudo``) as masks; False takes GT only (SUM
            training, where pseudomasks are the unlabelled data and never count as labels).

    Returns:
        ``(images, instances)``; every image has at least one instance.

    Raises:
        InputError: no annotation carries a usable segmentation, or an image file is missing.
    """
    images_by_id = {int(im["id"]): im for im in data["images"]}
    per_image: dict[int, list[TrainInstance]] = {}
    for ann in data["annotations"]:
        if ann.get("segmentation") is None or int(ann.get("iscrowd", 0)) == 1:
            continue
        if not pseudo and (ann.get("omnilabel") or {}).get("source") == "pseudo":
            continue
        im = images_by_id[int(ann["image_id"])]
        rle = _plain_rle(ann["segmentation"], im)
        if rle is None:
            continue
        per_image.setdefault(int(im["id"]), []).append(
            TrainInstance(image_index=-1, annotation_id=int(ann["id"]), category_id=int(ann["category_id"]), rle=rle))
    images: list[TrainImage] = []
    instances: list[TrainInstance] = []
    missing = []
    for im in data["images"]:
        anns = per_image.get(int(im["id"]))
        if not anns:
            continue
        path = resolve_image_path(Path(images_dir), im["file_name"], allow_outside_images=allow_outside_images)
        if not path.is_file():
            missing.append(f"{source}: image id={im['id']}: file_name: {path} not found")
        index = len(images)
        images.append(TrainImage(int(im["id"]), str(path), int(im["height"]), int(im["width"])))
        instances.extend(TrainInstance(index, a.annotation_id, a.category_id, a.rle) for a in anns)
    if missing:
        raise _missing_images(missing, "to train on")
    if not instances:
        raise InputError(f"{source}: no annotation carries a (non-crowd, non-empty) segmentation; "
                         "finetune-teacher trains on the fully annotated images")
    return images, instances


def collect_unlabeled(data: dict[str, Any], images_dir: str | Path, images: list[TrainImage], *, map_dir: str | Path,
                      allow_outside_images: bool = False, source: str = "<coco>") -> list[TrainInstance]:
    """SUM's unlabelled data: the pseudomasks of a file with uncertainty maps (``omnilabel uncertainty``).

    Only annotations with ``omnilabel.source`` = ``pseudo`` are taken (non-crowd, non-empty); GT annotations of
    the file are not (they are labels, given as the labelled file). Their images are added to ``images`` (an
    image already there, by id, must be the same file).

    Args:
        data: the validated pseudomask COCO dict.
        images_dir: folder its ``file_name``s are relative to.
        images: the run's images so far (the labelled ones); extended in place.
        map_dir: the folder relative map paths start from (the pseudomask file's folder).

    Returns:
        One ``TrainInstance`` per pseudomask, ``uncertainty`` its map file.

    Raises:
        InputError: no pseudomask; a pseudomask without a map (naming the annotation and field); a missing map
            or image; an image id that names another file in the labelled set.
    """
    from omnilabel.data.maps import uncertainty_map_paths

    pseudo = [a for a in data["annotations"] if (a.get("omnilabel") or {}).get("source") == "pseudo"
              and a.get("segmentation") is not None and int(a.get("iscrowd", 0)) != 1]
    if not pseudo:
        raise InputError(f"{source}: --unlabeled needs pseudomasks (omnilabel.source 'pseudo'); it has none")
    unscored = [a["id"] for a in pseudo if not (a.get("omnilabel") or {}).get("uncertainty")]
    if unscored:
        raise InputError(f"{source}: {len(unscored)} pseudomask(s) without an uncertainty map (omnilabel.uncertainty), "
                         f"e.g. annotation id={unscored[0]}; run `omnilabel uncertainty {Path(source).name} "
                         "--refiner R.pt` first")
    maps = uncertainty_map_paths(pseudo, base_dir=map_dir)
    index = {im.image_id: i for i, im in enumerate(images)}
    records = {int(im["id"]): im for im in data["images"]}
    out: list[TrainInstance] = []
    missing = []
    for ann in pseudo:
        im = records[int(ann["image_id"])]
        path = resolve_image_path(Path(images_dir), im["file_name"], allow_outside_images=allow_outside_images)
        i = index.get(int(im["id"]))
        if i is None:
            if not path.is_file():
                missing.append(f"{source}: image id={im['id']}: file_name: {path} not found")
            i = index[int(im["id"])] = len(images)
            images.append(TrainImage(int(im["id"]), str(path), int(im["height"]), int(im["width"])))
        elif Path(images[i].path) != path:
            raise InputError(f"{source}: image id={im['id']} is {path}, but the labelled file's image id={im['id']} "
                             f"is {images[i].path}; the two files must share one image id space")
        rle = _plain_rle(ann["segmentation"], im)
        if rle is None:
            continue
        out.append(TrainInstance(i, int(ann["id"]), int(ann["category_id"]), rle, str(maps[int(ann["id"])])))
    if missing:
        raise _missing_images(missing, "of the unlabelled file")
    return out


@functools.lru_cache(maxsize=8)
def _epoch_permutation(seed: int, epoch: int, n: int, stream: int = 0) -> np.ndarray:
    return np.random.default_rng([seed, epoch] + ([stream] if stream else [])).permutation(n)


def mixed_batch_instances(step: int, *, batch_size: int, n_labeled: int, n_unlabeled: int, seed: int, rank: int = 0,
                          world_size: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This worker's share of step ``step``'s global batch of SUM training: labelled and unlabelled 1:1.

    Odd global positions are unlabelled, even ones labelled (SUM's FT-Small/Medium mix is one labelled per
    unlabelled image; here per instance, so every worker gets both kinds). Each kind is drawn from its own
    seeded epochs, as ``batch_instances`` draws one.

    Returns:
        ``(positions, unlabeled (bool), indices)``: global positions, whether each is unlabelled, and its index
        into the labelled or the unlabelled instances.
    """
    local = batch_size // world_size
    positions = np.arange(rank * local, (rank + 1) * local, dtype=np.int64)
    unlabeled = positions % 2 == 1
    per_step = {False: (batch_size + 1) // 2, True: batch_size // 2}
    n = {False: n_labeled, True: n_unlabeled}
    indices = np.empty(len(positions), dtype=np.int64)
    for j, (pos, unl) in enumerate(zip(positions, unlabeled, strict=True)):
        s = step * per_step[bool(unl)] + int(pos) // 2
        size = n[bool(unl)]
        indices[j] = _epoch_permutation(seed, s // size, size, 1 if unl else 0)[s % size]
    return positions, unlabeled, indices


def batch_instances(step: int, *, batch_size: int, n_instances: int, seed: int, rank: int = 0,
                    world_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """This worker's share of step ``step``'s global batch.

    Args:
        step: 0-based step.
        batch_size: B, the global batch; a multiple of ``world_size``.
        n_instances: N instances to draw from.
        seed: the run's seed.
        rank: this worker, in [0, world_size).
        world_size: workers.

    Returns:
        ``(positions, indices)``: (B / world_size,) int64 global batch positions and the instance index at each.
    """
    local = batch_size // world_size
    positions = np.arange(rank * local, (rank + 1) * local, dtype=np.int64)
    stream = step * batch_size + positions
    indices = np.array([_epoch_permutation(seed, int(s // n_instances), n_instances)[s % n_instances]
                        for s in stream], dtype=np.int64)
    return positions, indices


def sample_prompt(mask: np.ndarray, mode: PromptMode, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A training prompt from a GT mask.

    Args:
        mask: (H, W) bool, non-empty.
        mode: ``points`` (a point), ``boxes`` (the box), ``points+boxes`` (point, box or both, 1/3 each).
        rng: the generator of this instance at this step.

    Returns:
        ``(point_xy, box_xyxy)``: (2,) and (4,) float64 pixel coordinates, all-NaN where the prompt has none;
        the point a pixel centre, the box the mask's tight box in SAM's convention (inclusive pixel indices),
        without jitter (that comes in SAM's input frame, ``finetune_run``).
    """
    kind = {"points": 0, "boxes": 1}.get(mode)
    if kind is None:
        kind = int(rng.integers(3))
    point = np.full(2, np.nan)
    box = np.full(4, np.nan)
    if kind in (0, 2):
        ys, xs = np.nonzero(mask)
        k = int(rng.integers(len(ys)))
        point = np.array([xs[k] + 0.5, ys[k] + 0.5])
    if kind in (1, 2):
        box = masks_to_prompt_boxes_xyxy(mask[None])[0]
    return point, box


def sample_unlabeled_prompt(mask: np.ndarray, certainty: np.ndarray, mode: PromptMode,
                            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``sample_prompt`` for a pseudomask: its point drawn with probability ∝ certainty ``c = 1 − u`` among the
    mask's pixels (SUM §3.2.2, ``omnilabel.ops.uncertainty.certainty_weighted_point``); the box as for GT."""
    from omnilabel.ops.uncertainty import certainty_weighted_point

    kind = {"points": 0, "boxes": 1}.get(mode)
    if kind is None:
        kind = int(rng.integers(3))
    point = np.full(2, np.nan)
    box = np.full(4, np.nan)
    if kind in (0, 2):
        point = certainty_weighted_point(mask, certainty, rng)
    if kind in (1, 2):
        box = masks_to_prompt_boxes_xyxy(mask[None])[0]
    return point, box


def decode_mask(instance: TrainInstance) -> np.ndarray:
    """(H, W) bool GT mask of an instance."""
    h, w = instance.rle["size"]
    return rle_to_masks([instance.rle], int(h), int(w))[0]


def mask_in_input_frame(mask: np.ndarray, *, input_size: tuple[int, int], image_size: int,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """A GT mask as SAM sees its image: resized like ``ResizeLongestSide``, then padded bottom-right.

    Bilinear with antialiasing, so the edge pixels carry the fraction of the object they cover.

    Args:
        mask: (H, W) bool at the original image size.
        input_size: ``(h', w')`` of the resized image (longest side ``image_size``).
        image_size: S, SAM's square input side.
        device: where to build it.

    Returns:
        (1, S, S) float32 in [0, 1].
    """
    m = torch.as_tensor(mask, device=device).to(torch.float32)[None, None]
    m = F.interpolate(m, size=tuple(input_size), mode="bilinear", align_corners=False, antialias=True)
    h, w = input_size
    m = F.pad(m, (0, image_size - w, 0, image_size - h))
    return m[0].clamp_(0.0, 1.0)


class EmbeddingCache:
    """Image-encoder outputs on disk, one ``<image_id>.pt`` per image, plus a bounded copy in memory.

    Each file holds ``{"features": (C, g, g) tensor, "input_size": [h', w'], "original_size": [H, W]}``.
    Files are written atomically, so a killed run leaves whole files only. The folder should be keyed by
    the encoder (the caller puts it under the encoder's sha256).

    Args:
        root: the folder (created).
        max_memory_bytes: embeddings kept in memory once read, up to this many bytes (then read from disk).
    """

    def __init__(self, root: str | Path, *, max_memory_bytes: int = 4 << 30) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_memory_bytes = int(max_memory_bytes)
        self._memory: dict[int, tuple[torch.Tensor, tuple[int, int], tuple[int, int]]] = {}
        self._bytes = 0

    def path(self, image_id: int) -> Path:
        return self.root / f"{int(image_id)}.pt"

    def has(self, image_id: int) -> bool:
        return self.path(image_id).is_file()

    def save(self, image_id: int, features: torch.Tensor, *, input_size: tuple[int, int],
             original_size: tuple[int, int]) -> None:
        """Store one image's (1, C, g, g) or (C, g, g) features."""
        obj = {"features": features.detach().reshape(features.shape[-3:]).cpu().contiguous(),
               "input_size": [int(v) for v in input_size], "original_size": [int(v) for v in original_size]}
        save_torch_atomic(obj, self.path(image_id))

    def load(self, image_id: int) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """``(features (C, g, g) on CPU, input_size, original_size)`` of one image."""
        hit = self._memory.get(int(image_id))
        if hit is not None:
            return hit
        obj = torch.load(self.path(image_id), map_location="cpu", weights_only=True)
        entry = (obj["features"], tuple(obj["input_size"]), tuple(obj["original_size"]))
        size = entry[0].numel() * entry[0].element_size()
        if self._bytes + size <= self.max_memory_bytes:
            self._memory[int(image_id)] = entry  # type: ignore[assignment]
            self._bytes += size
        return entry  # type: ignore[return-value]
