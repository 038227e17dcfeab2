"""The one mixed-precision policy of every model omnilabel runs.

On a GPU, forward passes run under autocast in bfloat16 where the GPU supports it and float16 otherwise
(float16 training then needs loss scaling); on the CPU everything is float32. Parts that lose accuracy in
half precision opt out themselves (SAM's prompt encoder: positional encodings of coordinates lose pixels).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """bfloat16 on a GPU that has it, float16 on other GPUs, None (float32) elsewhere."""
    if torch.device(device).type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
    """The autocast context of ``device`` (a no-op on the CPU)."""
    dtype = autocast_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def needs_loss_scaling(device: torch.device | str) -> bool:
    """Whether training on ``device`` needs a gradient scaler (float16 autocast)."""
    return autocast_dtype(device) is torch.float16
