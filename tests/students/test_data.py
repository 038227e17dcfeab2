"""Student training data: which annotations count, LSJ keeps masks on their pixels, batches are reproducible."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from omnilabel.ops.masks import masks_to_rle
from omnilabel.students.data import (
    EpochBatchSampler,
    TrainDataset,
    collate,
    eval_padded_hw,
    eval_resize,
    eval_size_hw,
    lsj,
    normalize,
    training_samples,
)


def _square(h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    y0, x0, y1, x1 = box
    m[y0:y1, x0:x1] = True
    return m


@pytest.fixture()
def coco(tmp_path) -> tuple[dict, Path]:
    """Three images: 60x100 with GT (RLE), pseudo (scores .9/.2) and weak leftovers; 80x40 with a polygon and
    a crowd; 50x50 with only a low-score pseudomask."""
    sizes = [(60, 100), (80, 40), (50, 50)]
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(tmp_path / f"{i}.png")
    rle = masks_to_rle(_square(60, 100, (10, 10, 30, 40))[None])[0]
    pseudo = {"source": "pseudo", "weak": "points"}
    anns = [
        {"id": 1, "image_id": 1, "category_id": 7, "segmentation": rle},
        {"id": 2, "image_id": 1, "category_id": 9, "segmentation": rle, "score": 0.9, "omnilabel": pseudo},
        {"id": 3, "image_id": 1, "category_id": 9, "segmentation": rle, "score": 0.2, "omnilabel": pseudo},
        {"id": 4, "image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5]},
        {"id": 5, "image_id": 2, "category_id": 9, "segmentation": [[5, 5, 30, 5, 30, 60, 5, 60]]},
        {"id": 6, "image_id": 2, "category_id": 7, "segmentation": rle | {"size": [80, 40]}, "iscrowd": 1},
        {"id": 7, "image_id": 3, "category_id": 7, "segmentation": masks_to_rle(_square(50, 50, (0, 0, 9, 9))[None])[0],
         "score": 0.1, "omnilabel": pseudo},
    ]
    images = [{"id": i + 1, "file_name": f"{i}.png", "height": h, "width": w} for i, (h, w) in enumerate(sizes)]
    return {"images": images, "annotations": anns,
            "categories": [{"id": 7, "name": "a"}, {"id": 9, "name": "b"}]}, tmp_path


def test_training_samples_rules(coco):
    data, folder = coco
    samples, counts = training_samples(data, folder, category_ids=[7, 9], min_score=0.5, pseudo_weight=0.25)
    assert [Path(s.path).name for s in samples] == ["0.png", "1.png"]  # image 3 has nothing left
    first, second = samples
    assert first.labels == [0, 1] and first.weights == [1.0, 0.25]
    assert second.labels == [1] and second.weights == [1.0]
    assert counts == {"gt": 2, "pseudo": 1, "low_score": 2, "no_mask": 1, "crowd": 1, "empty_images": 1}
    kept_all, counts_all = training_samples(data, folder, category_ids=[7, 9])
    assert len(kept_all) == 3 and counts_all["pseudo"] == 3 and kept_all[0].weights == [1.0, 1.0, 1.0]


def test_dataset_decodes_rle_and_polygons_at_a_fixed_size(coco):
    data, folder = coco
    samples, _ = training_samples(data, folder, category_ids=[7, 9])
    ds = TrainDataset(samples, image_size=64, scale_range=(0.9, 1.1), hflip_prob=0.0)
    items = [ds[(i, 5)] for i in range(len(ds))]
    batch = collate(items)
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    assert [m.shape[1:] for m in batch["mask_labels"]] == [(64, 64)] * 3
    # 60x100 is scaled by 0.64 * s (s in 0.9-1.1): its 30x20 rectangle keeps 600 * 0.41 * s^2 pixels;
    # 80x40 by 0.8 * s: the 25x55 polygon keeps about 1375 * 0.64 * s^2
    assert 180 < batch["mask_labels"][0][0].sum() < 320
    assert 650 < batch["mask_labels"][1][0].sum() < 1150
    assert batch["mask_labels"][0].dtype == torch.float32 and batch["class_labels"][1].tolist() == [1]


@pytest.mark.parametrize("size_hw", [(90, 150), (200, 70), (64, 64)])
def test_lsj_keeps_masks_on_their_pixels(size_hw):
    h, w = size_hw
    masks = np.stack([_square(h, w, (h // 4, w // 5, h // 2, w // 2)), _square(h, w, (h // 2, w // 2, h - 3, w - 4))])
    image = np.full((h, w, 3), 90, np.uint8)
    image[masks[0]] = (250, 20, 20)
    image[masks[1]] = (20, 250, 20)
    for seed in range(8):
        out_img, out_masks = lsj(normalize(image), torch.from_numpy(masks), rng=np.random.default_rng(seed + 10 * h),
                                 image_size=96)
        assert out_img.shape == (3, 96, 96) and out_masks.shape == (2, 96, 96)
        red = out_img[0] > out_img[1] + 1.0
        green = out_img[1] > out_img[0] + 1.0
        for painted, mask in ((red, out_masks[0]), (green, out_masks[1])):
            if mask.sum() < 20:
                continue  # cropped (nearly) away
            # the same place: centroids within a boundary row (0.5 px); large masks also overlap (small ones are mostly
            # boundary, which antialiasing blurs)
            assert (_centroid(painted) - _centroid(mask)).abs().max() <= 0.55, (size_hw, seed)
            if mask.sum() >= 150:
                iou = (painted & mask).sum() / (painted | mask).sum()
                assert iou > 0.85, (size_hw, seed, float(iou))


def _centroid(mask: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.stack([ys.float().mean(), xs.float().mean()])


def test_eval_resize_pads_bottom_right():
    image = normalize(np.full((50, 100, 3), 200, np.uint8))
    out, inner = eval_resize(image, image_size=64)
    assert inner == (32, 64) and out.shape == (3, 64, 64)
    assert out[:, 32:].abs().max() == 0 and out[:, :32].min() > 0


# (height, width) -> resized (h, w) under ResizeShortestEdge(800, max_size=1333), as detectron2 computes it
@pytest.mark.parametrize(("size_hw", "expected_hw"), [
    ((480, 640), (800, 1067)),   # shorter side to 800
    ((640, 480), (1067, 800)),
    ((427, 640), (800, 1199)),
    ((500, 2000), (333, 1333)),  # 800 x 3200 would pass 1333: the longer side is capped instead
    ((2000, 500), (1333, 333)),
    ((800, 800), (800, 800)),
    ((1200, 1600), (800, 1067)),  # larger images are scaled down
    ((3, 5000), (1, 1333)),       # never below one pixel
])
def test_eval_size_is_mask2formers_coco_test_size(size_hw, expected_hw):
    assert eval_size_hw(*size_hw, image_size=1024, min_size=800, max_size=1333) == expected_hw


@pytest.mark.parametrize(("size_hw", "expected_hw"), [
    ((50, 100), (32, 64)), ((100, 50), (64, 32)), ((64, 64), (64, 64)), ((1, 300), (1, 64))])
def test_eval_size_without_min_size_is_the_longer_side_to_image_size(size_hw, expected_hw):
    assert eval_size_hw(*size_hw, image_size=64) == expected_hw
    assert eval_size_hw(*size_hw, image_size=64, max_size=20) == expected_hw  # max_size needs min_size
    assert eval_padded_hw(expected_hw, image_size=64) == (64, 64)


def test_eval_resize_pads_to_multiples_of_32():
    image = normalize(np.full((480, 640, 3), 200, np.uint8))
    out, inner = eval_resize(image, image_size=1024, min_size=800, max_size=1333)
    assert inner == (800, 1067) and out.shape == (3, 800, 1088)
    assert out[:, :, 1067:].abs().max() == 0 and out[:, :, :1067].min() > 0
    out, inner = eval_resize(normalize(np.full((50, 70, 3), 9, np.uint8)), image_size=64, min_size=64, max_size=80)
    assert inner == (57, 80) and out.shape == (3, 64, 96)
    assert out[:, 57:].abs().max() == 0 and out[:, :, 80:].abs().max() == 0 and out[:, :57, :80].max() < 0


def test_epoch_batches_split_across_workers_and_resume():
    one = list(EpochBatchSampler(10, batch_size=4, seed=3, epoch=1))
    assert len(one) == 3 and all(len(b) == 4 for b in one)
    assert {i for b in one for i, _ in b} == set(range(10))  # a full pass (the last batch wraps around)
    w0 = list(EpochBatchSampler(10, batch_size=4, seed=3, epoch=1, rank=0, world_size=2))
    w1 = list(EpochBatchSampler(10, batch_size=4, seed=3, epoch=1, rank=1, world_size=2))
    assert [a + b for a, b in zip(w0, w1, strict=True)] == one
    assert list(EpochBatchSampler(10, batch_size=4, seed=3, epoch=1, skip_steps=2)) == one[2:]
    assert list(EpochBatchSampler(10, batch_size=4, seed=3, epoch=2)) != one
