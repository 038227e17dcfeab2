"""SUM training (``finetune-teacher --unlabeled``): batches, prompts, task prompt, losses, a run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from omnilabel.data.maps import UncertaintyMap
from omnilabel.errors import InputError
from omnilabel.jobs.options import Dataset, JobOptions
from omnilabel.jobs.train_teacher import TeacherRecipe, run_finetune_teacher
from omnilabel.teachers.finetune import FinetuneConfig, TaskPrompt, mask_losses, ua_mask_losses
from omnilabel.teachers.finetune_data import (
    collect_training_set,
    collect_unlabeled,
    mixed_batch_instances,
    sample_unlabeled_prompt,
)
from omnilabel.teachers.loading import TeacherSpec, load_teachers, model_refs, refiner_mismatch, resolve_paths
from omnilabel.teachers.teacher_ckpt import read_teacher


def test_mixed_batches_alternate_kinds_cover_each_epoch_and_do_not_depend_on_workers():
    whole = mixed_batch_instances(3, batch_size=8, n_labeled=5, n_unlabeled=7, seed=1)
    assert whole[1].tolist() == [False, True] * 4
    halves = [mixed_batch_instances(3, batch_size=8, n_labeled=5, n_unlabeled=7, seed=1, rank=r, world_size=2)
              for r in (0, 1)]
    for a, b in zip(whole, (np.concatenate([h[k] for h in halves]) for k in range(3)), strict=True):
        assert np.array_equal(a, b)
    # 4 labelled per step: steps 0-4 draw 20 labelled = 4 epochs of 5, each a permutation
    lab = np.concatenate([mixed_batch_instances(s, batch_size=8, n_labeled=5, n_unlabeled=7, seed=1)[2][0::2]
                          for s in range(5)])
    for e in range(4):
        assert sorted(lab[5 * e:5 * e + 5].tolist()) == [0, 1, 2, 3, 4]
    unl = np.concatenate([mixed_batch_instances(s, batch_size=8, n_labeled=5, n_unlabeled=7, seed=1)[2][1::2]
                          for s in range(7)])
    for e in range(4):
        assert sorted(unl[7 * e:7 * e + 7].tolist()) == list(range(7))


def test_unlabeled_point_is_drawn_where_the_pseudomask_is_certain():
    mask = np.zeros((6, 6), dtype=bool)
    mask[1:5, 1:5] = True
    certainty = np.zeros((6, 6))
    certainty[3, 2] = 1.0  # the only certain pixel of the mask
    certainty[0, 0] = 1.0  # certain, but outside the mask
    for seed in range(20):
        point, box = sample_unlabeled_prompt(mask, certainty, "points", np.random.default_rng(seed))
        assert point.tolist() == [2.5, 3.5] and np.isnan(box).all()
    _, box = sample_unlabeled_prompt(mask, certainty, "boxes", np.random.default_rng(0))
    assert box.tolist() == [1, 1, 4, 4]


def test_task_prompt_leaves_task_0_exactly_sam_and_trains_only_task_1():
    tp = TaskPrompt(4)
    assert torch.equal(tp.gt, torch.zeros(4))
    with torch.no_grad():
        tp.gt.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    dense = torch.randn(2, 4, 3, 3)
    out = tp(dense, torch.tensor([0, 1]))
    assert torch.equal(out[0], dense[0])
    assert torch.allclose(out[1], dense[1] + torch.tensor([1.0, 2.0, 3.0, 4.0])[:, None, None])
    tp(dense, torch.tensor([0, 0])).sum().backward()
    assert torch.equal(tp.gt.grad, torch.zeros(4))  # pseudomasks never move the GT task's vector


def test_ua_losses_with_full_certainty_reduce_to_focal_and_dice_and_vanish_without():
    cfg = FinetuneConfig(num_points=64, ua_focal_weight=1.0, ua_dice_weight=0.0)
    gen = [torch.Generator().manual_seed(0)]
    logits = torch.randn(1, 3, 8, 8)
    target = (torch.rand(1, 1, 32, 32) > 0.5).float()
    iou = torch.rand(1, 3)
    none, iou_loss = ua_mask_losses(logits, iou, target, torch.zeros(1, 1, 32, 32), config=cfg, generators=gen)
    assert none.item() == 0.0  # c = 0: no focal term; Dice over no point is 0
    cfg_dice = FinetuneConfig(num_points=64, ua_focal_weight=0.0, ua_dice_weight=1.0)
    gen = [torch.Generator().manual_seed(0)]
    assert ua_mask_losses(logits, iou, target, torch.zeros(1, 1, 32, 32), config=cfg_dice,
                          generators=gen)[0].item() == 0.0
    # the IoU head learns the pseudomask's IoU as for GT
    gen = [torch.Generator().manual_seed(0)]
    assert torch.allclose(iou_loss, mask_losses(logits, iou, target, config=cfg, generators=gen)[1])


def _pseudo_copy(shapes_coco: Path, tmp_path: Path, *, with_maps: bool = True) -> tuple[Path, Path]:
    """The synthetic set as a labelled file (a third of its images keep GT) and a pseudomask file of the
    rest, each pseudomask with a map (u = 0.9 on its mask's top rows, else 0)."""
    data = json.loads(shapes_coco.read_text())
    keep = {im["id"] for im in data["images"][: len(data["images"]) // 3]}
    labelled = {**data, "annotations": [a for a in data["annotations"] if a["image_id"] in keep]}
    pseudo_anns = []
    for a in data["annotations"]:
        meta = {"source": "gt" if a["image_id"] in keep else "pseudo", "weak": "boxes"}
        if meta["source"] == "pseudo" and with_maps:
            from pycocotools import mask as mask_utils

            m = mask_utils.decode(a["segmentation"]).astype(bool)
            u = np.zeros(m.shape, np.float32)
            u[: m.shape[0] // 4] = 0.9
            UncertaintyMap(u).save(tmp_path / "pseudo.uncertainty" / f"{a['id']}.png")
            meta["uncertainty"] = f"pseudo.uncertainty/{a['id']}.png"
        pseudo_anns.append({**a, "omnilabel": meta})
    lab, pse = tmp_path / "labelled.json", tmp_path / "pseudo.json"
    lab.write_text(json.dumps(labelled))
    pse.write_text(json.dumps({**data, "annotations": pseudo_anns}))
    return lab, pse


def test_pseudomasks_are_never_labels_and_need_their_maps(shapes_coco, tmp_path):
    lab, pse = _pseudo_copy(shapes_coco, tmp_path)
    data = json.loads(pse.read_text())
    n_gt = sum(a["omnilabel"]["source"] == "gt" for a in data["annotations"])
    images, instances = collect_training_set(data, shapes_coco.parent / "images", pseudo=False)
    assert len(instances) == n_gt
    unlabeled = collect_unlabeled(data, shapes_coco.parent / "images", images, map_dir=tmp_path)
    assert len(unlabeled) == len(data["annotations"]) - n_gt
    assert all(u.uncertainty and Path(u.uncertainty).is_file() for u in unlabeled)
    assert {images[u.image_index].image_id for u in unlabeled}.isdisjoint({images[i.image_index].image_id
                                                                            for i in instances})
    (tmp_path / "bare").mkdir()
    _, bare = _pseudo_copy(shapes_coco, tmp_path / "bare", with_maps=False)
    with pytest.raises(InputError, match=r"omnilabel\.uncertainty.*annotation id=\d+.*omnilabel uncertainty"):
        collect_unlabeled(json.loads(bare.read_text()), shapes_coco.parent / "images", [], map_dir=tmp_path / "bare")
    gt_only = {**data, "annotations": [a for a in data["annotations"] if a["omnilabel"]["source"] == "gt"]}
    with pytest.raises(InputError, match="has none"):
        collect_unlabeled(gt_only, shapes_coco.parent / "images", [], map_dir=tmp_path)


def test_sum_run_writes_a_task_prompt_that_pseudomask_decodes_with(shapes_coco, tiny_sam_path, tmp_path):
    lab, pse = _pseudo_copy(shapes_coco, tmp_path)
    out = tmp_path / "sum.pt"
    recipe = TeacherRecipe(FinetuneConfig(steps=3, batch_size=4, lr=1e-2, num_points=256, log_every=1),
                           sam=str(tiny_sam_path), unlabeled=str(pse))
    summary = run_finetune_teacher(Dataset(lab, shapes_coco.parent / "images"), out, JobOptions(num_workers=0),
                                   recipe)
    data = json.loads(pse.read_text())
    assert summary["unlabeled"] == sum(a["omnilabel"]["source"] == "pseudo" for a in data["annotations"])
    tf = read_teacher(out)
    assert tf.meta["config"]["unlabeled"] is True
    gt = tf.part("task_prompt")["gt"]
    assert gt.shape == (tf.meta["arch"]["out_chans"],) and gt.abs().sum() > 0  # the GT task was trained
    spec = TeacherSpec(teacher=str(out), sam=str(tiny_sam_path), detector="none")
    teachers = load_teachers(spec, resolve_paths(spec, load_detector=False))
    assert torch.equal(teachers.sam.dense_offset.view(-1), gt)


def test_a_teacher_started_from_one_that_holds_its_encoder_loads_on_its_own(shapes_coco, tiny_sam_path, tmp_path):
    images = Dataset(shapes_coco, shapes_coco.parent / "images")
    small = {"steps": 1, "batch_size": 2, "num_points": 64}
    own = tmp_path / "own.pt"  # its encoder differs from the base's: it was trained
    run_finetune_teacher(images, own, JobOptions(num_workers=0), TeacherRecipe(
        FinetuneConfig(train_encoder=True, lr=1e-2, **small), sam=str(tiny_sam_path)))
    child = tmp_path / "child.pt"
    run_finetune_teacher(images, child, JobOptions(num_workers=0), TeacherRecipe(
        FinetuneConfig(**small), teacher=str(own)))
    tf = read_teacher(child)
    assert tf.encoder_included and tf.encoder_sha256 == read_teacher(own).encoder_sha256
    spec = TeacherSpec(teacher=str(child), detector="none")  # no --sam: the file is enough
    teachers = load_teachers(spec, resolve_paths(spec, load_detector=False))
    assert teachers.sam.sam.image_encoder is not None
    refiner = tmp_path / "refiner.pt"  # a refiner of it holds no encoder: it decodes beside its teacher
    run_finetune_teacher(images, refiner, JobOptions(num_workers=0), TeacherRecipe(
        FinetuneConfig(prompts="refine", min_iou=0.0, **small), teacher=str(child)))
    assert not read_teacher(refiner).encoder_included
    # it refines the masks of the teacher it was trained from; with another one, a warning says so
    fits = TeacherSpec(teacher=str(child), refiner=str(refiner), detector="none")
    assert refiner_mismatch(fits, model_refs(fits, load_detector=False)) is None
    other = TeacherSpec(teacher=str(own), refiner=str(refiner), detector="none")
    assert "trained on the masks of teacher child.pt" in refiner_mismatch(other, model_refs(other, load_detector=False))
