"""``train-student --uncertainty``: pseudomask mask losses weighted per point by the certainty ``1 - u``.

The loss (unit certainty is Mask2Former's loss, zero certainty silences a target, a hand-computed case), the data
(the certainty map stays on its mask's pixels through LSJ), the errors, and a short run through the job."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import run_in_process as cli
from PIL import Image
from transformers import Mask2FormerConfig, ResNetConfig
from transformers.models.mask2former.modeling_mask2former import sample_point

from omnilabel.data.maps import UncertaintyMap
from omnilabel.data.synthetic import make_dataset
from omnilabel.errors import InputError, JobError
from omnilabel.ops.masks import masks_to_rle, rle_to_masks
from omnilabel.students.certainty import pseudomask_uncertainty_paths
from omnilabel.students.data import (
    TrainDataset,
    collate,
    lsj,
    lsj_with_certainty,
    normalize,
    training_samples,
)
from omnilabel.students.loss import WeightedMask2FormerLoss, point_mask_losses
from omnilabel.students.mask2former import quiet_transformers

WEIGHT_DICT = {"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}


def _config(num_queries: int = 6) -> Mask2FormerConfig:
    with quiet_transformers():
        backbone = ResNetConfig(hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1], out_features=["stage4"])
        return Mask2FormerConfig(backbone_config=backbone, num_labels=3, num_queries=num_queries, train_num_points=64)


def _inputs(seed: int, counts: tuple[int, ...] = (2, 3)) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = len(counts)
    return {
        "masks_queries_logits": torch.randn(batch, 6, 8, 8, generator=g),
        "class_queries_logits": torch.randn(batch, 6, 4, generator=g),
        "mask_labels": [(torch.rand(n, 32, 32, generator=g) > 0.6).float() for n in counts],
        "class_labels": [torch.randint(0, 3, (n,), generator=g) for n in counts],
        "auxiliary_predictions": [{"masks_queries_logits": torch.randn(batch, 6, 8, 8, generator=g),
                                   "class_queries_logits": torch.randn(batch, 6, 4, generator=g)}],
    }


def _run(loss_fn, inputs: dict, **kwargs) -> dict[str, torch.Tensor]:
    torch.manual_seed(7)  # the matcher and the point sampler draw from the global generator
    return loss_fn(**inputs, **kwargs)


# --- the loss -------------------------------------------------------------------------------------------------


def test_unit_certainty_is_the_unweighted_loss():
    loss, inputs = WeightedMask2FormerLoss(_config(), WEIGHT_DICT), _inputs(0)
    plain = _run(loss, inputs)
    ones = _run(loss, inputs, target_certainty=[torch.ones_like(m) for m in inputs["mask_labels"]])
    assert set(ones) == set(plain) and len(plain) == 6
    for key in plain:  # border points included: c reads 1 there too (not blended with a zero padding)
        assert ones[key].item() == pytest.approx(plain[key].item(), rel=1e-6, abs=1e-7), key


def test_zero_certainty_silences_a_pseudomask_mask_loss():
    loss, inputs = WeightedMask2FormerLoss(_config(), WEIGHT_DICT), _inputs(1)
    certainty = [torch.ones_like(m) for m in inputs["mask_labels"]]
    certainty[0][1] = 0.0  # image 0, target 1: a pseudomask the teacher is wholly unsure of
    weighted = _run(loss, inputs, target_certainty=certainty)
    # its mask terms vanish exactly as with a target weight of 0 …
    dropped = _run(loss, inputs, target_weights=[torch.tensor([1.0, 0.0]), torch.ones(3)])
    plain = _run(loss, inputs)
    for key in weighted:
        if "cross_entropy" in key:  # … while its class term stays that of weight 1
            assert weighted[key].item() == pytest.approx(plain[key].item(), rel=1e-6), key
        else:
            assert weighted[key].item() == pytest.approx(dropped[key].item(), rel=1e-6, abs=1e-7), key
            assert abs(weighted[key].item() - plain[key].item()) > 1e-4, key


def test_zero_certainty_gives_its_query_no_mask_gradient():
    inputs = _inputs(2, counts=(2,))
    inputs["auxiliary_predictions"] = None
    logits = inputs["masks_queries_logits"].requires_grad_(True)
    loss = WeightedMask2FormerLoss(_config(), WEIGHT_DICT)
    certainty = [torch.stack([torch.zeros(32, 32), torch.full((32, 32), 0.5)])]
    terms = _run(loss, inputs, target_certainty=certainty)
    (terms["loss_mask"] + terms["loss_dice"]).backward()
    torch.manual_seed(7)  # the same matching as inside the loss
    (queries, targets), = loss._match(logits.detach(), inputs["class_queries_logits"], inputs["mask_labels"],
                                      inputs["class_labels"])
    grad = logits.grad[0].abs().flatten(1).sum(1)
    assert grad[int(queries[targets == 0])].item() == 0.0
    assert grad[int(queries[targets == 1])].item() > 0.0


# logits, target and certainty of one 2 x 2 mask, read at its four pixel centres (exact bilinear reads)
LOGITS = [[2.0, -1.0], [0.5, -3.0]]
TARGET = [[1.0, 0.0], [1.0, 1.0]]
CERTAINTY = [[1.0, 0.5], [0.0, 0.25]]
CENTRES_XY = [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]  # row-major, as the lists above


def _by_hand() -> tuple[float, float]:
    """BCE_c = (1/P) Σ c_i ce_i; Dice_c = 1 - (2 Σ c p t + 1) / (Σ c p + Σ c t + 1)."""
    p = [1 / (1 + math.exp(-v)) for row in LOGITS for v in row]
    t = [v for row in TARGET for v in row]
    c = [v for row in CERTAINTY for v in row]
    ce = [-(ti * math.log(pi) + (1 - ti) * math.log(1 - pi)) for pi, ti in zip(p, t, strict=True)]
    bce = sum(ci * cei for ci, cei in zip(c, ce, strict=True)) / 4
    inter = sum(ci * pi * ti for ci, pi, ti in zip(c, p, t, strict=True))
    dice = 1 - (2 * inter + 1) / (sum(ci * pi for ci, pi in zip(c, p, strict=True))
                                  + sum(ci * ti for ci, ti in zip(c, t, strict=True)) + 1)
    return bce, dice


def test_point_losses_by_hand():
    bce, dice = point_mask_losses(torch.tensor(LOGITS).view(1, 4), torch.tensor(TARGET).view(1, 4),
                                  torch.tensor(CERTAINTY).view(1, 4))
    expected_bce, expected_dice = _by_hand()
    assert bce.item() == pytest.approx(expected_bce, rel=1e-6)
    assert dice.item() == pytest.approx(expected_dice, rel=1e-6)
    # on paper: ce = .126928, .313262, .474077, 3.048587 -> BCE_c = 1.045706 / 4;
    # Dice_c = 1 - (2 * .892654 + 1) / (1.027124 + 1.25 + 1)
    assert (expected_bce, expected_dice) == pytest.approx((0.261426, 0.150075), abs=2e-6)
    plain_bce, plain_dice = point_mask_losses(torch.tensor(LOGITS).view(1, 4), torch.tensor(TARGET).view(1, 4))
    assert abs(plain_bce.item() - expected_bce) > 0.1 and abs(plain_dice.item() - expected_dice) > 0.05


def test_loss_reads_certainty_at_the_target_points(monkeypatch):
    """One query, one target, the points fixed at the pixel centres: the loss is the hand-computed one."""
    loss = WeightedMask2FormerLoss(_config(num_queries=1), WEIGHT_DICT)
    points = torch.tensor([CENTRES_XY])
    monkeypatch.setattr(loss, "sample_points_using_uncertainty", lambda *args, **kwargs: points)
    terms = loss(torch.tensor(LOGITS)[None, None], torch.randn(1, 1, 4), [torch.tensor(TARGET)[None]],
                 [torch.tensor([1])], target_certainty=[torch.tensor(CERTAINTY)[None]])
    expected_bce, expected_dice = _by_hand()
    assert terms["loss_mask"].item() == pytest.approx(expected_bce, rel=1e-6)
    assert terms["loss_dice"].item() == pytest.approx(expected_dice, rel=1e-6)


# --- the data -------------------------------------------------------------------------------------------------


def _rect(h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    y0, x0, y1, x1 = box
    m[y0:y1, x0:x1] = True
    return m


def _interior(mask: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """Pixels whose (2r+1)^2 neighbourhood is all inside or all outside the mask, and not within r of the canvas
    edge (a mask boundary just beyond the crop blurs the certainty there, unseen in the nearest-resized mask)."""
    m = mask.float()[None, None]
    k = 2 * radius + 1
    inside = -torch.nn.functional.max_pool2d(-m, k, stride=1, padding=radius)[0, 0] > 0.5
    outside = torch.nn.functional.max_pool2d(m, k, stride=1, padding=radius)[0, 0] < 0.5
    firm = inside | outside
    firm[:radius], firm[-radius:], firm[:, :radius], firm[:, -radius:] = False, False, False, False
    return firm


@pytest.mark.parametrize("size_hw", [(90, 150), (200, 70), (64, 64)])
def test_lsj_keeps_certainty_on_its_mask(size_hw):
    """Certainty 1 - mask (off-centre rectangles: a flip or a crop of one but not the other shows) stays 1 - mask
    after LSJ: exactly away from boundaries, at the sampled points, and 1 in the padding."""
    h, w = size_hw
    masks = torch.from_numpy(np.stack([_rect(h, w, (h // 5, w // 6, h // 2, w // 2)),
                                       _rect(h, w, (h // 2, w // 2, h - 3, w - 4))]))
    certainty = 1.0 - masks.float()
    image = normalize(np.full((h, w, 3), 250, np.uint8))  # never the mean colour: zero marks the padding
    blurred = 0
    for seed in range(12):
        out_img, out_masks, out_c = lsj_with_certainty(image, masks, certainty, image_size=96,
                                                       rng=np.random.default_rng(seed + h))
        ref_img, ref_masks = lsj(image, masks, rng=np.random.default_rng(seed + h), image_size=96)
        assert torch.equal(out_img, ref_img) and torch.equal(out_masks, ref_masks)  # the same draws
        assert out_c.shape == (2, 96, 96) and out_c.dtype == torch.float32
        assert 0.0 <= out_c.min() and out_c.max() <= 1.0
        padding = (out_img == 0).all(0)
        assert torch.equal(out_c[:, padding], torch.ones_like(out_c[:, padding]))  # CERTAINTY_PAD
        for m, c in zip(out_masks, out_c, strict=True):
            firm = _interior(m)
            assert (c[firm] - (1.0 - m.float()[firm])).abs().max() < 1e-4, (size_hw, seed)
            blurred += int(((c > 0.05) & (c < 0.95)).sum())  # bilinear: boundaries take values in between
        # what the loss reads: c and the mask at the same random points (border padding for c, as the loss)
        pts = torch.rand(2, 500, 2, generator=torch.Generator().manual_seed(seed))
        m_at = sample_point(out_masks.float()[:, None], pts, align_corners=False)[:, 0]
        c_at = sample_point(out_c[:, None], pts, align_corners=False, padding_mode="border")[:, 0]
        agree = ((m_at + c_at - 1).abs() < 0.05).float().mean()
        assert agree > 0.8, (size_hw, seed, float(agree))
    assert blurred > 0


def _write_image(path: Path, rgb: np.ndarray) -> None:
    Image.fromarray(rgb).save(path)


@pytest.fixture()
def pseudo_coco(tmp_path) -> tuple[dict, Path]:
    """One 60x100 image: a GT rectangle, a pseudomask whose uncertainty is its mask (certainty 1 - mask, a
    16-bit PNG) and a pseudomask with a graded .npy map; maps relative to the COCO file's folder."""
    h, w = 60, 100
    _write_image(tmp_path / "0.png", np.full((h, w, 3), 120, np.uint8))
    gt, p1, p2 = _rect(h, w, (5, 5, 25, 40)), _rect(h, w, (20, 50, 55, 95)), _rect(h, w, (30, 10, 58, 45))
    (tmp_path / "maps").mkdir()
    UncertaintyMap(p1.astype(np.float32)).save(tmp_path / "maps" / "2.png")
    UncertaintyMap(np.tile(np.linspace(0, 1, w, dtype=np.float32), (h, 1))).save(tmp_path / "maps" / "3.npy")
    rle = masks_to_rle(np.stack([gt, p1, p2]))
    anns = [{"id": 1, "image_id": 1, "category_id": 7, "segmentation": rle[0]},
            {"id": 2, "image_id": 1, "category_id": 9, "segmentation": rle[1], "score": 0.9,
             "omnilabel": {"source": "pseudo", "uncertainty": "maps/2.png", "uncertainty_mean": 1.0}},
            {"id": 3, "image_id": 1, "category_id": 9, "segmentation": rle[2], "score": 0.8,
             "omnilabel": {"source": "pseudo", "uncertainty": "maps/3.npy", "uncertainty_mean": 0.5}}]
    data = {"images": [{"id": 1, "file_name": "0.png", "height": h, "width": w}], "annotations": anns,
            "categories": [{"id": 7, "name": "a"}, {"id": 9, "name": "b"}]}
    (tmp_path / "coco.json").write_text(json.dumps(data))
    return data, tmp_path


