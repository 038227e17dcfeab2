"""Class-aware SAM: a ControlNet-style class prompt, Eq. (1)–(2) of the omni-supervised paper.

::

    Z_text   = F_train(P_geom) + CLIP_text(P_cls)
    Z_merged = G_zero(Z_text) + F_locked(P_geom)

F_locked is SAM's prompt encoder, frozen; F_train a trainable copy of it; CLIP_text the CLIP text embedding
of the instance's class name; G_zero a fully connected layer initialised to zeros, so that an untrained
module leaves SAM's prompt embeddings, and hence its masks, exactly unchanged. Z_merged goes to the mask
decoder as the sparse prompt embedding.

Choices where the paper is silent:

- CLIP's text width (512 for ViT-B-32) is mapped to SAM's prompt width (256) by a trainable linear layer
  before the sum; when the widths are equal the embedding is added as is.
- The class embedding is added to every sparse token of the instance's prompt (the point token and its
  padding token, or the two box-corner tokens, or all three for point + box).
- The dense (mask) embedding is F_locked's: the class prompt only touches the sparse tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from omnilabel.errors import InputError
from omnilabel.teachers.sam import PromptBatch, SamTeacher, SamTeacherConfig

if TYPE_CHECKING:
    from segment_anything.modeling import PromptEncoder, Sam

    from omnilabel.teachers.clip_text import ClipTextEncoder

__all__ = ["ClassAwarePrompt", "ClassAwareSamTeacher"]


class ClassAwarePrompt(nn.Module):
    """The trainable part of the class prompt: F_train, the text projection and G_zero.

    F_locked is not held here: it is SAM's own prompt encoder, passed to ``forward``, so that a teacher file
    stores it once and this module's state dict holds only what the class prompt adds.

    Args:
        prompt_encoder: SAM's prompt encoder; F_train starts as a copy of it.
        text_dim: D, the width of the class (CLIP text) embeddings.

    Attributes:
        trainable: F_train, a ``PromptEncoder``.
        text_proj: D → C linear layer, or ``Identity`` when D = C (C = SAM's prompt width, 256).
        zero: G_zero, C → C linear layer with zero weight and bias at construction.
    """

    def __init__(self, prompt_encoder: PromptEncoder, *, text_dim: int) -> None:
        super().__init__()
        embed_dim = int(prompt_encoder.embed_dim)
        self.text_dim = int(text_dim)
        self.trainable = copy.deepcopy(prompt_encoder)
        self.text_proj: nn.Module = nn.Identity() if self.text_dim == embed_dim else nn.Linear(self.text_dim, embed_dim)
        self.zero = nn.Linear(embed_dim, embed_dim)
        nn.init.zeros_(self.zero.weight)
        nn.init.zeros_(self.zero.bias)

    def forward(
        self,
        locked: PromptEncoder,
        *,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
        text_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed one batch of prompts with their classes.

        Args:
            locked: F_locked, SAM's (frozen) prompt encoder.
            points: ``(coords (B, N, 2) float, labels (B, N) int)`` in the resized input frame, or None.
            boxes: (B, 4) float xyxy in the resized input frame, or None.
            masks: (B, 1, 4g, 4g) float mask logits, or None.
            text_embeddings: (B, D) float class embedding of each prompt.

        Returns:
            sparse: (B, T, C) Z_merged; dense: (B, C, g, g) F_locked's dense embedding.
        """
        sparse_locked, dense = locked(points=points, boxes=boxes, masks=masks)
        sparse_train, _ = self.trainable(points=points, boxes=boxes, masks=None)
        text = self.text_proj(text_embeddings.to(sparse_train.dtype))
        z_text = sparse_train + text[:, None, :]
        return self.zero(z_text) + sparse_locked, dense


class ClassAwareSamTeacher(SamTeacher):
    """A ``SamTeacher`` whose prompts carry their class through a ``ClassAwarePrompt``.

    Every ``predict`` call must pass ``prompt_data={"category_ids": ...}`` (the pipeline always does); each
    id is looked up in ``categories`` and its name embedded by CLIP once (``ClipTextEncoder`` caches per
    name, and this teacher keeps the tensors per name on its device).

    Args:
        sam: the SAM model (its prompt encoder is F_locked).
        class_prompt: the trained (or fresh) class module.
        text_encoder: CLIP text embeddings of class names; its width must equal ``class_prompt.text_dim``.
        categories: category id → class name.
        config: inference settings.
        device: torch device string.

    Raises:
        InputError: the CLIP width differs from the class module's.
    """

    def __init__(self, sam: Sam, class_prompt: ClassAwarePrompt, text_encoder: ClipTextEncoder,
                 categories: Mapping[int, str], *, config: SamTeacherConfig | None = None,
                 device: str = "cpu") -> None:
        super().__init__(sam, config=config, device=device)
        if text_encoder.width != class_prompt.text_dim:
            raise InputError(f"the CLIP text encoder is {text_encoder.width} wide but the class module expects "
                             f"{class_prompt.text_dim}; use the CLIP the teacher was trained with")
        self.class_prompt = class_prompt.to(self.device).eval()
        self.text_encoder = text_encoder
        self.categories = {int(k): str(v) for k, v in categories.items()}
        self._text: dict[str, torch.Tensor] = {}

    def class_embeddings(self, category_ids: Sequence[int] | np.ndarray) -> torch.Tensor:
        """CLIP text embeddings of the classes of prompts.

        Args:
            category_ids: (B,) int COCO category ids, each a key of ``categories``.

        Returns:
            (B, D) float32 on the teacher's device.

        Raises:
            InputError: an id is not a known category.
        """
        ids = [int(c) for c in np.asarray(category_ids).reshape(-1)]
        unknown = sorted({c for c in ids if c not in self.categories})
        if unknown:
            raise InputError(f"class-aware SAM: category ids {unknown} are not among the dataset's categories "
                             f"{sorted(self.categories)}")
        names = [self.categories[c] for c in ids]
        new = [n for n in dict.fromkeys(names) if n not in self._text]
        if new:
            rows = self.text_encoder.encode(new)
            for name, row in zip(new, rows, strict=True):
                self._text[name] = torch.as_tensor(row, dtype=torch.float32, device=self.device)
        if not names:
            return torch.zeros((0, self.class_prompt.text_dim), dtype=torch.float32, device=self.device)
        return torch.stack([self._text[n] for n in names])

    def encode_prompts(self, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Z_merged of Eq. (2) for one batch; the classes come from ``batch.data["category_ids"]``.

        Raises:
            InputError: the ``predict`` call gave no ``category_ids``.
        """
        category_ids: Any = batch.data.get("category_ids")
        if category_ids is None:
            raise InputError("a class-aware SAM needs the class of every prompt: "
                             "predict(..., prompt_data={'category_ids': ...})")
        text = self.class_embeddings(category_ids)
        points = None if batch.points is None else (batch.points, batch.point_labels)
        return self.class_prompt(self.sam.prompt_encoder, points=points, boxes=batch.boxes,
                                 masks=batch.mask_logits, text_embeddings=text)
