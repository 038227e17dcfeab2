"""Tiny random models of the real architectures, saved in the official formats.

Tests and the demo build these instead of downloading weights, then load them through the same code path a
user's real checkpoint takes. Every builder is seeded and leaves the global torch RNG untouched.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

# ---------------------------------------------------------------------------------------------------------
# SAM
# ---------------------------------------------------------------------------------------------------------

#: Std of the re-initialised Linear/Conv weights of a tiny SAM. SAM's default init (zero rel-pos, zero
#: pos-embed, small decoder weights) makes nearly constant masks; this spread makes masks follow prompts.
TINY_SAM_WEIGHT_STD = 0.1


def build_tiny_sam(
    *,
    embed_dim: int = 32,
    depth: int = 2,
    num_heads: int = 2,
    global_attn_indexes: tuple[int, ...] = (1,),
    patch_size: int = 16,
    image_size: int = 256,
    window_size: int = 4,
    seed: int = 0,
) -> Sam:
    """Build a SAM of the official architecture family with small, seeded random weights.

    The prompt encoder and mask decoder are the official ones (256 wide); only the image encoder is shrunk.
    After the default initialisation, every Linear/Conv weight is redrawn from N(0, 0.1²) and the absolute
    and relative position embeddings from N(0, 0.02²), so that the predicted masks depend on the image
    and on where the point or box prompts are.

    Args:
        embed_dim: ViT width; a multiple of ``num_heads``.
        depth: number of ViT blocks.
        num_heads: attention heads per block.
        global_attn_indexes: blocks with global attention; the others attend in windows.
        patch_size: patch side in pixels.
        image_size: square input side in pixels; a multiple of ``patch_size``.
        window_size: window side in patches for the windowed blocks.
        seed: seed of the weights.

    Returns:
        A ``segment_anything.modeling.Sam`` in eval mode on CPU, float32.
    """
    from omnilabel.models.sam_loader import SamArch, build_sam_from_arch

    arch = SamArch(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        global_attn_indexes=tuple(global_attn_indexes),
        window_size=window_size,
        patch_size=patch_size,
        image_size=image_size,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = build_sam_from_arch(arch)
        with torch.no_grad():
            for module in sam.modules():
                if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                    module.weight.normal_(0.0, TINY_SAM_WEIGHT_STD)
                    if module.bias is not None:
                        module.bias.normal_(0.0, TINY_SAM_WEIGHT_STD / 10)
            for name, param in sam.image_encoder.named_parameters():
                if name == "pos_embed" or name.endswith(("rel_pos_h", "rel_pos_w")):
                    param.normal_(0.0, 0.02)
    return sam.eval()


def save_sam_checkpoint(sam: Sam, path: str | Path) -> Path:
    """Save a SAM as Meta's official checkpoints are saved: a plain state dict written by ``torch.save``.

    Args:
        sam: the model.
        path: destination file (``.pth``); parent directories are created.

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in sam.state_dict().items()}
    torch.save(state, path)
    return path
