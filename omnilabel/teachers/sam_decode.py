"""What SAM's mask decoder takes and returns, and its one computation (``run_mask_decoder``).

The types ``SamTeacher`` (``omnilabel.teachers.sam``) passes around — an image's embedding, a batch of prompts, the
decoder's outputs with or without its tokens — and the decoder forward that inference, fine-tuning and UOIS-SAM's
discriminator share. ``omnilabel.teachers.sam`` re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class ImageEmbedding:
    """The encoder's output for one image.

    Attributes:
        features: (1, C, g, g) float tensor on the teacher's device (C = 256, g = 64 for official SAMs).
        original_size: ``(H, W)`` of the input image in pixels.
        input_size: ``(h', w')`` of the image after ``ResizeLongestSide``, before padding to a square.
    """

    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]


@dataclass
class SamOutput:
    """One mask per prompt, in the order the prompts were given.

    Attributes:
        masks: (N, H, W) bool at the original image size.
        iou_scores: (N,) float32 SAM's predicted IoU of each kept mask (not clipped; ~[0, 1] when trained).
        low_res_logits: (N, 4g, 4g) float32 mask logits at the decoder's resolution (256 x 256 for
            official SAMs), in the padded square input frame; usable as ``mask_logits`` of a later call.
    """

    masks: np.ndarray
    iou_scores: np.ndarray
    low_res_logits: np.ndarray


@dataclass
class MultimaskChunk:
    """SAM's 3 outputs for a chunk of single positive points, at the decoder's resolution only.

    Attributes:
        indices: (n,) int64 positions of these points in the ``decode_points_multimask`` input.
        low_res_logits: (n, 3, 4g, 4g) float32 mask logits in the padded square input frame, SAM's multimask
            outputs in decoder order (not sorted by area); ``SamTeacher.upsample`` turns rows into masks.
        iou_scores: (n, 3) float32 SAM's predicted IoU of each output.
    """

    indices: np.ndarray
    low_res_logits: np.ndarray
    iou_scores: np.ndarray


@dataclass
class DecoderOutput:
    """Everything SAM's mask decoder computes for B prompts (``run_mask_decoder``), all 4 outputs.

    Attributes:
        logits: (B, 4, 4g, 4g) float low-res mask logits: output 0 is the single-mask head, 1–3 the multimask
            heads (whole / part / sub-part, in decoder order).
        iou: (B, 4) float SAM's predicted IoU of each output.
        iou_token: (B, C) float the IoU token after the two-way transformer (``hs[:, 0]``).
        mask_tokens: (B, 4, C) float the 4 mask tokens after the two-way transformer (``hs[:, 1:5]``).
    """

    logits: torch.Tensor
    iou: torch.Tensor
    iou_token: torch.Tensor
    mask_tokens: torch.Tensor


@dataclass
class TokenChunk:
    """All 4 of SAM's outputs and its output tokens for a chunk of single positive points
    (``SamTeacher.decode_points_tokens``), as numpy on the CPU.

    Attributes:
        indices: (n,) int64 positions of these points in the input.
        low_res_logits: (n, 4, 4g, 4g) float32 mask logits in the padded square input frame (output 0 the single-mask
            head, 1–3 the multimask heads).
        iou_scores: (n, 4) float32 SAM's predicted IoU of each output.
        iou_token: (n, C) float32 the IoU token after the two-way transformer.
        mask_tokens: (n, 4, C) float32 the mask tokens after the two-way transformer.
    """

    indices: np.ndarray
    low_res_logits: np.ndarray
    iou_scores: np.ndarray
    iou_token: np.ndarray
    mask_tokens: np.ndarray


def run_mask_decoder(decoder: Any, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                     dense: torch.Tensor) -> DecoderOutput:
    """SAM's mask decoder (``MaskDecoder.predict_masks``), returning all 4 outputs and the output tokens.

    The one decoder computation of omnilabel: inference (``SamTeacher``), fine-tuning (one embedding per prompt,
    ``omnilabel.teachers.finetune``) and UOIS-SAM's discriminator (which reads the tokens) all run it. The numbers
    are ``predict_masks``' own: ``MaskDecoder.forward`` is this followed by slicing outputs 1–3 (multimask) or 0.
    Modules installed inside ``decoder.transformer`` (Stable-SAM's plugins) take part as they do in stock SAM.

    Args:
        decoder: a ``segment_anything`` ``MaskDecoder``.
        image_embeddings: (1, C, g, g) float, shared by every prompt (``predict_masks`` repeats it), or (B, C, g, g),
            row i the embedding of prompt i's image.
        image_pe: (1, C, g, g) float dense positional encoding (``PromptEncoder.get_dense_pe``).
        sparse: (B, T, C) float sparse prompt embeddings. dense: (B, C, g, g) float dense prompt embeddings.

    Returns:
        The ``DecoderOutput`` of the B prompts.
    """
    b = sparse.shape[0]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(b, -1, -1), sparse), dim=1)
    src = image_embeddings + dense  # a (1, ...) embedding broadcasts as predict_masks' repeat_interleave
    pos_src = image_pe.expand(b, -1, -1, -1)
    _, c, h, w = src.shape
    hs, src = decoder.transformer(src, pos_src, tokens)
    iou_token = hs[:, 0, :]
    mask_tokens = hs[:, 1 : 1 + decoder.num_mask_tokens, :]
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper_in = torch.stack([mlp(mask_tokens[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)],
                           dim=1)
    _, c, h, w = upscaled.shape
    logits = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
    return DecoderOutput(logits=logits, iou=decoder.iou_prediction_head(iou_token), iou_token=iou_token,
                         mask_tokens=mask_tokens)


@dataclass
class PromptBatch:
    """Prompts of one kind, ready for the prompt encoder (coordinates in the resized input frame).

    Attributes:
        indices: (B,) int64 positions of these prompts in the ``predict`` call.
        points: (B, 1, 2) float32 point xy, or None.
        point_labels: (B, 1) int32 point labels (1 = positive), or None.
        boxes: (B, 4) float32 box xyxy, or None.
        mask_logits: (B, 1, 4g, 4g) float32 low-res mask logits, or None.
        data: the ``prompt_data`` columns of ``predict`` restricted to ``indices``.
    """

    indices: np.ndarray
    points: torch.Tensor | None
    point_labels: torch.Tensor | None
    boxes: torch.Tensor | None
    mask_logits: torch.Tensor | None
    data: dict[str, Any] = field(default_factory=dict)

    def halves(self) -> tuple[PromptBatch, PromptBatch]:
        """The first and second half of the batch (B ≥ 2), for retrying after out-of-memory."""
        k = len(self.indices) // 2

        def cut(x: Any, part: slice) -> Any:
            return None if x is None else x[part]

        return tuple(  # type: ignore[return-value]
            PromptBatch(indices=self.indices[part], points=cut(self.points, part),
                        point_labels=cut(self.point_labels, part), boxes=cut(self.boxes, part),
                        mask_logits=cut(self.mask_logits, part),
                        data={key: take_rows(v, np.arange(len(self.indices))[part]) for key, v in self.data.items()})
            for part in (slice(0, k), slice(k, None)))

    @property
    def multimask_candidate(self) -> bool:
        """A single point with neither box nor mask: the ambiguous prompt SAM answers with 3 masks."""
        return (self.points is not None and self.points.shape[1] == 1 and self.boxes is None
                and self.mask_logits is None)


def take_rows(column: Any, idx: np.ndarray) -> Any:
    """Rows ``idx`` of a per-prompt column: an array or tensor indexed, a list picked."""
    if isinstance(column, (np.ndarray, torch.Tensor)):
        return column[idx]
    return [column[i] for i in idx]
