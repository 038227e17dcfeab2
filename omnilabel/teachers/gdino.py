"""Grounding DINO teacher: class names in, scored boxes out.

A ``GDinoTeacher`` wraps ``transformers``' ``GroundingDinoForObjectDetection`` and its processor, loaded from a
local directory in the Hugging Face format (``IDEA-Research/grounding-dino-tiny|base``, or a tiny random model
from ``omnilabel.models.tiny_gdino``). ``detect`` prompts it with ``"class 1. class 2. … class k."`` and turns
per-token scores into per-class detections:

1. Chunking: GDino reads at most 256 text tokens. When the prompt of all classes is longer, the classes are
   packed into the fewest chunks that fit (``chunk_class_names``), one forward pass per chunk per image.
2. Phrase → class: each class's tokens in the prompt are found from the tokenizer's character offsets, so
   multi-word names ("traffic light") and word pieces ("toothbrush" → "tooth", "##brush") map back to one
   class. A query's score for a class is the max sigmoid logit over that class's tokens — GDino's own box
   confidence is the max over tokens, and the max keeps a name's score independent of how many pieces it
   splits into (a mean would punish long names). A detection takes the argmax class and that score.
3. Boxes: GDino predicts normalised ``(cx, cy, w, h)`` relative to the unpadded, resized image, so they scale
   to the original pixels directly (as in ``post_process_grounded_object_detection``).
4. Filtering (paper §4.1): confidence >= 0.3, then NMS at IoU 0.9, then at most ``max_detections``.

NMS is class-wise by default. The paper says only "NMS using GDino confidence scores". Each query already
carries a single class (its argmax), so 0.9-IoU duplicates within a class are the redundant boxes the paper
filters; across classes, a near-identical box usually means two tagged classes on one object, and
class-agnostic NMS would silently drop one of the image's tags. Class-wise NMS also makes the merge of
chunks exact: a class lives in one chunk, so the result does not depend on how classes were grouped.
``nms_mode="agnostic"`` is available.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from omnilabel.errors import CheckpointError, InputError
from omnilabel.instances import Instances
from omnilabel.models.precision import autocast
from omnilabel.ops.nms import nms_xyxy

NmsMode = Literal["class_wise", "agnostic"]

#: Characters GDino treats as phrase delimiters; they cannot appear inside a class name.
_DELIMITERS = (".", "?")


@dataclass(frozen=True)
class GDinoConfig:
    """Settings of the Grounding DINO teacher."""

    #: Paper §4.1: confidence threshold 0.3 (none/tags settings); Algorithm 1 uses τ_c = 0.1 instead.
    box_threshold: float = 0.3
    #: Paper §4.1: NMS threshold 0.9 on GDino scores.
    nms_iou: float = 0.9
    #: Not stated in the paper; class-wise (see the module docstring).
    nms_mode: NmsMode = "class_wise"
    #: GDino's text input cap (``max_text_len`` of the released models), [CLS] and [SEP] included.
    max_text_tokens: int = 256
    #: Detections kept per image after NMS (GDino has 900 queries per chunk).
    max_detections: int = 300

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 <= self.box_threshold <= 1.0:
            problems.append(f"box_threshold must be in [0, 1], got {self.box_threshold}")
        if not 0.0 <= self.nms_iou <= 1.0:
            problems.append(f"nms_iou must be in [0, 1], got {self.nms_iou}")
        if self.nms_mode not in ("class_wise", "agnostic"):
            problems.append(f"nms_mode must be 'class_wise' or 'agnostic', got {self.nms_mode!r}")
        if self.max_text_tokens < 4:
            problems.append(f"max_text_tokens must be >= 4, got {self.max_text_tokens}")
        if self.max_detections < 1:
            problems.append(f"max_detections must be >= 1, got {self.max_detections}")
        if problems:
            raise InputError("invalid GDinoConfig", problems)


def normalize_class_name(name: str) -> str:
    """The form a class name takes in a prompt: lower case, delimiters replaced by spaces, single spaces.

    Raises:
        InputError: the name is empty once normalised.
    """
    text = name.lower()
    for delim in _DELIMITERS:
        text = text.replace(delim, " ")
    text = " ".join(text.split())
    if not text:
        raise InputError(f"class name {name!r} is empty once delimiters and spaces are removed")
    return text


def build_prompt(class_names: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """GDino's text prompt ``"name 1. name 2. … name k."`` and where each name lies in it.

    Args:
        class_names: k names, normalised with ``normalize_class_name``.

    Returns:
        ``(prompt, spans)``: spans[i] is the ``[start, end)`` character range of name i in ``prompt``.
    """
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for name in class_names:
        text = normalize_class_name(name)
        spans.append((pos, pos + len(text)))
        parts.append(text + ".")
        pos += len(text) + 2  # the name, its ".", and the joining space
    return " ".join(parts), spans


def chunk_class_names(tokenizer: Any, class_names: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Pack classes into the fewest prompts of at most ``max_tokens`` tokens each.

    A class costs its name's tokens plus one for its "."; each prompt also holds [CLS] and [SEP]. Packing
    is first-fit decreasing (the exact minimum is bin packing; with names far shorter than the cap, FFD
    reaches the lower bound ``ceil(total / capacity)``). Within a chunk, classes keep their input order.

    Args:
        tokenizer: a BERT-style tokenizer with ``tokenize`` (WordPiece splits at spaces and punctuation, so a
            prompt's length is the sum of its parts).
        class_names: k names.
        max_tokens: the text cap, special tokens included.

    Returns:
        Lists of class indices; every index in ``range(k)`` is in exactly one chunk; ``[]`` when k = 0.

    Raises:
        InputError: one class name alone does not fit in ``max_tokens``.
    """
    capacity = max_tokens - 2
    costs = [len(tokenizer.tokenize(normalize_class_name(name))) + 1 for name in class_names]
    too_long = [f"{name!r}: {c} tokens" for name, c in zip(class_names, costs, strict=True) if c > capacity]
    if too_long:
        raise InputError(f"class names too long for a {max_tokens}-token GDino prompt", too_long)
    chunks: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        slot = next((c for c, r in enumerate(room) if r >= costs[i]), None)
        if slot is None:
            chunks.append([])
            room.append(capacity)
            slot = len(chunks) - 1
        chunks[slot].append(i)
        room[slot] -= costs[i]
    return [sorted(chunk) for chunk in chunks]


