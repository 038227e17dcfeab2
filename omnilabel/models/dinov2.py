"""DINOv2, the frozen backbone of UOIS-SAM's Heatmap-based Prompt Generator (spec §3.1).

``load_dinov2`` reads ``transformers``' ``Dinov2Model`` from a local folder in the Hugging Face format
(``facebook/dinov2-small`` — ViT-S/14, the paper's backbone and the default — or ``facebook/dinov2-base``, both
in :mod:`omnilabel.models.registry`; or a tiny random model from :mod:`omnilabel.models.tiny_dinov2`), offline,
in eval mode and frozen (spec §7.1: the backbone is never trained).

``patch_tokens`` turns images into the (B, C, H/p, W/p) grid of last-layer patch tokens the upsampling head
reads (384 channels for ViT-S; 24×32 tokens for the paper's 336×448 input). DINOv2 was trained at 224 px (518 px
for the released position tables), but its learned position embeddings are interpolated (bicubic) to the
token grid of each input, so any H, W that are multiples of the patch size work, non-square ones included.

``normalize_images`` applies the ImageNet mean/std (spec A13: the paper does not state the normalisation) to
images already resized to the HPG input size; resizing is the caller's (its interpolation is not stated either).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from omnilabel.errors import CheckpointError, InputError

if TYPE_CHECKING:
    from transformers import Dinov2Model

__all__ = [
    "DEFAULT_WEIGHTS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "load_dinov2",
    "normalize_images",
    "patch_size",
    "patch_tokens",
]

#: Spec §3.1: the HPG backbone is DINOv2 ViT-S/14 (a registry name).
DEFAULT_WEIGHTS = "dinov2-small"
#: Spec A13: ImageNet statistics of RGB in [0, 1], as DINOv2's own preprocessing uses.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def _read_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"no DINOv2 checkpoint at {path}: config.json is missing "
                              "(`omnilabel weights list` names the downloadable ones)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {config_file}: {exc}") from exc
    if not isinstance(config, dict) or config.get("model_type") != "dinov2":
        found = config.get("model_type") if isinstance(config, dict) else None
        raise CheckpointError(f"{config_file} describes a {found!r} model, not a DINOv2 one (model_type 'dinov2')")
    return config


def load_dinov2(path: str | Path, *, device: str | torch.device = "cpu") -> Dinov2Model:
    """Load a DINOv2 backbone from a local Hugging Face folder, offline, frozen, in eval mode.

    Args:
        path: a folder holding ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``), e.g.
            ``registry.resolve("dinov2-small", kind="dinov2")``.
        device: where the model goes.

    Returns:
        A float32 ``Dinov2Model`` in eval mode whose parameters all have ``requires_grad == False``.

    Raises:
        CheckpointError: the folder or its ``config.json`` is missing or unreadable, the config is not a DINOv2
            one, the weights file is missing, or weights are missing, unexpected or of another shape than the
            config's (each kind named with its first keys, and the shapes of mismatched ones).
    """
    from transformers import Dinov2Model
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one job-level progress bar, not one per model load

    folder = Path(path)
    _read_config(folder)
    try:
        # Mismatched shapes are collected, not raised, so that the error below can name them.
        model, info = Dinov2Model.from_pretrained(folder, local_files_only=True, output_loading_info=True,
                                                  ignore_mismatched_sizes=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load DINOv2 from {folder}: {exc}") from exc
    problems = [f"{len(info[kind])} {kind.replace('_', ' ')}: {', '.join(sorted(map(str, info[kind]))[:8])}"
                for kind in ("missing_keys", "unexpected_keys") if info.get(kind)]
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda item: str(item[0]))
    if mismatched:
        shown = [f"{key} (checkpoint {tuple(ckpt)}, model {tuple(want)})" for key, ckpt, want in mismatched[:8]]
        problems.append(f"{len(mismatched)} mismatched keys: {', '.join(shown)}")
    if problems:
        raise CheckpointError(f"DINOv2 weights in {folder} do not match its config.json: " + "; ".join(problems))
    model.requires_grad_(False)
    # float32 whatever the checkpoint stores (``from_pretrained``'s dtype default differs across versions);
    # mixed precision is the caller's (``omnilabel.models.precision.autocast``).
    return model.eval().to(device=device, dtype=torch.float32)


def patch_size(model: Any) -> int:
    """The side in pixels of one patch (``config.patch_size``: 14 for the released DINOv2 models)."""
    size = model.config.patch_size
    if isinstance(size, Sequence):
        if len(set(size)) != 1:
            raise InputError(f"only square patches are supported, got patch_size {tuple(size)}")
        size = size[0]
    return int(size)


def patch_tokens(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Last-layer patch tokens of DINOv2 as a feature grid (spec §3.1: (H/s)×(W/s)×C).

    Runs without autograd (the backbone is frozen). The CLS token and any register tokens
    (``config.num_register_tokens`` of DINOv2-with-registers models) are dropped; the last hidden state is
    the final LayerNorm's output, DINOv2's ``x_norm_patchtokens``.

    Args:
        model: a ``Dinov2Model`` (from :func:`load_dinov2`) or a model of the same interface.
        pixels: (B, 3, H, W) float images normalised with :func:`normalize_images`; H and W multiples of the
            patch size p; moved to the model's device and dtype.

    Returns:
        (B, C, H/p, W/p) float tensor in the model's dtype, on its device; C = ``config.hidden_size``
        (384 for ViT-S). Token ``[:, :, i, j]`` describes pixels ``[i·p:(i+1)·p, j·p:(j+1)·p]``.

    Raises:
        InputError: ``pixels`` is not (B, C_in, H, W) with the model's channels, or H or W is not a
            multiple of p.
    """
    p = patch_size(model)
    channels = int(getattr(model.config, "num_channels", 3))
    if pixels.ndim != 4 or pixels.shape[1] != channels or pixels.shape[0] < 1:
        raise InputError(f"pixels must be (B, {channels}, H, W) with B >= 1, got shape {tuple(pixels.shape)}")
    height, width = int(pixels.shape[2]), int(pixels.shape[3])
    if height < p or width < p or height % p or width % p:
        raise InputError(f"DINOv2 input {height}x{width} is not a multiple of its patch size {p} "
                         f"(resize to e.g. {max(p, round(height / p) * p)}x{max(p, round(width / p) * p)})")
    param = next(model.parameters())
    with torch.no_grad():
        hidden = model(pixel_values=pixels.to(device=param.device, dtype=param.dtype)).last_hidden_state
    skip = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
    grid_h, grid_w = height // p, width // p
    tokens = hidden[:, skip:, :]
    if tokens.shape[1] != grid_h * grid_w:
        raise InputError(f"expected {grid_h}x{grid_w} patch tokens after {skip} leading ones, "
                         f"got {tokens.shape[1]}")
    return tokens.reshape(len(tokens), grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous()


def normalize_images(images_uint8: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
    """RGB uint8 images to DINOv2's input: ``(x / 255 - mean) / std`` with the ImageNet statistics (spec A13).

    The images must already have the HPG input size (336×448 in the paper); this only scales and normalises.

    Args:
        images_uint8: (B, H, W, 3) uint8 RGB, or a list of B (H, W, 3) uint8 RGB images of one size.

    Returns:
        (B, 3, H, W) float32 CPU tensor, roughly in [-2.2, 2.7].

    Raises:
        InputError: not uint8, not RGB, empty, or images of different sizes.
    """
    if isinstance(images_uint8, np.ndarray):
        batch = images_uint8
    else:
        items = [np.asarray(im) for im in images_uint8]
        sizes = {im.shape for im in items}
        if len(sizes) > 1:
            raise InputError(f"images of one size are needed, got shapes {sorted(sizes)}")
        if not items:
            raise InputError("no images to normalise")
        if any(im.dtype != np.uint8 for im in items):
            raise InputError(f"images must be uint8 RGB, got {sorted({str(im.dtype) for im in items})}")
        batch = np.stack(items)
    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[3] != 3 or batch.shape[0] < 1:
        raise InputError(f"images must be (B, H, W, 3) uint8 RGB with B >= 1, got {batch.shape} {batch.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()
