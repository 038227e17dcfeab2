"""Fused attention for SAM's ViT image encoder.

``segment_anything``'s image-encoder ``Attention`` computes attention by hand: ``q @ k^T``, the decomposed
relative-position term added to the logits, ``softmax``, ``@ v``. That materialises the (B·heads, N, N)
logits and probabilities in separate kernels. ``use_sdpa`` swaps each such module for one that calls
``torch.nn.functional.scaled_dot_product_attention``, with the relative-position term given as a float
``attn_mask`` (an additive bias on the logits, computed as ``add_decomposed_rel_pos`` does), so that PyTorch
can pick a fused kernel (memory-efficient attention takes an additive bias). The function computed is the
same: weights, state dict and outputs (to float rounding) do not change.

``SamTeacher`` applies it when its model runs on CUDA; on the CPU the original modules are kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn


def rel_pos_bias(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                 size_hw: tuple[int, int]) -> torch.Tensor:
    """The decomposed relative-position term of SAM's attention, as an additive bias on the logits.

    Equal to what ``segment_anything``'s ``add_decomposed_rel_pos`` adds to the attention map (query and
    key grids of the same size, as in SAM's encoder).

    Args:
        q: (B, heads, N, d) float queries, unscaled, N = H * W.
        rel_pos_h: (2 * H - 1, d) float relative embeddings along the height (interpolated if another length).
        rel_pos_w: (2 * W - 1, d) float relative embeddings along the width.
        size_hw: ``(H, W)`` of the token grid.

    Returns:
        (B, heads, N, N) bias in ``q``'s dtype: ``bias[b, n, (i, j), (k, l)] = q·Rh[i, k] + q·Rw[j, l]``.
    """
    h, w = size_hw
    b, heads, n, d = q.shape
    r_h = get_rel_pos(h, h, rel_pos_h).to(q.dtype)  # (H, H, d)
    r_w = get_rel_pos(w, w, rel_pos_w).to(q.dtype)  # (W, W, d)
    r_q = q.reshape(b, heads, h, w, d)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, r_h)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, r_w)
    return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, heads, n, n)


class SdpaAttention(Attention):
    """SAM's image-encoder ``Attention`` computed with ``scaled_dot_product_attention``.

    Same parameters and state dict as ``Attention``; ``use_sdpa`` turns existing modules into this class.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention over a token grid.

        Args:
            x: (B, H, W, C) float tokens (B = images x windows for a windowed block).

        Returns:
            (B, H, W, C) tokens.
        """
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, d)
        bias = rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w)) if self.use_rel_pos else None
        # The default scale of scaled_dot_product_attention is d^-0.5, SAM's ``self.scale``.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(out)


def use_sdpa(model: nn.Module) -> int:
    """Compute every image-encoder attention of ``model`` with ``scaled_dot_product_attention``, in place.

    Idempotent: modules already converted are left alone. Only ``segment_anything``'s image-encoder
    ``Attention`` is touched (the mask decoder's attention is a different class and stays as it is).

    Args:
        model: a ``Sam``, its ``image_encoder``, or any module holding them.

    Returns:
        Number of attention modules converted by this call (0 when all already were).
    """
    return _swap(model, Attention, SdpaAttention)


def use_eager(model: nn.Module) -> int:
    """Undo ``use_sdpa``: back to ``segment_anything``'s own attention (benchmarks compare the two).

    Args:
        model: a module ``use_sdpa`` was applied to.

    Returns:
        Number of attention modules converted back.
    """
    return _swap(model, SdpaAttention, Attention)


def _swap(model: nn.Module, old: type[nn.Module], new: type[nn.Module]) -> int:
    """Give every module of exactly class ``old`` the class ``new`` (same parameters); returns how many."""
    converted = 0
    for module in model.modules():
        if type(module) is old:
            module.__class__ = new
            converted += 1
    return converted
