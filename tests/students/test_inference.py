"""Student inference: evaluation sizes from student.json, non-square frames, and predictions that do not depend on
the other images of a batch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from omnilabel.io import write_json_atomic
from omnilabel.students.inference import PredictConfig, coco_results, postprocess, predict_images
from omnilabel.students.mask2former import PRESETS, build_model, hf_config
from omnilabel.students.predict import PredictTask, PredictWorker
from omnilabel.students.run import checkpoint_path, eval_sizes, save_checkpoint

#: Sizes (H, W) chosen so that, at min 64 / max 96, three images share the frame 64 x 96, two 64 x 64, one 96 x 64.
SIZES = [(90, 150), (200, 70), (64, 64), (50, 100), (64, 64), (30, 40)]


@pytest.fixture(scope="module")
def student() -> torch.nn.Module:
    torch.manual_seed(0)
    _, m2f = hf_config(dataclasses.replace(PRESETS["tiny"], image_size=64), class_names=["a", "b", "c"])
    return build_model(m2f.to_dict()).eval()


def _images(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    images = []
    for h, w in SIZES:
        image = np.full((h, w, 3), 60, np.uint8)
        y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        image[y0:y0 + h // 2, x0:x0 + w // 2] = rng.integers(0, 255, 3)  # one bright block per image
        images.append(image)
    return images


def _assert_same_predictions(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...]) -> None:
    """Same instances up to float rounding: each of ``a`` has a partner in ``b`` of the same label, a score within
    1e-4 and a mask of IoU >= 0.99 (near-equal scores may swap places)."""
    (masks_a, scores_a, labels_a), (masks_b, scores_b, labels_b) = a, b
    assert len(scores_a) == len(scores_b) and masks_a.shape == masks_b.shape
    free = set(range(len(scores_b)))
    for mask, score, label in zip(masks_a, scores_a, labels_a, strict=True):
        partner = next((j for j in sorted(free) if labels_b[j] == label and abs(scores_b[j] - score) <= 1e-4
                        and (mask & masks_b[j]).sum() >= 0.99 * (mask | masks_b[j]).sum()), None)
        assert partner is not None, (float(score), int(label))
        free.remove(partner)


@pytest.mark.parametrize(("min_size", "max_size"), [(None, None), (64, 96)])
def test_one_image_at_a_time_equals_one_batch(student, min_size, max_size):
    images = _images()
    sizes = {"image_size": 64, "min_size": min_size, "max_size": max_size}
    alone = [predict_images(student, [image], **sizes)[0] for image in images]
    batched = predict_images(student, images, **sizes, config=PredictConfig(batch_size=4))
    shuffled = predict_images(student, images[::-1], **sizes, config=PredictConfig(batch_size=2))[::-1]
    for image, one, many, other in zip(images, alone, batched, shuffled, strict=True):
        assert one[0].shape[1:] == image.shape[:2] and len(one[1]) > 0
        _assert_same_predictions(one, many)
        _assert_same_predictions(one, other)


def test_postprocess_crops_a_non_square_frame():
    """A query whose mask covers the left half of the image inside a 64 x 96 frame (the image 48 x 80 of it) gives
    the left half of the 30 x 50 original."""
    class_logits = torch.tensor([[10.0, -10.0, -10.0], [-10.0, -10.0, 10.0]])  # query 1 predicts "no object"
    mask_logits = torch.full((2, 16, 24), -10.0)
    mask_logits[:, :12, :10] = 10.0  # 1/4 resolution: 10 of the image's 20 columns, all of its 12 rows
    masks, scores, labels = postprocess(class_logits, mask_logits, padded_hw=(64, 96), inner_hw=(48, 80),
                                        out_hw=(30, 50), top_k=1)
    assert masks.shape == (1, 30, 50) and labels.tolist() == [0] and scores[0] > 0.99
    # columns 0-24 (one of blur at the edge); without the crop the padding would shrink it to 21 columns
    assert masks[0][:, :24].all() and not masks[0][:, 26:].any()


def test_eval_sizes_come_from_student_json():
    paper = {"config": dataclasses.asdict(PRESETS["paper"])}
    assert eval_sizes(paper) == {"image_size": 1024, "min_size": 800, "max_size": 1333}
    tiny = {"config": dataclasses.asdict(PRESETS["tiny"])}
    assert eval_sizes(tiny) == {"image_size": 128, "min_size": None, "max_size": None}
    written_before = {"config": {"image_size": 1024, "backbone": "resnet50"}}  # no evaluation sizes recorded
    assert eval_sizes(written_before) == {"image_size": 1024, "min_size": None, "max_size": None}


def test_predict_worker_takes_the_sizes_from_student_json(tmp_path):
    """A run directory whose student.json has evaluation sizes is predicted at them; one without (written before
    they existed) at the old square."""
    cfg = dataclasses.replace(PRESETS["tiny"], image_size=64, eval_min_size=64, eval_max_size=96)
    _, m2f = hf_config(cfg, class_names=["a", "b", "c"])
    torch.manual_seed(0)
    model = build_model(m2f.to_dict()).eval()
    images = _images()
    tasks = []
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        tasks.append(PredictTask(i + 1, str(tmp_path / f"{i}.png")))
    config = PredictConfig(batch_size=3)
    for name, config_json, sizes in (
            ("new", dataclasses.asdict(cfg), {"min_size": 64, "max_size": 96}),
            ("old", {k: v for k, v in dataclasses.asdict(cfg).items() if not k.startswith("eval_")}, {})):
        run = tmp_path / name
        write_json_atomic({"config": config_json, "category_ids": [1, 2, 3], "mask2former": m2f.to_dict()},
                          run / "student.json")
        save_checkpoint({"model": model.state_dict(), "step": 1}, checkpoint_path(run, 1))
        records = PredictWorker(str(run), None, config, "cpu")(tasks)
        preds = predict_images(model, images, image_size=64, **sizes, config=config)
        expected = [coco_results(i + 1, *p, category_ids=[1, 2, 3]) for i, p in enumerate(preds)]
        assert [r["results"] for r in records] == expected, name
