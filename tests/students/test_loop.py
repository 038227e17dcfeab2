"""The learning-rate schedules of the training loop: Mask2Former's multistep for ``paper``, poly for ``tiny``, both
functions of the step alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from omnilabel.errors import InputError
from omnilabel.students.loop import build_scheduler, lr_factor
from omnilabel.students.run import TrainConfig, make_configs

PAPER = make_configs("paper")[1]


@pytest.mark.parametrize(("step", "factor"), [
    (0, 1.0), (100_000, 1.0), (327_777, 1.0),    # before 88.9 %
    (327_778, 0.1), (355_091, 0.1),              # after the first milestone
    (355_092, 0.01), (368_749, 0.01),            # after 96.3 %
])
def test_paper_preset_is_mask2formers_coco_multistep(step, factor):
    """Base-COCO-InstanceSegmentation.yaml: x 0.1 at iterations 327,778 and 355,092 of 368,750."""
    assert lr_factor(step, total_steps=368_750, train=PAPER) == pytest.approx(factor)


def test_multistep_scales_to_any_length():
    assert [lr_factor(s, total_steps=1000, train=PAPER) for s in (888, 889, 962, 963)] == pytest.approx(
        [1.0, 0.1, 0.1, 0.01])  # milestones round(0.8889 * 1000) = 889 and round(0.9630 * 1000) = 963
    halves = dataclasses.replace(PAPER, lr_steps=(0.5, 1.0), lr_gamma=0.5)
    assert [lr_factor(s, total_steps=10, train=halves) for s in (4, 5, 9)] == [1.0, 0.5, 0.5]  # 1.0: never reached


def test_poly_by_name():
    tiny = make_configs("tiny")[1]
    assert tiny.lr_schedule == "poly"
    assert lr_factor(0, total_steps=1000, train=tiny) == 1.0
    assert lr_factor(500, total_steps=1000, train=tiny) == pytest.approx(0.5 ** 0.9)
    assert lr_factor(1000, total_steps=1000, train=tiny) == 0.0
    paper_poly = make_configs("paper", lr_schedule="poly")[1]
    assert lr_factor(750, total_steps=1000, train=paper_poly) == pytest.approx(0.25 ** 0.9)
    with pytest.raises(InputError, match="cosine"):
        lr_factor(0, total_steps=10, train=dataclasses.replace(tiny, lr_schedule="cosine"))


def _optimizer() -> torch.optim.Optimizer:
    heads, backbone = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    return torch.optim.AdamW([{"params": [heads], "lr": 1e-4}, {"params": [backbone], "lr": 1e-5}], lr=1e-4)


def _lrs(scheduler: torch.optim.lr_scheduler.LRScheduler, optimizer: torch.optim.Optimizer, steps: int) -> list:
    seen = []
    for _ in range(steps):
        seen.append([g["lr"] for g in optimizer.param_groups])  # the lr optimiser step k uses
        optimizer.step()
        scheduler.step()
    return seen


@pytest.mark.parametrize("preset", ["paper", "tiny"])
def test_scheduler_resumes_exactly(preset):
    train = make_configs(preset)[1]
    optimizer = _optimizer()
    straight = _lrs(build_scheduler(optimizer, total_steps=30, train=train), optimizer, 30)
    assert straight[0] == pytest.approx([1e-4, 1e-5])
    if preset == "paper":  # milestones round(0.889 * 30) = 27 and round(0.963 * 30) = 29
        assert straight[26] == pytest.approx([1e-4, 1e-5]) and straight[27] == pytest.approx([1e-5, 1e-6])
        assert straight[29] == pytest.approx([1e-6, 1e-7])
    optimizer = _optimizer()
    first = build_scheduler(optimizer, total_steps=30, train=train)
    _lrs(first, optimizer, 27)  # interrupted right at a milestone
    checkpoint = {"optimizer": optimizer.state_dict(), "scheduler": first.state_dict()}
    optimizer = _optimizer()  # a new process: fresh optimiser and scheduler, then the checkpoint, as train_loop does
    resumed = build_scheduler(optimizer, total_steps=30, train=train)
    optimizer.load_state_dict(checkpoint["optimizer"])
    resumed.load_state_dict(checkpoint["scheduler"])
    assert _lrs(resumed, optimizer, 3) == straight[27:]


def test_train_config_defaults_are_the_paper_recipe():
    assert TrainConfig().lr_schedule == "multistep" and TrainConfig().lr_steps == (327778 / 368750, 355092 / 368750)
