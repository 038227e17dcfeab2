"""The token-returning decode (``run_mask_decoder`` / ``SamTeacher.decode_points_tokens``) against stock SAM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnilabel.models.sam_loader import load_sam
from omnilabel.ops.grid import point_grid
from omnilabel.teachers.sam import SamTeacher, run_mask_decoder

SIZE_HW = (120, 160)


@pytest.fixture(scope="module")
def teacher(tiny_sam_path):
    return SamTeacher(load_sam(tiny_sam_path))


@pytest.fixture(scope="module")
def emb(teacher):
    return teacher.encode(np.random.default_rng(3).integers(0, 256, (*SIZE_HW, 3), dtype=np.uint8))


def _stock(teacher, emb, points_xy, *, multimask):
    """``MaskDecoder.forward`` (segment_anything's own code) on single positive points."""
    xy = teacher.transform.apply_coords(points_xy, emb.original_size)
    coords = torch.as_tensor(xy, dtype=torch.float)[:, None]
    with torch.inference_mode():
        sparse, dense = teacher.sam.prompt_encoder(points=(coords, torch.ones((len(xy), 1), dtype=torch.int)),
                                                   boxes=None, masks=None)
        return teacher.sam.mask_decoder(image_embeddings=emb.features,
                                        image_pe=teacher.sam.prompt_encoder.get_dense_pe(),
                                        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                        multimask_output=multimask)


def test_token_decode_gives_stock_sams_masks_bit_for_bit(teacher, emb):
    points = point_grid(3, SIZE_HW)
    chunks = list(teacher.decode_points_tokens(emb, points, chunk=4))
    assert [len(c.indices) for c in chunks] == [4, 4, 1]
    logits = np.concatenate([c.low_res_logits for c in chunks])
    iou = np.concatenate([c.iou_scores for c in chunks])
    assert logits.shape == (9, 4, 64, 64) and iou.shape == (9, 4)
    multi_logits, multi_iou = _stock(teacher, emb, points, multimask=True)
    single_logits, single_iou = _stock(teacher, emb, points, multimask=False)
    # chunks of 4 prompts vs stock on 9: the same computation, batched kernels round differently (~1e-5)
    np.testing.assert_allclose(logits[:, 1:], multi_logits.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(logits[:, :1], single_logits.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(iou[:, 1:], multi_iou.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(iou[:, 0], single_iou[:, 0].numpy(), rtol=0, atol=1e-4)
    # the same batch through both: identical to the last bit, and the thresholded masks too
    (one,) = list(teacher.decode_points_tokens(emb, points, chunk=len(points)))
    assert np.array_equal(one.low_res_logits[:, 1:], multi_logits.numpy())
    assert np.array_equal(one.low_res_logits[:, :1], single_logits.numpy())
    assert np.array_equal(teacher.upsample(emb, one.low_res_logits[:, 2]),
                          teacher.upsample(emb, multi_logits[:, 1].numpy()))


def test_tokens_are_the_transformer_outputs_the_heads_read(teacher, emb):
    points = point_grid(2, SIZE_HW)
    (c,) = list(teacher.decode_points_tokens(emb, points))
    dec = teacher.sam.mask_decoder
    assert c.iou_token.shape == (4, dec.transformer_dim) and c.mask_tokens.shape == (4, 4, dec.transformer_dim)
    with torch.inference_mode():
        again = dec.iou_prediction_head(torch.as_tensor(c.iou_token))
    np.testing.assert_allclose(again.numpy(), c.iou_scores, rtol=0, atol=1e-6)
    # the multimask decode path and the token path agree: one decoder computation
    (m,) = list(teacher.decode_points_multimask(emb, points))
    assert np.array_equal(m.low_res_logits, c.low_res_logits[:, 1:])


def test_batched_embeddings_equal_one_shared_embedding(teacher, emb):
    points = point_grid(2, SIZE_HW)
    xy = teacher.transform.apply_coords(points, emb.original_size)
    coords = torch.as_tensor(xy, dtype=torch.float)[:, None]
    with torch.inference_mode():
        sparse, dense = teacher.sam.prompt_encoder(points=(coords, torch.ones((4, 1), dtype=torch.int)),
                                                   boxes=None, masks=None)
        pe = teacher.sam.prompt_encoder.get_dense_pe()
        shared = run_mask_decoder(teacher.sam.mask_decoder, emb.features, pe, sparse, dense)
        per_prompt = run_mask_decoder(teacher.sam.mask_decoder, emb.features.expand(4, -1, -1, -1), pe, sparse,
                                      dense)
    assert torch.equal(shared.logits, per_prompt.logits) and torch.equal(shared.mask_tokens, per_prompt.mask_tokens)
