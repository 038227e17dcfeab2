"""A tiny random DINOv2 of the real architecture, saved in the Hugging Face format.

Tests and demos build it instead of downloading ``facebook/dinov2-small``, then load the folder through
:func:`omnilabel.models.dinov2.load_dinov2` (``Dinov2Model.from_pretrained`` with ``local_files_only=True``) —
the path a downloaded checkpoint takes. The defaults (8-px patches, width 64, 2 layers of 2 heads, position
table for 128 px) give about 130 k parameters, a ``model.safetensors`` of about 0.5 MB.
"""

from __future__ import annotations

from pathlib import Path

import torch

from omnilabel.errors import InputError

__all__ = ["build_tiny_dinov2"]


def build_tiny_dinov2(out_dir: str | Path, *, seed: int = 0, patch_size: int = 8, hidden_size: int = 64,
                      num_layers: int = 2, num_heads: int = 2, image_size: int = 128) -> Path:
    """Build and save a tiny random ``Dinov2Model``; the global torch RNG is left untouched.

    Args:
        out_dir: folder to write (created if missing): ``config.json`` and ``model.safetensors``.
        seed: seeds the random weights; the same seed and sizes give the same weights.
        patch_size: patch side in pixels (14 in the released models).
        hidden_size: token width C (384 for ViT-S); a multiple of ``num_heads``.
        num_layers: transformer blocks (12 for ViT-S); 0 gives embeddings and the final LayerNorm only.
        num_heads: attention heads (6 for ViT-S).
        image_size: side of the square image the position table is made for (a multiple of ``patch_size``);
            other sizes interpolate it.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        InputError: sizes that do not fit together.
    """
    from transformers import Dinov2Config, Dinov2Model
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # as load_dinov2: no progress bar per model written

    if min(patch_size, hidden_size, num_heads, image_size) < 1 or num_layers < 0:
        raise InputError("tiny DINOv2 sizes must be positive (num_layers >= 0)")
    if hidden_size % num_heads or image_size % patch_size:
        raise InputError(f"hidden_size {hidden_size} must be a multiple of num_heads {num_heads}, and image_size "
                         f"{image_size} of patch_size {patch_size}")
    config = Dinov2Config(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                          patch_size=patch_size, image_size=image_size, mlp_ratio=4)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dinov2Model(config).eval()
    model.save_pretrained(out)
    return out
