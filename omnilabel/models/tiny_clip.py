"""A tiny random OpenCLIP model of the real architecture, saved as an ``open_clip`` checkpoint.

Tests and the demo build it instead of downloading ``clip-vit-b-32``, then load it through
:meth:`omnilabel.teachers.clip_text.ClipTextEncoder.from_pretrained`, the path a real checkpoint takes. The
model is ``open_clip``'s ``CLIP`` class (text transformer with causal mask, argmax pooling, linear
projection; ViT image tower) with every size shrunk; the tokenizer is ``open_clip``'s own BPE
``SimpleTokenizer`` (vocabulary 49,408, context 77), which ships with the package.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

__all__ = ["TINY_CLIP_CONFIG", "TINY_CLIP_MODEL_NAME", "build_tiny_clip", "register_tiny_clip_config"]

#: The ``open_clip`` model name the tiny config is registered under.
TINY_CLIP_MODEL_NAME = "omnilabel-tiny-clip"

#: An ``open_clip`` model config: 32-wide, 2-layer text tower; 1-layer, 32-wide ViT on 32-px images.
TINY_CLIP_CONFIG: dict = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def register_tiny_clip_config() -> str:
    """Make ``open_clip`` know the tiny config (idempotent; needed once per process).

    Returns:
        The model name to pass to ``open_clip.create_model``: :data:`TINY_CLIP_MODEL_NAME`.
    """
    import open_clip

    if TINY_CLIP_MODEL_NAME in open_clip.list_models():
        return TINY_CLIP_MODEL_NAME
    # open_clip reads configs only from JSON files named after the model; it keeps them in memory once read.
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / f"{TINY_CLIP_MODEL_NAME}.json"
        cfg_path.write_text(json.dumps(TINY_CLIP_CONFIG))
        open_clip.add_model_config(cfg_path)
    return TINY_CLIP_MODEL_NAME


def build_tiny_clip(path: str | Path, *, seed: int = 0) -> tuple[str, Path]:
    """Build a tiny random CLIP, save its state dict at ``path``, and register its config.

    The weights are ``open_clip``'s default initialisation under ``seed``; the global torch RNG is left
    untouched. The file is a plain ``torch.save`` of the state dict, the format of
    ``open_clip_pytorch_model.bin``.

    Args:
        path: where to write the checkpoint (parent directories are created).
        seed: seed of the weights.

    Returns:
        ``(model_name, path)``: the ``open_clip`` model name to load it with, and the checkpoint path.
    """
    import open_clip

    model_name = register_tiny_clip_config()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(model_name, pretrained=None, device="cpu")
    torch.save(model.state_dict(), path)
    return model_name, path
