"""The weighted Mask2Former loss: equal to transformers' loss at weight 1, linear in each target's weight."""

from __future__ import annotations

import pytest
import torch
from transformers import Mask2FormerConfig, ResNetConfig
from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

from omnilabel.students.loss import WeightedMask2FormerLoss, total_loss
from omnilabel.students.mask2former import quiet_transformers

WEIGHT_DICT = {"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}


@pytest.fixture(scope="module")
def config() -> Mask2FormerConfig:
    with quiet_transformers():
        backbone = ResNetConfig(hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1], out_features=["stage4"])
        return Mask2FormerConfig(backbone_config=backbone, num_labels=3, num_queries=6, train_num_points=64)


def _inputs(seed: int = 0, *, counts: tuple[int, ...] = (2, 3)) -> dict:
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
    torch.manual_seed(123)  # both losses draw their sample points from the global generator, in the same order
    return loss_fn(**inputs, **kwargs)


def test_unit_weights_equal_transformers_loss(config):
    inputs = _inputs()
    ref = _run(Mask2FormerLoss(config, WEIGHT_DICT), inputs)
    ours = _run(WeightedMask2FormerLoss(config, WEIGHT_DICT), inputs,
                target_weights=[torch.ones(2), torch.ones(3)])
    assert set(ours) == set(ref) and len(ref) == 6  # 3 terms x (last layer + 1 auxiliary)
    for key in ref:
        assert ours[key].item() == pytest.approx(ref[key].item(), rel=1e-5, abs=1e-6), key
    assert total_loss(ours, WEIGHT_DICT).item() == pytest.approx(
        sum(v.item() * next(w for k, w in WEIGHT_DICT.items() if k in key) for key, v in ref.items()), rel=1e-5)


def test_each_term_is_linear_in_a_targets_weight(config):
    inputs = _inputs(1)
    loss = WeightedMask2FormerLoss(config, WEIGHT_DICT)

    def at(w: float) -> dict[str, torch.Tensor]:
        return _run(loss, inputs, target_weights=[torch.tensor([1.0, w]), torch.ones(3)])

    zero, half, one = at(0.0), at(0.5), at(1.0)
    for key in one:
        assert half[key].item() == pytest.approx((zero[key].item() + one[key].item()) / 2, rel=1e-5, abs=1e-6), key
    # the target matters: without it (weight 0) every term of the last layer changes
    assert all(abs(one[k].item() - zero[k].item()) > 1e-4 for k in ("loss_mask", "loss_dice", "loss_cross_entropy"))


def test_zero_weight_gives_its_query_no_mask_gradient(config):
    inputs = _inputs(2, counts=(2,))
    inputs["auxiliary_predictions"] = None
    logits = inputs["masks_queries_logits"].requires_grad_(True)
    loss = WeightedMask2FormerLoss(config, WEIGHT_DICT)
    torch.manual_seed(0)
    terms = loss(**inputs, target_weights=[torch.tensor([0.0, 1.0])])
    (terms["loss_mask"] + terms["loss_dice"]).backward()
    indices = loss._match(logits.detach(), inputs["class_queries_logits"], inputs["mask_labels"],
                          inputs["class_labels"])
    queries, targets = indices[0]
    grad_per_query = logits.grad[0].abs().flatten(1).sum(1)
    silent = int(queries[targets == 0])
    heard = int(queries[targets == 1])
    assert grad_per_query[silent].item() == 0.0
    assert grad_per_query[heard].item() > 0.0


def test_images_without_targets(config):
    inputs = _inputs(3, counts=(0, 2))
    terms = WeightedMask2FormerLoss(config, WEIGHT_DICT)(**inputs, target_weights=[torch.ones(0), torch.ones(2)])
    assert all(torch.isfinite(v) for v in terms.values())
    empty = _inputs(4, counts=(0, 0))
    empty["masks_queries_logits"].requires_grad_(True)
    terms = WeightedMask2FormerLoss(config, WEIGHT_DICT)(**empty)
    total = total_loss(terms, WEIGHT_DICT)
    total.backward()  # only "no object" to learn; the mask logits still get a (zero) gradient
    assert terms["loss_mask"].item() == 0.0 and terms["loss_cross_entropy"].item() > 0
    assert empty["masks_queries_logits"].grad is not None
