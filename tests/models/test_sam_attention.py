"""Fused attention in SAM's image encoder computes what segment_anything's own attention computes."""

from __future__ import annotations

import copy

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention

from omnilabel.models.sam_attention import SdpaAttention, use_eager, use_sdpa
from omnilabel.models.tiny import build_tiny_sam


@pytest.fixture(scope="module")
def sam():
    # block 0 windowed (4 x 4 windows on an 8 x 8 grid, padded from 6 x 6 tokens below), block 1 global
    return build_tiny_sam(seed=1, depth=2, global_attn_indexes=(1,), window_size=4, image_size=128,
                          patch_size=16)


def test_sdpa_encoder_matches_the_original(sam):
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    fused = copy.deepcopy(sam)
    assert use_sdpa(fused) == 2
    assert all(type(b.attn) is SdpaAttention for b in fused.image_encoder.blocks)
    assert type(sam.image_encoder.blocks[0].attn) is Attention  # the copy only
    assert fused.state_dict().keys() == sam.state_dict().keys()
    with torch.inference_mode():
        ref = sam.image_encoder(x)
        got = fused.image_encoder(x)
    assert got.shape == ref.shape == (2, 256, 8, 8)
    assert torch.allclose(got, ref, atol=1e-4, rtol=0)
    # relative positions matter here, so the check is not vacuous
    flat = copy.deepcopy(fused)
    with torch.no_grad():
        for block in flat.image_encoder.blocks:
            block.attn.rel_pos_h.zero_()
            block.attn.rel_pos_w.zero_()
        assert not torch.allclose(flat.image_encoder(x), ref, atol=1e-3)


def test_windowed_block_with_padding_matches(sam):
    block = sam.image_encoder.blocks[0]
    assert block.window_size == 4
    fused = copy.deepcopy(block)
    use_sdpa(fused)
    x = torch.randn(1, 6, 6, 32, generator=torch.Generator().manual_seed(1))  # 6 is not a multiple of 4
    with torch.inference_mode():
        assert torch.allclose(fused(x), block(x), atol=1e-4, rtol=0)


def test_use_sdpa_is_idempotent_and_reversible(sam):
    model = copy.deepcopy(sam)
    assert use_sdpa(model) == 2 and use_sdpa(model) == 0
    assert use_eager(model) == 2
    assert all(type(b.attn) is Attention for b in model.image_encoder.blocks)
    # the mask decoder's own attention class is never touched
    assert use_sdpa(model.mask_decoder) == 0
