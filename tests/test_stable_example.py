"""Stable-SAM on the shipped example: plugins trained on top of the shipped teacher make it better and steadier
under noisy boxes on images it was not trained on (``omnilabel stability``)."""

from __future__ import annotations

import json
from pathlib import Path

from cli_runner import run_in_process as run

from omnilabel.jobs.options import Dataset
from omnilabel.jobs.stability import StabilityConfig, StabilityModels, run_stability
from omnilabel.ops.stability import PromptType
from omnilabel.teachers.teacher_ckpt import file_size_mb, read_teacher

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TEACHER = EXAMPLES / "teacher" / "shapes-sam.pt"
SHAPES = EXAMPLES / "shapes"
#: --stable steps of 8 instances. Measured on all 60 example images (k = 8), noisy-box mIoU / mSF: shipped
#: 86.7 / 91.5; 20 steps 86.9 / 91.7; 60 steps 87.0 / 92.0; 150 steps 87.0 / 92.0 (1-point: 80.1 → 80.4 mIoU).
STEPS = 60


def test_stable_plugins_make_the_shipped_teacher_better_and_steadier_under_noisy_boxes(capsys, tmp_path):
    stable = tmp_path / "stable.pt"
    code, _, err = run(capsys, "finetune-teacher", SHAPES / "weak.json", "--images", SHAPES / "images", "--teacher",
                       TEACHER, "--stable", "--steps", STEPS, "--batch-size", 8, "-o", stable)
    assert code == 0, err
    tf = read_teacher(stable)
    assert tf.is_stable and not tf.decoder_included and file_size_mb(stable) < 1.0
    # held out: the images whose objects the weak file does not give as full masks
    weak = json.loads((SHAPES / "weak.json").read_text())
    trained = {a["image_id"] for a in weak["annotations"] if "segmentation" in a}
    gt = json.loads((SHAPES / "gt.json").read_text())
    held = [im["id"] for im in gt["images"] if im["id"] not in trained][:24]
    gt["images"] = [im for im in gt["images"] if im["id"] in held]
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in held]
    coco = tmp_path / "held.json"
    coco.write_text(json.dumps(gt))
    got = run_stability(Dataset(coco, SHAPES / "images"), tmp_path / "held.stability.json",
                        StabilityModels(teachers=(str(TEACHER), str(stable)), plain=False),
                        StabilityConfig(prompts=(PromptType.NOISY_BOX,), k=8))
    shipped, plugins = got["results"]["shapes-sam.pt"]["noisy-box"], got["results"]["stable.pt"]["noisy-box"]
    assert got["encoder_calls"] == 1  # the plugins decode from the shipped teacher's encoder
    assert plugins["miou"] > shipped["miou"] and plugins["msf"] > shipped["msf"], (shipped, plugins)