def test_dataset_carries_certainty_per_target(pseudo_coco):
    data, folder = pseudo_coco
    paths = pseudomask_uncertainty_paths(data, folder / "coco.json")
    assert paths == {2: folder / "maps" / "2.png", 3: folder / "maps" / "3.npy"}
    samples, _ = training_samples(data, folder, category_ids=[7, 9], uncertainty_paths=paths)
    assert samples[0].uncertainty_maps == [None, (2, str(paths[2])), (3, str(paths[3]))]
    ds = TrainDataset(samples, image_size=64, scale_range=(0.8, 1.2), hflip_prob=0.5)
    for seed in range(6):
        item = ds[(0, seed)]
        masks, c = item["mask_labels"], item["certainty"]
        assert c.shape == masks.shape and len(masks) == 3
        assert torch.equal(c[0], torch.ones_like(c[0]))  # ground truth
        firm = _interior(masks[1])
        assert (c[1][firm] - (1.0 - masks[1].float()[firm])).abs().max() < 1e-4  # the map of its own mask
        assert 0.05 < c[2].std() and c[2].min() < 0.5 < c[2].max()  # the graded map, not 1
    batch = collate([ds[(0, 1)], ds[(0, 2)]])
    assert [t.shape for t in batch["certainty"]] == [t.shape for t in batch["mask_labels"]]
    # without --uncertainty no certainty is read or built, and the image and masks are the same
    plain_samples, _ = training_samples(data, folder, category_ids=[7, 9])
    assert plain_samples[0].uncertainty_maps is None
    plain = TrainDataset(plain_samples, image_size=64, scale_range=(0.8, 1.2), hflip_prob=0.5)[(0, 1)]
    assert "certainty" not in plain and "certainty" not in collate([plain])
    with_c = ds[(0, 1)]
    assert torch.equal(plain["pixel_values"], with_c["pixel_values"])
    assert torch.equal(plain["mask_labels"], with_c["mask_labels"])