def class_token_indices(offsets: np.ndarray, char_spans: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Tokens of each class name, from the tokenizer's character offsets.

    Args:
        offsets: (T, 2) int ``[start, end)`` character range of each token; special tokens have ``start == end``.
        char_spans: k ``[start, end)`` character ranges of the names in the prompt.

    Returns:
        k (n_i,) int64 arrays of token positions, each non-empty.

    Raises:
        InputError: a name covers no token.
    """
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    real = off[:, 1] > off[:, 0]
    out = []
    for start, end in char_spans:
        idx = np.flatnonzero(real & (off[:, 0] >= start) & (off[:, 1] <= end))
        if idx.size == 0:
            raise InputError(f"the class name at characters {start}..{end} of the prompt has no tokens")
        out.append(idx)
    return out


def token_logits_to_class_scores(token_logits: np.ndarray, token_indices: Sequence[np.ndarray]) -> np.ndarray:
    """Per-class scores of each query: the max sigmoid over the class's tokens.

    Args:
        token_logits: (Q, T) float logits of Q queries over T text tokens; ``-inf`` where masked.
        token_indices: k arrays of token positions (from ``class_token_indices``).

    Returns:
        (Q, k) float64 in [0, 1].
    """
    logits = np.asarray(token_logits, dtype=np.float64)
    probs = 1.0 / (1.0 + np.exp(-np.clip(logits, -80.0, 80.0)))
    scores = np.zeros((logits.shape[0], len(token_indices)))
    for k, idx in enumerate(token_indices):
        scores[:, k] = probs[:, idx].max(axis=1)
    return scores


def load_gdino(model_dir: str | Path) -> tuple[Any, Any]:
    """Load a GDino model and its processor from a local Hugging Face directory, offline.

    Raises:
        CheckpointError: the directory or a file is missing or unreadable, weights are missing, unexpected or
            of the wrong shape, or the tokenizer's delimiter ids differ from those the model hardcodes.
    """
    from transformers import AutoProcessor, GroundingDinoForObjectDetection
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one job-level progress bar, not one per model load

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"no Grounding DINO checkpoint at {path}: config.json is missing "
                              "(`omnilabel weights list` names the downloadable ones)")
    try:
        model, info = GroundingDinoForObjectDetection.from_pretrained(path, local_files_only=True,
                                                                      output_loading_info=True)
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load Grounding DINO from {path}: {exc}") from exc
    # Buffers that older conversions saved and current models recompute are not weights.
    info["unexpected_keys"] = [k for k in info.get("unexpected_keys", []) if not str(k).endswith("position_ids")]
    problems = [f"{len(info[kind])} {kind.replace('_', ' ')}: {', '.join(sorted(map(str, info[kind]))[:8])}"
                for kind in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(kind)]
    if problems:
        raise CheckpointError(f"Grounding DINO weights in {path} do not match its config: " + "; ".join(problems))
    _check_delimiters(model, processor.tokenizer, path)
    return model.eval(), processor


def _check_delimiters(model: Any, tokenizer: Any, where: Any) -> None:
    """GDino splits phrases at hardcoded BERT ids; a tokenizer with other ids would merge all classes."""
    hardcoded = set(model.model.special_tokens.tolist())
    ids = {"[CLS]": tokenizer.cls_token_id, "[SEP]": tokenizer.sep_token_id,
           ".": tokenizer.convert_tokens_to_ids(".")}
    wrong = {tok: i for tok, i in ids.items() if i not in hardcoded}
    if wrong:
        raise CheckpointError(f"the tokenizer of {where} gives delimiter ids {wrong}; Grounding DINO splits "
                              f"phrases at ids {sorted(hardcoded)}")


class GDinoTeacher:
    """Grounding DINO detector: one forward pass per image per chunk of class names.

    Args:
        model_dir_or_model: a local Hugging Face directory, or a ``GroundingDinoForObjectDetection``
            (then ``processor`` is required).
        processor: the ``GroundingDinoProcessor`` of an in-memory model.
        config: thresholds and caps (``GDinoConfig()`` when None).
        device: where the model runs; on CUDA, inference uses bf16 (fp16 without bf16 support).

    Attributes:
        forward_calls: model forward passes run so far.
    """

    def __init__(self, model_dir_or_model: str | Path | Any, *, processor: Any = None,
                 config: GDinoConfig | None = None, device: str | torch.device = "cpu") -> None:
        if isinstance(model_dir_or_model, (str, Path)):
            model, processor = load_gdino(model_dir_or_model)
        else:
            if processor is None:
                raise InputError("GDinoTeacher: pass the processor along with an in-memory model")
            model = model_dir_or_model.eval()
            _check_delimiters(model, processor.tokenizer, "the given processor")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.processor = processor
        self.config = config if config is not None else GDinoConfig()
        self.max_text_tokens = min(self.config.max_text_tokens, int(model.config.max_text_len))
        self.forward_calls = 0

    def detect(self, image_rgb: np.ndarray, class_names: Sequence[str], *, category_ids: Sequence[int],
               box_threshold: float | None = None) -> Instances:
        """Detect the named classes in one image.

        Args:
            image_rgb: (H, W, 3) uint8 RGB.
            class_names: k names to look for.
            category_ids: k COCO category ids, ``category_ids[i]`` for ``class_names[i]``.
            box_threshold: overrides ``config.box_threshold`` for this call (e.g. τ_c = 0.1 of Algorithm 1).

        Returns:
            ``Instances`` with boxes_xyxy (M, 4) float64 pixels inside the image, scores (M,) float64 >= the
            threshold sorted descending, category_ids (M,) int64 from ``category_ids``; masks None.

        Raises:
            InputError: a bad image, mismatched names and ids, or a name that cannot be prompted.
        """
        image = np.asarray(image_rgb)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 1:
            raise InputError(f"GDino expects an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
        ids = np.asarray(category_ids, dtype=np.int64).reshape(-1)
        if len(ids) != len(class_names):
            raise InputError(f"{len(class_names)} class names but {len(ids)} category ids")
        height, width = image.shape[:2]
        if len(class_names) == 0:
            return Instances.empty((height, width))
        threshold = self.config.box_threshold if box_threshold is None else float(box_threshold)

        chunks = chunk_class_names(self.processor.tokenizer, class_names, self.max_text_tokens)
        pixels = self.processor.image_processor(images=image, return_tensors="pt", input_data_format="channels_last")
        boxes, scores, labels = [], [], []
        for chunk in chunks:
            class_scores, boxes_cxcywh = self._run_chunk(pixels, [class_names[i] for i in chunk])
            best = class_scores.argmax(axis=1)
            score = class_scores[np.arange(len(best)), best]
            keep = score >= threshold
            boxes.append(_to_pixels_xyxy(boxes_cxcywh[keep], height=height, width=width))
            scores.append(score[keep])
            labels.append(np.asarray(chunk, dtype=np.int64)[best[keep]])
        boxes_xyxy, score, label = np.concatenate(boxes), np.concatenate(scores), np.concatenate(labels)

        valid = (boxes_xyxy[:, 2] > boxes_xyxy[:, 0]) & (boxes_xyxy[:, 3] > boxes_xyxy[:, 1])
        boxes_xyxy, score, label = boxes_xyxy[valid], score[valid], label[valid]
        # Class-wise by category id, so synonyms of one category ("tv", "television") count as one class.
        keep = nms_xyxy(boxes_xyxy, score, iou_thresh=self.config.nms_iou,
                        labels=ids[label] if self.config.nms_mode == "class_wise" else None)
        keep = keep[: self.config.max_detections]
        return Instances((height, width), boxes_xyxy=boxes_xyxy[keep], scores=score[keep],
                         category_ids=ids[label[keep]])

    def _run_chunk(self, pixels: Any, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """One forward pass: (Q, k) class scores in [0, 1] and (Q, 4) normalised cxcywh boxes."""
        prompt, spans = build_prompt(names)
        text = self.processor.tokenizer(prompt, return_offsets_mapping=True, return_tensors="pt")
        offsets = text.pop("offset_mapping")[0].numpy()
        if text["input_ids"].shape[1] > self.max_text_tokens:
            raise InputError(f"prompt of {len(names)} classes has {text['input_ids'].shape[1]} tokens, "
                             f"over the {self.max_text_tokens}-token cap")
        token_indices = class_token_indices(offsets, spans)
        inputs = {k: v.to(self.device) for k, v in {**pixels, **text}.items()}
        with torch.inference_mode(), self._autocast():
            out = self.model(**inputs)
        self.forward_calls += 1
        logits = out.logits[0, :, : offsets.shape[0]].float().cpu().numpy()
        boxes = out.pred_boxes[0].float().cpu().numpy().astype(np.float64)
        return token_logits_to_class_scores(logits, token_indices), boxes

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return autocast(self.device)


def _to_pixels_xyxy(boxes_cxcywh: np.ndarray, *, height: int, width: int) -> np.ndarray:
    """(N, 4) normalised cxcywh → (N, 4) float64 pixel xyxy, clipped to the image."""
    b = np.asarray(boxes_cxcywh, dtype=np.float64).reshape(-1, 4)
    xyxy = np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], axis=1)
    xyxy *= np.array([width, height, width, height], dtype=np.float64)
    return np.clip(xyxy, 0.0, np.array([width, height, width, height], dtype=np.float64))
