"""Stable-SAM's plugins (DSP + DRP) and its RTS prompt mixture: exactness at init, shapes, sizes, sampling."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from omnilabel.data.images import read_image_rgb
from omnilabel.models.sam_loader import load_sam
from omnilabel.ops.boxes import masks_to_prompt_boxes_xyxy
from omnilabel.teachers.finetune import FinetuneConfig, SamTrainable, decode_per_instance
from omnilabel.teachers.finetune_batch import Batcher
from omnilabel.teachers.finetune_data import EmbeddingCache, collect_training_set
from omnilabel.teachers.finetune_run import FinetuneSetup
from omnilabel.teachers.sam import SamTeacher
from omnilabel.teachers.stable import (
    StableAttentionBlock,
    StableConfig,
    StablePlugin,
    bilinear_sample,
    count_parameters,
    install_stable,
    plugins_of,
)
from omnilabel.teachers.stable_prompts import (
    INCOHERENT_FACTOR,
    POINT_COUNTS,
    RTS_KINDS,
    box_iou_px,
    coarse_mask,
    noisy_box_xyxy,
    sample_rts_prompt,
)


@pytest.fixture(scope="module")
def pair(tiny_sam_path) -> tuple[SamTeacher, SamTeacher]:
    """The tiny SAM, and a copy of it with untrained plugins in its decoder."""
    plain = load_sam(tiny_sam_path)
    stable = copy.deepcopy(plain)
    install_stable(stable.mask_decoder)
    return SamTeacher(plain), SamTeacher(stable)


@pytest.fixture(scope="module")
def image(shapes_coco) -> np.ndarray:
    data = json.loads(shapes_coco.read_text())
    return read_image_rgb(shapes_coco.parent / "images" / data["images"][0]["file_name"])


PROMPTS = {
    "box": (None, [[10.0, 12.0, 60.0, 70.0], [30.0, 5.0, 90.0, 40.0]]),
    "point": ([[20.0, 30.0], [70.0, 50.0]], None),
    "box+point": ([[20.0, 30.0], [70.0, 50.0]], [[10.0, 12.0, 60.0, 70.0], [50.0, 30.0, 90.0, 80.0]]),
}


@pytest.mark.parametrize("kind", sorted(PROMPTS))
def test_untrained_plugin_leaves_sams_masks_bit_identical(pair, image, kind):
    plain, stable = pair
    points, boxes = (None if v is None else np.array(v) for v in PROMPTS[kind])
    emb = plain.encode(image)
    a = plain.predict(emb, points_xy=points, boxes_xyxy=boxes)
    b = stable.predict(emb, points_xy=points, boxes_xyxy=boxes)
    assert torch.equal(torch.as_tensor(a.low_res_logits), torch.as_tensor(b.low_res_logits))
    assert torch.equal(torch.as_tensor(a.iou_scores), torch.as_tensor(b.iou_scores))
    assert np.array_equal(a.masks, b.masks) and a.masks.any()
    # a mask prompt (the coarse-mask prompts of RTS) too
    a2 = plain.predict(emb, points_xy=points, boxes_xyxy=boxes, mask_logits=a.low_res_logits)
    b2 = stable.predict(emb, points_xy=points, boxes_xyxy=boxes, mask_logits=a.low_res_logits)
    assert torch.equal(torch.as_tensor(a2.low_res_logits), torch.as_tensor(b2.low_res_logits))


def test_untrained_plugin_is_bit_identical_with_multimask_and_in_the_training_path(pair, image):
    plain, stable = pair
    emb = plain.encode(image)
    points = np.array([[20.0, 30.0], [70.0, 50.0], [40.0, 80.0]])
    (a,), (b,) = list(plain.decode_points_multimask(emb, points)), list(stable.decode_points_multimask(emb, points))
    assert a.low_res_logits.shape[1] == 3
    assert torch.equal(torch.as_tensor(a.low_res_logits), torch.as_tensor(b.low_res_logits))
    assert torch.equal(torch.as_tensor(a.iou_scores), torch.as_tensor(b.iou_scores))
    # fine-tuning's decode path (one embedding per prompt), with gradients on
    pe = plain.sam.prompt_encoder
    feats = torch.cat([emb.features] * 3)
    coords = torch.as_tensor(plain.transform.apply_coords(points, emb.original_size), dtype=torch.float32)
    sparse, dense = pe(points=(coords[:, None], torch.ones(3, 1, dtype=torch.int)), boxes=None, masks=None)
    for multimask in (True, False):
        ref = decode_per_instance(plain.sam.mask_decoder, feats, pe.get_dense_pe(), sparse, dense, multimask=multimask)
        got = decode_per_instance(stable.sam.mask_decoder, feats, pe.get_dense_pe(), sparse, dense,
                                  multimask=multimask)
        assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])


def test_a_trained_plugin_changes_the_masks_and_only_its_block(pair, image):
    plain, stable = pair
    moved = copy.deepcopy(stable.sam)
    plugin = plugins_of(moved.mask_decoder).layers["1"]
    with torch.no_grad():
        plugin.offset[-1].weight.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(0))
        plugin.router.mlp[-1].weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    emb = plain.encode(image)
    boxes = np.array(PROMPTS["box"][1])
    a = plain.predict(emb, boxes_xyxy=boxes)
    b = SamTeacher(moved).predict(emb, boxes_xyxy=boxes)
    assert np.abs(a.low_res_logits - b.low_res_logits).max() > 1e-3
    alpha = plugin.last_alpha
    assert alpha.shape == (2, 2) and not torch.equal(alpha[0], alpha[1])  # one α per prompt, from its token
    torch.testing.assert_close(alpha.sum(1), plugin.router.scale.detach().expand(2))
    layers = moved.mask_decoder.transformer.layers
    assert isinstance(layers[1], StableAttentionBlock) and not isinstance(layers[0], StableAttentionBlock)
    # the block holds SAM's own modules under their own names; only `stable.*` is new
    names = set(moved.mask_decoder.state_dict())
    assert names - set(plain.sam.mask_decoder.state_dict()) == {f"transformer.layers.1.stable.{k}"
                                                               for k in plugin.state_dict()}


def test_bilinear_sampler_is_grid_sample_and_exact_on_the_grid():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9 * 9, 5, generator=g)
    pos = torch.rand(2, 40, 2, generator=g) * 12 - 2  # partly outside the grid: zeros there
    got = bilinear_sample(x, pos, (9, 9))
    grid = (2 * pos / 8 - 1)[:, None]
    ref = torch.nn.functional.grid_sample(x.transpose(1, 2).reshape(2, 5, 9, 9), grid, mode="bilinear",
                                          padding_mode="zeros", align_corners=True)[:, :, 0].transpose(1, 2)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    ys, xs = torch.meshgrid(torch.arange(9), torch.arange(9), indexing="ij")
    cells = torch.stack([xs, ys], -1).reshape(1, 81, 2).float().expand(2, -1, -1)
    assert torch.equal(bilinear_sample(x, cells, (9, 9)), x)
    shifted = bilinear_sample(x, cells + torch.tensor([1.0, 0.0]), (9, 9)).reshape(2, 9, 9, 5)
    assert torch.equal(shifted[:, :, :8], x.reshape(2, 9, 9, 5)[:, :, 1:]) and not shifted[:, :, 8].any()


def test_plugin_mixes_deformed_and_regular_features_with_bounded_offsets():
    torch.manual_seed(0)
    plugin = StablePlugin(16, StableConfig(offset_scale=1.5))
    with torch.no_grad():
        plugin.offset[-1].weight.normal_(0.0, 10.0)  # saturate tanh
        plugin.router.mlp[-1].weight.normal_(0.0, 1.0)
        plugin.router.scale.fill_(1.3)
    keys, token = torch.randn(3, 64, 16), torch.randn(3, 16)
    mixed = plugin(keys, token)
    x = keys.transpose(1, 2).reshape(3, 16, 8, 8)
    delta = plugin.offsets(x)
    assert delta.abs().max() <= 1.5 and delta.abs().max() > 1.0
    ys, xs = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    pos = torch.stack([xs, ys], -1).reshape(1, 64, 2).float() + delta.permute(0, 2, 3, 1).reshape(3, 64, 2)
    alpha = plugin.router(token)
    expected = alpha[:, 0, None, None] * bilinear_sample(keys, pos, (8, 8)) + alpha[:, 1, None, None] * keys
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alpha.sum(1), torch.full((3,), 1.3))


def test_plugins_of_a_256_wide_decoder_are_about_0_08_m_parameters_and_under_1_mb(tmp_path):
    from segment_anything.modeling import MaskDecoder, TwoWayTransformer

    decoder = MaskDecoder(transformer_dim=256, transformer=TwoWayTransformer(depth=2, embedding_dim=256,
                                                                             mlp_dim=2048, num_heads=8))
    plugins = install_stable(decoder)
    # digest §2: C_h = 256, h = 32 -> 73,472 (offset net) + 8,355 (DRP) = 81,827, the paper's "0.08 M"
    assert count_parameters(plugins) == 81_827
    assert 75_000 <= count_parameters(plugins) <= 90_000
    torch.save({f"stable.{k}": v for k, v in plugins.state_dict().items()}, tmp_path / "p.pt")
    assert (tmp_path / "p.pt").stat().st_size < 1 << 20
    with pytest.raises(Exception, match="already has"):
        install_stable(decoder)


def test_a_stable_run_trains_only_the_plugins_and_gradients_reach_them(pair, image):
    _, stable = pair
    sam = copy.deepcopy(stable.sam)
    model = SamTrainable(sam)
    params = model.freeze_for(FinetuneConfig(stable=True))
    assert {id(p) for p in params} == {id(p) for p in plugins_of(sam.mask_decoder).parameters()}
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".stable." not in n)
    emb = stable.encode(image)
    group = {"index": torch.tensor([0, 0]), "points": None, "labels": None, "masks": None, "text": None,
             "boxes": torch.tensor([[10.0, 12.0, 160.0, 170.0], [30.0, 5.0, 200.0, 100.0]]), "multimask": False}
    ((logits, _),) = model(emb.features, None, None, [group])
    logits.square().mean().backward()
    offset_grad = plugins_of(sam.mask_decoder).layers["1"].offset[-1].weight.grad
    assert offset_grad is not None and offset_grad.abs().sum() > 0  # through the frozen decoder


# -- the RTS prompt mixture --------------------------------------------------------------------------------


def _blob(h: int = 120, w: int = 100) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return ((yy - 50) ** 2 / 30**2 + (xx - 45) ** 2 / 22**2) <= 1


def test_noisy_boxes_overlap_the_gt_box_and_stay_inside_the_image():
    rng = np.random.default_rng(0)
    for mask in (_blob(), np.pad(np.ones((30, 40), bool), ((0, 5), (60, 0)))):  # the second touches the border
        h, w = mask.shape
        gt = masks_to_prompt_boxes_xyxy(mask[None])[0]
        boxes = np.array([noisy_box_xyxy(gt, rng, image_hw=(h, w)) for _ in range(300)])
        ious = np.array([box_iou_px(b, gt) for b in boxes])
        assert ious.min() >= 0.5 and ious.mean() < 0.9  # noisy, but never below the paper's filter
        assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= w - 1).all() and (boxes[:, [1, 3]] <= h - 1).all()
        assert (boxes[:, :2] <= boxes[:, 2:]).all()
        assert (np.abs(boxes - gt).max(axis=1) > 0).mean() > 0.95


def test_prompt_mixture_draws_every_kind_and_points_inside_the_mask():
    mask = _blob()
    rng = np.random.default_rng(1)
    prompts = [sample_rts_prompt(mask, rng) for _ in range(400)]
    assert {p.kind for p in prompts} == set(RTS_KINDS)
    counts = {len(p.points_xy) for p in prompts if p.kind == "points"}
    assert counts == set(POINT_COUNTS)
    for p in prompts:
        assert (p.points_xy is not None) == (p.kind == "points")
        assert (p.box_xyxy is not None) == (p.kind in ("box", "noisy_box"))
        if p.points_xy is not None:
            xy = p.points_xy
            assert (xy % 1 == 0.5).all() and mask[xy[:, 1].astype(int), xy[:, 0].astype(int)].all()
            assert len(np.unique(xy, axis=0)) == len(xy)  # without replacement
        if p.kind == "box":
            np.testing.assert_array_equal(p.box_xyxy, masks_to_prompt_boxes_xyxy(mask[None])[0])
    # a pure function of the generator's seed
    rng = np.random.default_rng(1)
    for p in prompts[:50]:
        q = sample_rts_prompt(mask, rng)
        assert q.kind == p.kind
        for a, b in ((q.points_xy, p.points_xy), (q.box_xyxy, p.box_xyxy)):
            assert (a is None and b is None) or np.array_equal(a, b)


def test_coarse_masks_differ_from_the_gt_only_near_its_boundary():
    yy, xx = np.mgrid[:256, :256]
    gt = (((yy - 120) ** 2 + (xx - 110) ** 2) <= 70**2).astype(np.float32)
    gt[20:60, 180:240] = 1.0
    inside, outside = ndimage.distance_transform_edt(gt), ndimage.distance_transform_edt(1 - gt)
    to_boundary = np.maximum(inside, outside)
    differs = np.zeros(gt.shape, bool)
    for seed in range(5):
        coarse = coarse_mask(gt, np.random.default_rng(seed))
        diff = coarse != (gt > 0.5)
        assert diff.any() and diff.mean() < 0.1
        assert to_boundary[diff].max() <= 2 * INCOHERENT_FACTOR
        differs |= diff
    assert not differs[to_boundary > 2 * INCOHERENT_FACTOR].any()
    assert differs[to_boundary <= 2].mean() > 0.3  # the boundary itself is where the noise is


def test_batcher_groups_a_stable_step_by_prompt_shape(shapes_coco, tiny_sam_path, tmp_path):
    from segment_anything.utils.transforms import ResizeLongestSide

    images, instances = collect_training_set(json.loads(shapes_coco.read_text()), shapes_coco.parent / "images")
    sam = load_sam(tiny_sam_path)
    cache = EmbeddingCache(tmp_path)
    for im in images:
        cache.save(im.image_id, torch.zeros(1, 1, 1), original_size=(im.height, im.width),
                   input_size=ResizeLongestSide.get_preprocess_shape(im.height, im.width, 256))
    setup = FinetuneSetup(config=FinetuneConfig(stable=True, batch_size=32), base_path=str(tiny_sam_path),
                          base_id="tiny", base_source="tiny", base_encoder_sha256="0" * 64, images=tuple(images),
                          instances=tuple(instances), run_dir=str(tmp_path))
    batcher = Batcher(setup, sam, cache=cache, rank=0, world_size=1, device=torch.device("cpu"))
    inputs, gt, b = batcher(0)
    assert b == 32 and gt.shape == (32, 1, 256, 256)
    rows = torch.cat([g["index"] for g in inputs["groups"]])
    assert sorted(rows.tolist()) == list(range(32))
    kinds = set()
    for g in inputs["groups"]:
        n = len(g["index"])
        if g["points"] is not None:
            k = g["points"].shape[1]
            kinds.add(f"points{k}")
            assert k in POINT_COUNTS and g["labels"].shape == (n, k) and g["multimask"] == (k == 1)
            assert g["boxes"] is None and g["masks"] is None
        elif g["boxes"] is not None:
            kinds.add("box")
            assert g["masks"] is None and not g["multimask"]
        else:
            kinds.add("mask")
            assert g["masks"].shape == (n, 1, 64, 64) and set(g["masks"].unique().tolist()) <= {-10.0, 10.0}
    assert {"box", "mask"} <= kinds and any(k.startswith("points") for k in kinds)
    again, _, _ = batcher(0)
    for g, h in zip(inputs["groups"], again["groups"], strict=True):
        for key in ("index", "points", "boxes", "masks"):
            assert (g[key] is None and h[key] is None) or torch.equal(g[key], h[key])


def test_stable_settings_are_checked():
    cfg = FinetuneConfig(stable=True)
    assert (cfg.lr, cfg.lr_drop_factor, cfg.weight_decay, cfg.iou_weight) == (1e-3, 1.0, 0.0, 0.0)
    plain = FinetuneConfig()
    assert (plain.lr, plain.lr_drop_factor, plain.weight_decay, plain.iou_weight) == (1e-5, 0.1, 0.01, 1.0)
    assert FinetuneConfig(stable=True, lr_drop_step=3, steps=4).lr_drop_factor == 0.1
    from omnilabel.errors import InputError

    for bad in ({"class_aware": True}, {"prompts": "refine"}, {"train_encoder": True}):
        with pytest.raises(InputError, match="--stable"):
            FinetuneConfig(stable=True, **bad)
    with pytest.raises(InputError, match="layers"):
        StableConfig(layers=())
    assert StableConfig.from_dict({**StableConfig(layers=(0, 1)).to_dict(), "parameters": 5}).layers == (0, 1)
