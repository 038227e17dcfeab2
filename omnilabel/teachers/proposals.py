"""Entity proposals as a label source: ``pseudomask --proposals ENTITIES.json``, the detector-free route.

``omnilabel entities`` writes class-agnostic, non-overlapping entity masks per image (E-SAM). For the images
that would need a detector — image-level tags (``tags``) and unlabelled images (``none``) — these masks
replace Grounding DINO → box-SAM: each entity is classified by CLIP's image tower and becomes a pseudomask
of its class as it is (it is already a SAM mask: no second SAM pass).

Classification of one entity (choices the papers leave open):

- **Crop.** The mask's tight box, grown by ``margin_frac`` (10 %) of its longer side on every side, then
  to a square around the box's centre (no aspect distortion when CLIP's square input is made from it);
  what falls outside the image is filled as below. The square is resized to the model's
  ``visual.image_size`` with torch (bicubic, antialiased, as open_clip's own transform) and normalised
  with the model's mean and std (``visual.preprocess_cfg``, else open_clip's OpenAI constants).
- **Fill.** Every pixel outside the mask, margin included, takes CLIP's mean pixel (``mean · 255``). It
  normalises to exactly 0, the input CLIP sees as "nothing in particular"; black, white or grey would be
  content (night, paper, fog) and pull the label toward classes of that colour. Pixels of other objects
  are masked out too, so an entity is judged by its own pixels and the margin gives it room, not context.
- **Text.** Every dataset class through ``ClipTextEncoder``'s template "a photo of a {name}.", plus the
  :data:`BACKGROUND_NAMES` ("a photo of a sky." …) that are not names of dataset classes.
- **Rule.** ``p = softmax(logit_scale · cos(image, text))`` over *all* dataset classes and the background
  names; the label is the allowed class with the highest ``p`` (the image's tags for ``tags``, every class
  for ``none``), its score that ``p``; an entity whose score is below ``threshold`` is dropped. Scoring
  against all classes and the background is what makes a single tag work: a softmax over the image's one
  tag alone would give every entity (sky, grass, the table under the cat) probability 1 for that tag.
- **Threshold** (``--proposal-threshold``, default 0.5): the label must hold the majority of CLIP's
  probability — more than every other class and the background together. It reads the same whatever the
  number of classes (a multiple of chance, 1 / (K + B), would not), and it keeps an entity only when CLIP
  is more sure of its label than of anything else combined: for pseudomasks, a missed object costs less
  than a confident wrong one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnilabel.errors import InputError
from omnilabel.instances import Instances
from omnilabel.io import read_json
from omnilabel.ops.boxes import masks_to_boxes_xyxy
from omnilabel.ops.masks import rle_area, rle_to_masks, segmentation_to_rle
from omnilabel.teachers.clip_text import ClipTextEncoder

__all__ = ["BACKGROUND_NAMES", "ClipImageClassifier", "ProposalConfig", "ProposalIndex", "background_names",
           "classify_entities", "label_entities", "masked_crops", "read_proposals", "square_windows_xyxy"]

#: What an entity that is no object looks like, for the text side of the softmax ("a photo of a sky.").
#: Stuff that covers large parts of photos; a name that is also a dataset class is left out (it is a class).
BACKGROUND_NAMES: tuple[str, ...] = ("background", "sky", "ground", "floor", "wall", "road", "grass", "water")

#: open_clip's OpenAI mean and std (``open_clip.constants``), for a model without ``visual.preprocess_cfg``.
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ProposalConfig:
    """How entity proposals are classified (see the module docstring).

    Attributes:
        threshold: an entity is kept when CLIP's probability of its label is at least this (majority: 0.5).
        margin_frac: the crop's margin on each side, as a fraction of the box's longer side (10 %).
    """

    threshold: float = 0.5
    margin_frac: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise InputError(f"--proposal-threshold must be in [0, 1], got {self.threshold}")
        if not 0.0 <= self.margin_frac <= 1.0:
            raise InputError(f"the proposal crop margin must be in [0, 1], got {self.margin_frac}")


def background_names(class_names: Iterable[str]) -> list[str]:
    """:data:`BACKGROUND_NAMES` less those that name a dataset class (case and ``_`` vs space ignored)."""
    taken = {n.replace("_", " ").strip().lower() for n in class_names}
    return [n for n in BACKGROUND_NAMES if n not in taken]


def square_windows_xyxy(boxes_xyxy: np.ndarray, *, margin_frac: float) -> np.ndarray:
    """The square crop window of each box: the box grown by ``ceil(margin_frac · L)`` on each side of its
    longer side L, the shorter side grown to the same length around the box's centre.

    Args:
        boxes_xyxy: (N, 4) pixel-edge boxes with integer corners (``masks_to_boxes_xyxy``).
        margin_frac: margin per side, as a fraction of the longer side, >= 0.

    Returns:
        (N, 4) int64 ``[x0, y0, x0 + S, y0 + S]``, S >= 1; it may reach outside the image.
    """
    b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4).round().astype(np.int64)
    bw, bh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    longer = np.maximum(bw, bh)
    # 1e-9: 0.1 * 40 is 4.000000000000001 in float64, and its margin is 4 px, not 5.
    margin = np.ceil(margin_frac * longer - 1e-9).astype(np.int64)
    side = np.maximum(longer + 2 * margin, 1)
    x0, y0 = b[:, 0] - (side - bw) // 2, b[:, 1] - (side - bh) // 2
    return np.stack([x0, y0, x0 + side, y0 + side], axis=1)


def masked_crops(image_rgb: np.ndarray, masks: np.ndarray, *, size_hw: tuple[int, int], margin_frac: float,
                 fill_rgb: Sequence[float]) -> tuple[torch.Tensor, np.ndarray]:
    """One square crop per mask, pixels outside the mask set to ``fill_rgb``, resized to ``size_hw``.

    Args:
        image_rgb: (H, W, 3) uint8.
        masks: (N, H, W) bool, each non-empty.
        size_hw: output size (CLIP's ``visual.image_size``).
        margin_frac: see ``square_windows_xyxy``.
        fill_rgb: 3 values in [0, 255] for every pixel outside the mask (and outside the image).

    Returns:
        ``(crops (N, 3, h, w) float32 in [0, 255], windows (N, 4) int64 xyxy in image pixels)``. A window
        already of ``size_hw`` is not resampled: its crop is the image's pixels exactly.
    """
    h, w = image_rgb.shape[:2]
    windows = square_windows_xyxy(masks_to_boxes_xyxy(masks), margin_frac=margin_frac)
    fill = np.asarray(fill_rgb, dtype=np.float32).reshape(1, 1, 3)
    out = torch.empty((len(masks), 3, *size_hw), dtype=torch.float32)
    for n, (x0, y0, x1, y1) in enumerate(windows.tolist()):
        crop = np.broadcast_to(fill, (y1 - y0, x1 - x0, 3)).copy()
        ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        inside = masks[n, iy0:iy1, ix0:ix1]
        crop[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0][inside] = image_rgb[iy0:iy1, ix0:ix1][inside]
        t = torch.from_numpy(crop).permute(2, 0, 1).unsqueeze(0)
        if t.shape[-2:] != tuple(size_hw):
            t = torch.nn.functional.interpolate(t, size=tuple(size_hw), mode="bicubic", align_corners=False,
                                                antialias=True).clamp_(0.0, 255.0)
        out[n] = t[0]
    return out, windows


def label_entities(probs: np.ndarray, *, class_ids: Sequence[int], allowed_ids: Sequence[int],
                   threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rule of the module docstring: the allowed class of highest probability, kept at >= ``threshold``.

    Args:
        probs: (N, C) float, rows summing to 1 over the K = ``len(class_ids)`` classes (first K columns) and
            any background texts after them.
        class_ids: the K category ids of the first K columns.
        allowed_ids: the ids the label may take (a non-empty subset of ``class_ids``).
        threshold: in [0, 1].

    Returns:
        ``(category_ids (N,) int64, scores (N,) float64, keep (N,) bool)``; ties go to the lower id.

    Raises:
        ValueError: no allowed id, or one that is not in ``class_ids``.
    """
    ids = list(class_ids)
    allowed = sorted(set(int(c) for c in allowed_ids))
    missing = [c for c in allowed if c not in ids]
    if not allowed or missing:
        raise ValueError(f"allowed_ids must be a non-empty subset of class_ids; not there: {missing}")
    p = np.asarray(probs, dtype=np.float64)
    sub = p[:, [ids.index(c) for c in allowed]]
    best = sub.argmax(axis=1)
    scores = sub[np.arange(len(p)), best]
    return np.asarray(allowed, dtype=np.int64)[best], scores, scores >= threshold


class ClipImageClassifier:
    """CLIP's image tower on masked entity crops, scored against the text embeddings of names.

    Args:
        model: an ``open_clip`` ``CLIP`` with both towers (``encode_image``, ``encode_text``, ``logit_scale``).
        tokenizer: its ``open_clip`` tokenizer.
        device: where both towers run.
        crop_batch: crops per image-tower forward pass (a memory knob; the output does not depend on it
            beyond float rounding).

    Attributes:
        text: the ``ClipTextEncoder`` on the same model (caches each name's embedding for the job).
        size_hw: the image tower's input size. mean_rgb, std_rgb: its normalisation, in [0, 1].
        image_calls: image-tower forward passes run so far.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, device: str | torch.device = "cpu",
                 crop_batch: int = 64) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.text = ClipTextEncoder(self.model, tokenizer, device=self.device)
        self.crop_batch = int(crop_batch)
        size = getattr(model.visual, "image_size", 224)
        self.size_hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        cfg = getattr(model.visual, "preprocess_cfg", None) or {}
        self.mean_rgb = tuple(float(v) for v in cfg.get("mean", _OPENAI_MEAN))
        self.std_rgb = tuple(float(v) for v in cfg.get("std", _OPENAI_STD))
        self.image_calls = 0
        self._text: dict[tuple[str, ...], torch.Tensor] = {}

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str], *, model_name: str = "ViT-B-32",
                        device: str | torch.device = "cpu", allow_download: bool = True) -> ClipImageClassifier:
        """Load an ``open_clip`` checkpoint with both towers (as ``ClipTextEncoder.from_pretrained`` does,
        without dropping the image tower).

        Raises:
            CheckpointError: unknown architecture, a missing checkpoint, or keys or shapes that do not match.
        """
        from omnilabel.teachers.clip_text import load_open_clip

        model, tokenizer = load_open_clip(name_or_path, model_name=model_name, allow_download=allow_download)
        return cls(model, tokenizer, device=device)

    @property
    def fill_rgb(self) -> tuple[float, float, float]:
        """The colour of masked-out pixels: CLIP's mean pixel in [0, 255] (0 after normalisation)."""
        return tuple(255.0 * m for m in self.mean_rgb)  # type: ignore[return-value]

    @property
    def logit_scale(self) -> float:
        """CLIP's learned softmax temperature, ``exp(logit_scale)`` (100 for trained CLIPs)."""
        return float(self.model.logit_scale.detach().exp().clamp(max=100.0))

    def text_embeddings(self, names: Sequence[str]) -> torch.Tensor:
        """(C, D) float32 unit rows on ``device``, one text-tower pass per new name for the whole job."""
        key = tuple(names)
        if key not in self._text:
            self._text[key] = torch.from_numpy(self.text.encode(list(names))).to(self.device)
        return self._text[key]

    def embed_crops(self, crops: torch.Tensor) -> torch.Tensor:
        """Unit image embeddings of crops from ``masked_crops``: (N, 3, h, w) in [0, 255] → (N, D) float32."""
        mean = torch.tensor(self.mean_rgb).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std_rgb).view(1, 3, 1, 1) * 255.0
        x = ((crops - mean) / std).to(self.device)
        with torch.inference_mode():
            feats = self.model.encode_image(x).float()
        self.image_calls += 1
        return torch.nn.functional.normalize(feats, dim=-1)

    def probabilities(self, image_rgb: np.ndarray, masks_rle: Sequence[Mapping[str, Any]], names: Sequence[str], *,
                      margin_frac: float) -> np.ndarray:
        """CLIP's probabilities of each name for each entity of one image.

        Masks are decoded and cropped ``crop_batch`` at a time, one image-tower pass per chunk.

        Args:
            image_rgb: (H, W, 3) uint8.
            masks_rle: N compressed RLEs of (H, W), each non-empty.
            names: the C texts (class names, then background names).
            margin_frac: see ``square_windows_xyxy``.

        Returns:
            (N, C) float64, rows summing to 1.
        """
        h, w = image_rgb.shape[:2]
        text = self.text_embeddings(names)
        out = np.zeros((len(masks_rle), len(names)), dtype=np.float64)
        for start in range(0, len(masks_rle), self.crop_batch):
            masks = rle_to_masks(list(masks_rle[start:start + self.crop_batch]), h, w)
            crops, _ = masked_crops(image_rgb, masks, size_hw=self.size_hw, margin_frac=margin_frac,
                                    fill_rgb=self.fill_rgb)
            logits = self.logit_scale * self.embed_crops(crops) @ text.T
            out[start:start + len(masks)] = torch.softmax(logits.double(), dim=-1).cpu().numpy()
        return out