# --- errors ---------------------------------------------------------------------------------------------------


def test_pseudomask_without_a_map_is_an_error(pseudo_coco):
    data, folder = pseudo_coco
    del data["annotations"][2]["omnilabel"]["uncertainty"]
    with pytest.raises(InputError) as err:
        pseudomask_uncertainty_paths(data, folder / "coco.json")
    text = str(err.value)
    assert str(folder / "coco.json") in text and "id=3" in text and "omnilabel.uncertainty" in text
    assert "omnilabel uncertainty" in text and "id=2" not in text
    # a pseudomask that is not trained on (below --min-score) needs no map
    assert set(pseudomask_uncertainty_paths(data, folder / "coco.json", min_score=0.85)) == {2}


def test_no_pseudomask_is_an_error(pseudo_coco):
    data, folder = pseudo_coco
    with pytest.raises(InputError, match=r"coco\.json.*no pseudomask"):
        pseudomask_uncertainty_paths(data, folder / "coco.json", min_score=0.95)  # both below the score
    gt_only = {**data, "annotations": data["annotations"][:1]}
    with pytest.raises(InputError, match="no pseudomask"):
        pseudomask_uncertainty_paths(gt_only, folder / "coco.json")


def test_missing_map_file_is_an_error(pseudo_coco):
    data, folder = pseudo_coco
    (folder / "maps" / "3.npy").unlink()
    with pytest.raises(InputError) as err:
        pseudomask_uncertainty_paths(data, folder / "coco.json")
    assert "id=3" in str(err.value) and "3.npy" in str(err.value) and "coco.json" in str(err.value)


