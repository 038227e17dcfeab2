"""CLIP text embeddings of class names: ``CLIP_text(P_cls)`` of Eq. (1) in the omni-supervised paper.

The class-aware SAM adds a CLIP text embedding of each instance's class to its prompt tokens. Class names
repeat across a dataset, so :class:`ClipTextEncoder` keeps every embedding it computed and runs the text
tower once per new name per job.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnilabel.errors import CheckpointError

__all__ = ["PROMPT_TEMPLATE", "ClipTextEncoder", "load_open_clip"]

#: The text each class name is wrapped in. The paper does not give CLIP's prompt; this is CLIP's own
#: zero-shot template, the one its users expect.
PROMPT_TEMPLATE = "a photo of a {name}."


class ClipTextEncoder:
    """Unit-norm CLIP text embeddings of class names, computed once per name.

    Args:
        model: an ``open_clip`` model (``CLIP`` or ``CustomTextCLIP``); only ``encode_text`` is used.
        tokenizer: its ``open_clip`` tokenizer: a callable from a list of strings to (B, L) int64 tokens.
        device: where the text tower runs.
        batch_size: names per forward pass.

    Attributes:
        forward_calls: number of text-tower forward passes run so far.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, device: str | torch.device = "cpu",
                 batch_size: int = 256) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.forward_calls = 0
        self._cache: dict[str, np.ndarray] = {}
        self._width: int | None = None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        model_name: str = "ViT-B-32",
        device: str | torch.device = "cpu",
        allow_download: bool = True,
    ) -> ClipTextEncoder:
        """Load an ``open_clip`` checkpoint and keep its text tower.

        Args:
            name_or_path: a checkpoint file (``open_clip_pytorch_model.bin``, ``.pt`` or ``.safetensors``)
                or a registry name such as ``clip-vit-b-32`` (see :mod:`omnilabel.models.registry`).
            model_name: the ``open_clip`` architecture of the checkpoint (``ViT-B-32``), or the path of an
                ``open_clip`` model-config JSON (registered under its file stem).
            device: where the text tower runs.
            allow_download: whether a named checkpoint missing from the cache may be downloaded.

        Returns:
            An encoder in eval mode. The image tower is dropped after loading to free its memory.

        Raises:
            CheckpointError: unknown architecture, a missing checkpoint, or a checkpoint whose keys or shapes
                do not match the architecture.
        """
        model, tokenizer = load_open_clip(name_or_path, model_name=model_name, allow_download=allow_download)
        model.visual = torch.nn.Identity()
        return cls(model, tokenizer, device=device)

    @property
    def width(self) -> int:
        """D, the length of each embedding (the CLIP joint-space width, 512 for ViT-B-32)."""
        if self._width is None:
            self._width = _text_width(self.model, self.tokenizer, self.device)
        return self._width

    def encode(self, class_names: Sequence[str]) -> np.ndarray:
        """Embed class names, each through :data:`PROMPT_TEMPLATE`.

        Underscores in a name become spaces (``traffic_light`` → "a photo of a traffic light."). Names seen
        before come from the cache; the new ones go through the text tower in batches of ``batch_size``.

        Args:
            class_names: K names; repeats are allowed.

        Returns:
            (K, D) float32, each row L2-normalised, in the order of ``class_names``.
        """
        names = list(class_names)
        new = list(dict.fromkeys(n for n in names if n not in self._cache))
        for start in range(0, len(new), self.batch_size):
            chunk = new[start:start + self.batch_size]
            prompts = [PROMPT_TEMPLATE.format(name=n.replace("_", " ").strip()) for n in chunk]
            with torch.inference_mode():
                tokens = self.tokenizer(prompts).to(self.device)
                feats = self.model.encode_text(tokens).float()
                feats = torch.nn.functional.normalize(feats, dim=-1)
            self.forward_calls += 1
            for name, row in zip(chunk, feats.cpu().numpy(), strict=True):
                self._cache[name] = row.astype(np.float32)
        if not names:
            return np.zeros((0, self.width), dtype=np.float32)
        return np.stack([self._cache[n] for n in names]).astype(np.float32, copy=False)

    def clear_cache(self) -> None:
        """Forget every cached embedding."""
        self._cache.clear()


def _register_model_name(model_name: str) -> str:
    """Return an ``open_clip`` model name that ``create_model`` knows, registering configs as needed."""
    import open_clip

    from omnilabel.models.tiny_clip import TINY_CLIP_MODEL_NAME, register_tiny_clip_config

    if model_name in open_clip.list_models():
        return model_name
    if model_name == TINY_CLIP_MODEL_NAME:
        return register_tiny_clip_config()
    cfg = Path(model_name).expanduser()
    if cfg.suffix == ".json" and cfg.is_file():
        open_clip.add_model_config(cfg)
        if cfg.stem in open_clip.list_models():
            return cfg.stem
        raise CheckpointError(f"{cfg} is not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
    raise CheckpointError(
        f"unknown open_clip model {model_name!r}; use an open_clip model name such as 'ViT-B-32' "
        "or the path of a model-config JSON"
    )


def _text_width(model: torch.nn.Module, tokenizer, device: torch.device) -> int:
    proj = getattr(model, "text_projection", None)
    if isinstance(proj, torch.Tensor) and proj.ndim == 2:
        return int(proj.shape[1])
    text = getattr(model, "text", None)
    if text is not None and isinstance(getattr(text, "output_dim", None), int):
        return int(text.output_dim)
    with torch.inference_mode():
        return int(model.encode_text(tokenizer([""]).to(device)).shape[-1])


def load_open_clip(name_or_path: str | os.PathLike[str], *, model_name: str = "ViT-B-32",
                   allow_download: bool = True) -> tuple[torch.nn.Module, Any]:
    """An ``open_clip`` model (both towers, on the CPU) and its tokenizer, from a checkpoint file or a registry
    name (``ClipTextEncoder.from_pretrained`` for the arguments).

    Raises:
        CheckpointError: unknown architecture, a missing checkpoint, or keys or shapes that do not match.
    """
    import open_clip

    from omnilabel.models.registry import resolve

    path = resolve(name_or_path, kind="clip", allow_download=allow_download)
    if not path.is_file():
        raise CheckpointError(f"CLIP checkpoint {path} is not a file")
    model_name = _register_model_name(model_name)
    try:
        # weights_only: the checkpoint is read as tensors only, never as arbitrary pickled objects.
        model = open_clip.create_model(model_name, pretrained=str(path), weights_only=True, device="cpu")
    except (RuntimeError, ValueError, KeyError, OSError, AssertionError) as exc:
        # open_clip reports shape mismatches as RuntimeError, some as AssertionError.
        raise CheckpointError(
            f"could not load CLIP checkpoint {path} as open_clip model {model_name!r}: {exc}") from exc
    return model, open_clip.get_tokenizer(model_name)