def classify_entities(classifier: ClipImageClassifier, image_rgb: np.ndarray,
                      entities: Sequence[Mapping[str, Any]], *, allowed_ids: Sequence[int],
                      categories: Mapping[int, str], config: ProposalConfig) -> tuple[Instances, dict[str, int]]:
    """Label the entities of one image (the rule of the module docstring).

    Args:
        classifier: the CLIP.
        image_rgb: (H, W, 3) uint8.
        entities: ``{"entity_id": k, "segmentation": RLE}`` each (``read_proposals``).
        allowed_ids: the classes a label may take (the image's tags, or every class).
        categories: category id → name of the whole dataset (all are scored).
        config: threshold and crop margin.

    Returns:
        ``(instances, counts)``: the kept entities, in input order, with their masks as RLE, ``scores``
        (CLIP's probability of the label), ``category_ids`` and ``data["entity_id"]``; counts of entities
        dropped as ``empty`` (no pixel) and ``below_threshold``.

    Raises:
        InputError: an entity's mask is not of the image's size.
    """
    h, w = image_rgb.shape[:2]
    rles: list[dict[str, Any]] = []
    entity_ids: list[int] = []
    empty = 0
    for ent in entities:
        seg = ent["segmentation"]
        if [int(v) for v in seg["size"]] != [h, w]:
            raise InputError(f"entity {ent['entity_id']}: segmentation.size: {list(seg['size'])}, but the image "
                             f"is {h}x{w}")
        if rle_area(seg) == 0:
            empty += 1
            continue
        rles.append(dict(seg))
        entity_ids.append(int(ent["entity_id"]))
    class_ids = sorted(categories)
    names = [categories[c] for c in class_ids] + background_names(categories.values())
    if rles and allowed_ids:
        probs = classifier.probabilities(image_rgb, rles, names, margin_frac=config.margin_frac)
        labels, scores, keep = label_entities(probs, class_ids=class_ids, allowed_ids=allowed_ids,
                                              threshold=config.threshold)
    else:
        labels, scores, keep = (np.zeros(len(rles), np.int64), np.zeros(len(rles)), np.zeros(len(rles), bool))
    idx = np.flatnonzero(keep)
    inst = Instances((h, w), masks=[rles[i] for i in idx], scores=scores[idx], category_ids=labels[idx],
                     data={"entity_id": np.asarray(entity_ids, dtype=np.int64)[idx]})
    return inst, {"empty": empty, "below_threshold": int(len(rles) - len(idx))}