def test_map_of_another_size_is_an_error_naming_the_annotation(pseudo_coco):
    data, folder = pseudo_coco
    UncertaintyMap(np.zeros((60, 99), np.float32)).save(folder / "maps" / "3.npy")
    paths = pseudomask_uncertainty_paths(data, folder / "coco.json")  # only located up front, not opened
    samples, _ = training_samples(data, folder, category_ids=[7, 9], uncertainty_paths=paths)
    with pytest.raises(InputError, match=r"annotation id=3: .*3\.npy.*60x99.*60x100"):
        TrainDataset(samples, image_size=64)[(0, 0)]


def test_cli_refuses_before_training(pseudo_coco, tmp_path, capsys):
    data, folder = pseudo_coco
    del data["annotations"][1]["omnilabel"]["uncertainty"]
    (folder / "missing.json").write_text(json.dumps(data))
    run = tmp_path / "run"
    code, _, err = cli(capsys, "train-student", folder / "missing.json", "--uncertainty", "--preset", "tiny",
                       "--max-steps", "1", "--num-workers", "0", "-o", run)
    assert code == 1 and "id=2" in err and "omnilabel uncertainty" in err
    assert not run.exists()  # nothing written


# --- a short run ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pseudo_scenes(tmp_path_factory) -> Path:
    """Four 64-px scenes; every other annotation turned into a pseudomask with a map (u 0.9 on its left half)."""
    root = make_dataset(tmp_path_factory.mktemp("unc_scenes"), n_images=4, seed=21, size_hw=(64, 64),
                        max_objects=3).parent
    data = json.loads((root / "coco.json").read_text())
    (root / "maps").mkdir()
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    for i, ann in enumerate(data["annotations"]):
        if i % 2:
            h, w = sizes[ann["image_id"]]
            u = np.zeros((h, w), np.float32)
            u[:, : w // 2] = 0.9 * rle_to_masks([ann["segmentation"]], h, w)[0][:, : w // 2]
            UncertaintyMap(u).save(root / "maps" / f"{ann['id']}.png")
            ann.update(score=0.9, omnilabel={"source": "pseudo", "uncertainty": f"maps/{ann['id']}.png",
                                             "uncertainty_mean": float(u.mean())})
    (root / "pseudo.json").write_text(json.dumps(data))
    return root


def test_short_run_records_the_flag_and_refuses_a_changed_resume(pseudo_scenes, tmp_path):
    from omnilabel.jobs.options import Dataset, JobOptions
    from omnilabel.jobs.train_student import StudentInputs, StudentRecipe, run_train_student
    from omnilabel.students.run import make_configs, read_student

    inputs = StudentInputs(Dataset(pseudo_scenes / "pseudo.json", pseudo_scenes / "images"))

    def recipe(**kw) -> StudentRecipe:
        return StudentRecipe(*make_configs("tiny", image_size=64, batch_size=2, checkpoint_every=2, **kw))

    run = tmp_path / "unc"
    summary = run_train_student(inputs, run, JobOptions(num_workers=0), recipe(max_steps=2, uncertainty=True))
    assert summary["steps"] == 2 and summary["counts"]["pseudo"] > 0
    assert read_student(run)["train"]["uncertainty"] is True
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    weighted = [r["loss"] for r in records if r["event"] == "step"]
    assert weighted and all(math.isfinite(v) for v in weighted)
    # the weighting reaches the loss: the same first step without it (same init, batch and points) differs
    plain_run = tmp_path / "plain"
    run_train_student(inputs, plain_run, JobOptions(num_workers=0), recipe(max_steps=1))
    assert read_student(plain_run)["train"]["uncertainty"] is False
    plain = [json.loads(line)["loss"] for line in (plain_run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "step"]
    assert abs(plain[0] - weighted[0]) > 1e-3 * abs(plain[0])
    # a resume must keep the setting
    with pytest.raises(JobError, match="--uncertainty"):
        run_train_student(inputs, run, JobOptions(num_workers=0, resume=True), recipe(max_steps=3))
    with pytest.raises(JobError, match="--no-uncertainty"):
        run_train_student(inputs, plain_run, JobOptions(num_workers=0, resume=True),
                          recipe(max_steps=2, uncertainty=True))
    # without any map the job fails before it writes anything
    gt_only = StudentInputs(Dataset(pseudo_scenes / "coco.json", pseudo_scenes / "images"))
    with pytest.raises(InputError, match="no pseudomask"):
        run_train_student(gt_only, tmp_path / "gt", JobOptions(num_workers=0), recipe(max_steps=1, uncertainty=True))
    assert not (tmp_path / "gt").exists()
