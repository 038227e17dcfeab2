"""``train-prompter``: samples once per image (in-process or Ray), resumable epochs, a file tied to its SAM."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from omnilabel.errors import CheckpointError, InputError, JobError
from omnilabel.jobs.options import Dataset, JobOptions
from omnilabel.jobs.train_prompter import run_train_prompter
from omnilabel.models.sam_loader import load_sam
from omnilabel.models.tiny import build_tiny_sam, save_sam_checkpoint
from omnilabel.models.tiny_dinov2 import build_tiny_dinov2
from omnilabel.teachers.loading import TeacherSpec
from omnilabel.teachers.sam import SamTeacher
from omnilabel.teachers.uois import HpgConfig, load_prompter, read_prompter
from omnilabel.teachers.uois_train import PrompterTrainConfig
from tests.cli_runner import run_in_process, run_subprocess

HPG = HpgConfig(input_hw=(96, 96), head_width=32, sigma_px=3.0)


def _run(shapes_coco, tiny_sam_path, tiny_dinov2_dir, out, *, epochs=2, val=True, job=None, on_event=None):
    data = Dataset(shapes_coco, shapes_coco.parent / "images")
    return run_train_prompter(data, out, val=data if val else None, teachers=TeacherSpec(sam=str(tiny_sam_path)),
                              backbone=str(tiny_dinov2_dir), hpg=HPG,
                              recipe=PrompterTrainConfig(epochs=epochs, hpg_batch=4, prompts_per_image=8),
                              job=job or JobOptions(), on_event=on_event)


def test_trains_and_writes_a_file_bound_to_its_sam_and_backbone(shapes_coco, tiny_sam_path, tiny_dinov2_dir,
                                                                 tmp_path):
    summary = _run(shapes_coco, tiny_sam_path, tiny_dinov2_dir, tmp_path / "p.pt")
    assert summary["images"] == {"train": 12, "val": 12} and summary["epochs"] == 2
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    assert summary["best"]["hpg"]["epoch"] in (1, 2)
    # every image encoded once by each model: one sample file per image and split
    assert len(list((tmp_path / "p.job" / "samples").glob("*.npz"))) == 24
    pf = read_prompter(tmp_path / "p.pt")
    assert pf.hpg == HPG and pf.backbone["source"] == str(tiny_dinov2_dir.resolve())
    assert pf.sam["source"] == str(tiny_sam_path.resolve())
    sam = SamTeacher(load_sam(tiny_sam_path))
    prompter = load_prompter(pf, sam, tiny_dinov2_dir, sam_name="tiny")
    image = np.random.default_rng(0).integers(0, 256, (80, 100, 3), dtype=np.uint8)
    res = prompter.segment(image, sam.encode(image))
    assert res.masks.shape[1:] == (80, 100) and len(res.masks) == len(res.scores) <= HPG.max_peaks
    other = SamTeacher(load_sam(save_sam_checkpoint(build_tiny_sam(seed=1), tmp_path / "other.pth")))
    with pytest.raises(CheckpointError, match="trained against SAM"):
        load_prompter(pf, other, tiny_dinov2_dir, sam_name="--sam other.pth")
    other_backbone = build_tiny_dinov2(tmp_path / "other-dino", seed=1)
    with pytest.raises(CheckpointError, match="trained on backbone"):
        load_prompter(pf, sam, other_backbone, sam_name="tiny")


class Crash(Exception):
    pass


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(shapes_coco, tiny_sam_path, tiny_dinov2_dir,
                                                                     tmp_path):
    _run(shapes_coco, tiny_sam_path, tiny_dinov2_dir, tmp_path / "a.pt", epochs=3)

    def crash_after_first_epoch(ev):
        if ev["event"] == "losses" and ev["epoch"] == 1:
            raise Crash

    with pytest.raises(Crash):
        _run(shapes_coco, tiny_sam_path, tiny_dinov2_dir, tmp_path / "b.pt", epochs=3,
             on_event=crash_after_first_epoch)
    assert not (tmp_path / "b.pt").exists()
    with pytest.raises(JobError, match="--resume"):
        _run(shapes_coco, tiny_sam_path, tiny_dinov2_dir, tmp_path / "b.pt", epochs=3)
    summary = _run(shapes_coco, tiny_sam_path, tiny_dinov2_dir, tmp_path / "b.pt", epochs=3,
                   job=JobOptions(resume=True))
    assert summary["start_epoch"] == 1
    a, b = read_prompter(tmp_path / "a.pt"), read_prompter(tmp_path / "b.pt")
    for part in ("head", "hdnet"):
        assert all(torch.equal(a.__dict__[part][k], b.__dict__[part][k]) for k in a.__dict__[part]), part
    assert a.training["history"] == b.training["history"]


def test_ray_workers_write_the_samples_one_process_writes(shapes_coco, tiny_sam_path, tiny_dinov2_dir, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(JobOptions(num_workers=2).threads_per_worker())
    try:
        _run(shapes_coco, tiny_sam_path, tiny_dinov2_dir, tmp_path / "one.pt", epochs=1, val=False)
    finally:
        torch.set_num_threads(threads)
    done = run_subprocess("train-prompter", shapes_coco, "--images", shapes_coco.parent / "images", "-o",
                          tmp_path / "ray.pt", "--sam", tiny_sam_path, "--backbone", tiny_dinov2_dir, "--epochs", "1",
                          "--input-size", "96x96",
                          "--sigma", "3", "--prompts-per-image", "8", "--batch-size", "4", "--num-workers", "2")
    assert done.returncode == 0, done.stderr
    one = sorted((tmp_path / "one.job" / "samples").iterdir())
    ray = sorted((tmp_path / "ray.job" / "samples").iterdir())
    assert [p.name for p in one] == [p.name for p in ray] and len(one) == 12
    for p, q in zip(one, ray, strict=True):
        a, b = np.load(p), np.load(q)
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            assert np.array_equal(a[k], b[k]), (p.name, k)


def test_cli_trains_and_prints_its_summary(shapes_coco, tiny_sam_path, tiny_dinov2_dir, tmp_path, capsys):
    images = shapes_coco.parent / "images"
    code, out, err = run_in_process(capsys, "train-prompter", shapes_coco, "--images", images, "-o", tmp_path / "p.pt",
                                    "--sam", tiny_sam_path, "--backbone", tiny_dinov2_dir, "--epochs", "1",
                                    "--input-size", "96x96", "--prompts-per-image", "4", "--val", shapes_coco,
                                    "--val-images", images)
    assert code == 0, err
    assert "wrote" in out and "best HPG" in out and "epoch 1:" in out + err
    assert read_prompter(tmp_path / "p.pt").training["images"] == 12


def test_bad_input_is_refused_before_any_model_loads(shapes_coco, tiny_sam_path, tiny_dinov2_dir, tmp_path):
    tags = json.loads(shapes_coco.read_text())
    for ann in tags["annotations"]:
        ann.pop("segmentation")
        ann.pop("bbox", None)
    (shapes_coco.parent / "tags.json").write_text(json.dumps(tags))
    with pytest.raises(InputError, match="no annotation has a `segmentation`"):
        _run(shapes_coco.parent / "tags.json", tiny_sam_path, tiny_dinov2_dir, tmp_path / "p.pt", val=False)
    with pytest.raises(JobError, match="no run"):
        _run(shapes_coco, tiny_sam_path, tiny_dinov2_dir, tmp_path / "q.pt", job=JobOptions(resume=True))
    with pytest.raises(InputError, match="multiple of the backbone's patch size"):
        run_train_prompter(Dataset(shapes_coco, shapes_coco.parent / "images"), tmp_path / "r.pt",
                           teachers=TeacherSpec(sam=str(tiny_sam_path)),
                           backbone=str(tiny_dinov2_dir), hpg=HpgConfig(input_hw=(90, 90)),
                           recipe=PrompterTrainConfig(epochs=1))