# --- the entities file -------------------------------------------------------------------------------------------


@dataclass
class ProposalIndex:
    """What a job takes from an entities file, read once on the driver.

    Attributes:
        entities: image id → its entities (``{"entity_id", "segmentation"}``, file order), for the images asked
            for that the file has (an empty list: the file has the image and no entity on it).
        missing: the image ids asked for that the file does not have, ascending.
    """

    entities: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    missing: list[int] = field(default_factory=list)


def _basename(file_name: Any) -> str:
    return str(file_name).replace("\\", "/").rsplit("/", 1)[-1]


def read_proposals(path: str | Path, images: Sequence[Mapping[str, Any]], *, need: Iterable[int],
                   source: str = "<coco>") -> ProposalIndex:
    """Read and check an entities file (``omnilabel entities``) against the job's input, once.

    Images are joined by id; an image of the proposals file that the input does not have is ignored.

    Args:
        path: the entities COCO file.
        images: the input's ``images`` records (``id``, ``file_name``, ``height``, ``width``).
        need: the ids of the images whose entities the job uses.
        source: the input file's name, for messages.

    Returns:
        The ``ProposalIndex`` of the needed images.

    Raises:
        InputError: not JSON or not a COCO file; not an entities file (``info.omnilabel.command`` is another
            command, or an annotation without ``omnilabel.source: entity`` and an integer
            ``omnilabel.entity_id``); an image whose ``file_name`` (compared by base name), ``height`` or
            ``width`` differs from the input's; a segmentation that is not a mask of its image's size.
            Each message names the file, the record and the field.
    """
    path = Path(path)
    raw = read_json(path)
    if not (isinstance(raw, dict) and isinstance(raw.get("images"), list)
            and isinstance(raw.get("annotations"), list)):
        raise InputError(f"{path}: not a COCO entities file (it needs `images` and `annotations` lists); make one "
                         f"with `omnilabel entities`")
    info = raw.get("info")
    meta = info.get("omnilabel") if isinstance(info, dict) else None
    command = meta.get("command") if isinstance(meta, dict) else None
    if command is not None and command != "entities":
        raise InputError(f"{path}: info.omnilabel.command: {command!r}: this is the output of `omnilabel {command}`, "
                         "not an entities file; make one with `omnilabel entities`")
    inputs = {int(im["id"]): im for im in images}
    sizes: dict[int, tuple[int, int]] = {}
    for rec in raw["images"]:
        image_id = rec.get("id") if isinstance(rec, dict) else None
        if not isinstance(image_id, int) or image_id not in inputs:
            continue
        ours = inputs[image_id]
        if _basename(rec.get("file_name")) != _basename(ours["file_name"]):
            raise InputError(f"{path}: image id={image_id}: file_name: {rec.get('file_name')!r}, but {source} has "
                             f"{ours['file_name']!r} for that id: the proposals were made from another COCO file")
        for key in ("height", "width"):
            if rec.get(key) != ours[key]:
                raise InputError(f"{path}: image id={image_id}: {key}: {rec.get(key)!r}, but {source} has "
                                 f"{ours[key]!r}")
        sizes[image_id] = (int(ours["height"]), int(ours["width"]))
    wanted = set(int(i) for i in need)
    out = ProposalIndex(entities={i: [] for i in sorted(wanted & set(sizes))}, missing=sorted(wanted - set(sizes)))
    for k, ann in enumerate(raw["annotations"]):
        where = f"{path}: annotation id={ann.get('id') if isinstance(ann, dict) else None} (#{k})"
        meta = ann.get("omnilabel") if isinstance(ann, dict) else None
        entity_id = meta.get("entity_id") if isinstance(meta, dict) else None
        if not isinstance(meta, dict) or meta.get("source") != "entity" or not isinstance(entity_id, int):
            raise InputError(f"{where}: omnilabel.entity_id: {entity_id!r} (omnilabel.source "
                             f"{meta.get('source') if isinstance(meta, dict) else None!r}): not an entity; "
                             "--proposals takes the output of `omnilabel entities`")
        image_id = ann.get("image_id")
        if image_id not in out.entities:
            continue
        h, w = sizes[image_id]
        try:
            rle = segmentation_to_rle(ann["segmentation"], h, w)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{where}: segmentation: not a mask ({exc})") from None
        if [int(v) for v in rle["size"]] != [h, w]:
            raise InputError(f"{where}: segmentation.size: {list(rle['size'])}, but image id={image_id} is {h}x{w}")
        counts = rle["counts"]
        out.entities[image_id].append({"entity_id": entity_id, "segmentation": {
            "size": [h, w], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}})
    return out
