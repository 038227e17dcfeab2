"""UOIS-SAM's modules: the HPG head, HDNet, mask selection, the prompter file, the training samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnilabel.errors import CheckpointError, InputError
from omnilabel.models.dinov2 import load_dinov2
from omnilabel.models.sam_loader import load_sam
from omnilabel.ops.grid import point_grid
from omnilabel.teachers.sam import SamTeacher
from omnilabel.teachers.uois import (
    HDNet,
    Hpg,
    HpgConfig,
    HpgHead,
    UoisConfig,
    grid_masks,
    read_prompter,
    save_prompter,
    select_masks,
)
from omnilabel.teachers.uois_train import PrompterTrainConfig, hdnet_sample, sample_prompts

SIZE_HW = (96, 128)


@pytest.fixture(scope="module")
def sam(tiny_sam_path):
    return SamTeacher(load_sam(tiny_sam_path))


@pytest.fixture(scope="module")
def emb(sam):
    return sam.encode(np.random.default_rng(2).integers(0, 256, (*SIZE_HW, 3), dtype=np.uint8))


@pytest.mark.parametrize(("patch", "tokens_hw", "out_hw"), [(14, (24, 32), (336, 448)), (8, (12, 16), (96, 128))])
def test_head_returns_maps_at_the_input_size(patch, tokens_hw, out_hw):
    head = HpgHead(48, patch, width=32)
    fg, heat = head(torch.randn(2, 48, *tokens_hw), out_hw)
    assert fg.shape == (2, 2, *out_hw) and heat.shape == (2, *out_hw)


def test_untrained_hdnet_returns_sams_scores():
    hd = HDNet(dim=16)
    sam_iou = torch.rand(5, 4)
    out = hd(torch.randn(5, 16), torch.randn(5, 4, 16), sam_iou)
    assert torch.equal(out, sam_iou)
    assert sum(p.numel() for p in HDNet(256).parameters()) == 512 * 256 + 256 + 256 * 256 + 256 + 256 + 1


def test_without_hdnet_each_point_takes_sams_best_multimask_output(sam, emb):
    points = point_grid(3, SIZE_HW)
    res = select_masks(sam, emb, points, UoisConfig(score_thresh=-1e9, nms_iou=1.0, max_area_px=None, min_area_px=0))
    assert len(res.masks) == 9 and set(res.output.tolist()) <= {1, 2, 3}
    for c in sam.decode_points_multimask(emb, points):
        best = c.iou_scores.argmax(axis=1)
        for i, b in zip(c.indices, best, strict=True):
            k = int(np.flatnonzero(np.all(res.points_xy == points[i], axis=1))[0])
            assert res.output[k] == b + 1 and res.scores[k] == pytest.approx(c.iou_scores[i, b], abs=1e-5)
            assert np.array_equal(res.masks[k], sam.upsample(emb, c.low_res_logits[i, b][None])[0])
    assert np.all(np.diff(res.scores) <= 0)  # best first


def test_hdnet_scores_pick_the_output_and_drop_low_prompts(sam, emb):
    hd = HDNet(sam.sam.mask_decoder.transformer_dim)
    with torch.no_grad():  # a residual that favours output 0 (the single-mask head) and sinks prompt scores
        hd.mlp[-1].bias.fill_(0.0)
    points = point_grid(2, SIZE_HW)
    loose = UoisConfig(score_thresh=-1e9, nms_iou=1.0, max_area_px=None, min_area_px=0)
    res = select_masks(sam, emb, points, loose, hd)
    (c,) = list(sam.decode_points_tokens(emb, points))
    assert sorted(res.output.tolist()) == sorted(c.iou_scores.argmax(axis=1).tolist())  # all 4 outputs compete
    strict = select_masks(sam, emb, points, UoisConfig(score_thresh=float(c.iou_scores.max()) + 1), hd)
    assert len(strict.masks) == 0 and strict.dropped["score"] == 4


def test_nms_and_area_filters(sam, emb):
    points = np.repeat(point_grid(1, SIZE_HW), 3, axis=0)  # one point three times: identical masks
    res = select_masks(sam, emb, points, UoisConfig(score_thresh=-1e9, nms_iou=0.3, max_area_px=None, min_area_px=0))
    assert len(res.masks) == 1 and res.dropped["nms"] == 2
    area = int(res.masks[0].sum())
    capped = select_masks(sam, emb, points, UoisConfig(score_thresh=-1e9, max_area_px=area - 1, min_area_px=0))
    assert len(capped.masks) == 0 and capped.dropped["area"] == 1


def test_grid_baseline_decodes_the_grid(sam, emb):
    before = sam.decoder_calls
    res = grid_masks(sam, emb, UoisConfig(grid_per_side=4, score_thresh=-1e9))
    assert res.prompts == 16 and sam.decoder_calls == before + 1


def test_prompter_file_round_trip_and_refusals(sam, tiny_dinov2_dir, tmp_path):
    hpg = Hpg(load_dinov2(tiny_dinov2_dir), HpgConfig(input_hw=(96, 128), head_width=32))
    path = save_prompter(tmp_path / "p.pt", hpg=hpg, hdnet=HDNet(16), uois=UoisConfig(nms_iou=0.4),
                         backbone={"id": "tiny", "source": "x"}, sam={"id": "s"}, training={"epochs": 1})
    pf = read_prompter(path)
    assert pf.hpg == hpg.config and pf.uois.nms_iou == 0.4 and pf.training == {"epochs": 1}
    assert all(torch.equal(pf.head[k], v) for k, v in hpg.head.state_dict().items())
    torch.save({"format": "something else"}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="not a prompter file"):
        read_prompter(tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="no prompter file"):
        read_prompter(tmp_path / "missing.pt")
    with pytest.raises(InputError, match="multiple of the backbone's patch size"):
        Hpg(load_dinov2(tiny_dinov2_dir), HpgConfig(input_hw=(100, 128)))


def test_prompts_are_drawn_inside_objects_and_on_the_background():
    masks = np.zeros((2, 20, 30), dtype=bool)
    masks[0, 2:6, 3:9] = True
    masks[1, 10:18, 15:25] = True
    points, owner = sample_prompts(masks, 12, 0.25, np.random.default_rng(0))
    assert points.shape == (12, 2) and (owner == -1).sum() == 3 and set(owner[owner >= 0].tolist()) == {0, 1}
    for (x, y), k in zip(points.astype(int), owner, strict=True):
        assert masks[k, y, x] if k >= 0 else not masks[:, y, x].any()
    full = np.ones((1, 4, 4), dtype=bool)
    _, owner_full = sample_prompts(full, 5, 0.5, np.random.default_rng(0))
    assert (owner_full == 0).all()  # no background to draw from


def test_hdnet_targets_are_each_outputs_iou_with_its_object(sam, emb):
    masks = np.zeros((1, *SIZE_HW), dtype=bool)
    masks[0, 20:60, 30:90] = True
    s = hdnet_sample(sam, emb, masks, PrompterTrainConfig(prompts_per_image=8, negative_frac=0.5),
                     np.random.default_rng(1))
    assert s["target"].shape == (8, 4) and s["iou_token"].shape == (8, sam.sam.mask_decoder.transformer_dim)
    assert (s["target"][4:] == 0).all() and (s["target"] >= 0).all() and (s["target"] <= 1).all()
    # the targets of the positives, recomputed from the decoded masks
    points, owner = sample_prompts(masks, 8, 0.5, np.random.default_rng(1))
    (c,) = list(sam.decode_points_tokens(emb, points[:4]))
    for row in range(4):
        outs = sam.upsample(emb, c.low_res_logits[row])
        iou = (outs & masks[0]).sum(axis=(1, 2)) / np.maximum((outs | masks[0]).sum(axis=(1, 2)), 1)
        np.testing.assert_allclose(s["target"][row], iou, atol=1e-6)
