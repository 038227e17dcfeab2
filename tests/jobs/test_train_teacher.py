"""`omnilabel finetune-teacher` end to end, in-process and on 2 Ray Train workers, and its teachers in `pseudomask`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_runner import run_in_process as run
from cli_runner import run_subprocess as _cli
from pycocotools.coco import COCO

from omnilabel.cli import main
from omnilabel.data.weak import split_coco
from omnilabel.models.sam_loader import load_sam
from omnilabel.models.tiny import build_tiny_sam, save_sam_checkpoint
from omnilabel.models.tiny_clip import build_tiny_clip
from omnilabel.teachers.loading import TeacherSpec, load_teachers, resolve_paths
from omnilabel.teachers.teacher_ckpt import read_teacher

TRAIN_FLAGS = ["--steps", "4", "--batch-size", "4", "--lr", "1e-4", "--checkpoint-every", "2"]


@pytest.fixture(scope="module")
def data(shapes_coco, tmp_path_factory) -> Path:
    """The synthetic scenes with half the images weakened to boxes and half to points."""
    root = tmp_path_factory.mktemp("ft_job")
    shutil.copytree(shapes_coco.parent, root / "data")
    gt = json.loads((root / "data" / "coco.json").read_text())
    for weak in ("boxes", "points"):
        (root / "data" / f"weak_{weak}.json").write_text(json.dumps(split_coco(gt, fully=0.5, weak=weak, seed=0)))
    return root / "data"


@pytest.fixture(scope="module")
def cli_teacher(data, tiny_sam_path, tmp_path_factory) -> Path:
    """A BP-SAM fine-tuned through the CLI, in this process."""
    out = tmp_path_factory.mktemp("ft_cli") / "bp.pt"
    main_args = ["finetune-teacher", data / "weak_boxes.json", "--images", data / "images", "--sam", tiny_sam_path,
                 "--prompts", "points+boxes", "-o", out, *TRAIN_FLAGS]
    try:
        main([str(a) for a in main_args])
    except SystemExit as exc:
        assert not exc.code
    return out


def test_finetune_cli_writes_a_small_teacher_and_refuses_a_second_run(capsys, cli_teacher, data, tiny_sam_path):
    capsys.readouterr()
    tf = read_teacher(cli_teacher)
    assert tf.meta["step"] == 4 and tf.meta["base"]["source"] == str(tiny_sam_path.resolve())
    assert {k.split(".")[0] for k in tf.state} == {"prompt_encoder", "mask_decoder"}
    run_dir = cli_teacher.with_name("bp.run")
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert len(list(run_dir.glob("embeddings/*/*.pt"))) == 6  # the 6 fully annotated images of 12
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [4] and log[0]["lr"] == pytest.approx(1e-5)  # dropped at step 3 of 4
    again = ["finetune-teacher", data / "weak_boxes.json", "--images", data / "images", "--sam", tiny_sam_path,
             "-o", cli_teacher, *TRAIN_FLAGS]
    code, _, err = run(capsys, *again)
    assert code == 1 and "--resume" in err
    code, out, err = run(capsys, *again, "--prompts", "points+boxes", "--resume")
    assert code == 0, err
    assert "(4)" in out  # nothing left to do: resumed at step 4


@pytest.mark.parametrize(("weak", "refine"), [("boxes", False), ("points", True)])
def test_pseudomask_uses_the_teacher(capsys, cli_teacher, data, tiny_sam_path, tmp_path, weak, refine):
    out = tmp_path / f"pseudo_{weak}.json"
    args = ["pseudomask", data / f"weak_{weak}.json", "--weak", weak, "--images", data / "images",
            "--detector", "none", "--teacher", cli_teacher, "--num-workers", "0", "-o", out]
    if refine:
        args += ["--teacher-refine", cli_teacher]
    code, _, err = run(capsys, *args)  # no --sam: the base recorded in the teacher
    assert code == 0, err
    anns = COCO(str(out)).dataset["annotations"]
    pseudo = [a for a in anns if a["omnilabel"]["source"] == "pseudo"]
    assert pseudo
    for a in pseudo:
        assert a["omnilabel"]["teacher"]["sam"] == tiny_sam_path.name
        assert a["omnilabel"]["teacher"]["teacher"] == "bp.pt"
        assert (a["omnilabel"]["teacher"].get("teacher_refine") == "bp.pt") == refine
    manifest = json.loads((tmp_path / f"pseudo_{weak}.job" / "manifest.json").read_text())
    assert len(manifest["models"]["teacher_sha256"]) == 64


def test_class_aware_teacher_in_pseudomask_brings_its_clip(capsys, data, tiny_sam_path, tmp_path):
    model_name, clip_path = build_tiny_clip(tmp_path / "clip.pt", seed=0)
    code, _, err = run(capsys, "finetune-teacher", data / "weak_points.json", "--images", data / "images",
                       "--sam", tiny_sam_path, "--prompts", "points", "--class-aware", "--clip", clip_path,
                       "--clip-arch", model_name, "-o", tmp_path / "p_cls.pt", *TRAIN_FLAGS)
    assert code == 0, err
    out = tmp_path / "pseudo.json"
    code, _, err = run(capsys, "pseudomask", data / "weak_points.json", "--weak", "points", "--images",
                       data / "images", "--detector", "none", "--teacher", tmp_path / "p_cls.pt",
                       "--num-workers", "0", "-o", out)  # neither --sam nor --clip: both from the teacher file
    assert code == 0, err
    pseudo = [a for a in COCO(str(out)).dataset["annotations"] if a["omnilabel"]["source"] == "pseudo"]
    assert pseudo and all(a["omnilabel"]["teacher"]["clip"] == "clip.pt" for a in pseudo)


def test_all_teachers_share_one_encoder(cli_teacher, tiny_sam_path):
    spec = TeacherSpec(sam=str(tiny_sam_path), detector="none", teacher=str(cli_teacher),
                       teacher_refine=str(cli_teacher))
    teachers = load_teachers(spec, resolve_paths(spec, load_detector=False))
    assert teachers.refine_sam is not teachers.sam
    assert teachers.refine_sam.sam.image_encoder is teachers.sam.sam.image_encoder
    assert teachers.refine_sam.sam.mask_decoder is not teachers.sam.sam.mask_decoder


def test_teacher_on_another_sam_is_a_clear_error(capsys, cli_teacher, data, tmp_path):
    other = save_sam_checkpoint(build_tiny_sam(seed=1), tmp_path / "other.pth")
    code, _, err = run(capsys, "pseudomask", data / "weak_boxes.json", "--weak", "boxes", "--images", data / "images",
                       "--detector", "none", "--teacher", cli_teacher, "--sam", other, "--num-workers", "0",
                       "-o", tmp_path / "p.json")
    assert code == 1 and "fine-tuned from SAM" in err and "--sam" in err
    code, _, err = run(capsys, "pseudomask", data / "weak_boxes.json", "--weak", "boxes", "--teacher", other,
                       "--detector", "none", "-o", tmp_path / "q.json")
    assert code == 1 and "not an omnilabel teacher file" in err
    assert not (tmp_path / "q.job").exists()


def test_bad_finetune_input_fails_before_training(capsys, data, tiny_sam_path, tmp_path):
    tags = split_coco(json.loads((data / "coco.json").read_text()), fully=0.0, weak="tags", seed=0)
    (tmp_path / "tags.json").write_text(json.dumps(tags))
    code, _, err = run(capsys, "finetune-teacher", tmp_path / "tags.json", "--images", data / "images",
                       "--sam", tiny_sam_path, "-o", tmp_path / "t.pt")
    assert code == 1 and "segmentation" in err
    code, _, err = run(capsys, "finetune-teacher", data / "coco.json", "--images", data / "images",
                       "--batch-size", "5", "--num-workers", "2", "-o", tmp_path / "t.pt")
    assert code == 1 and "multiple of" in err
    code, _, err = run(capsys, "finetune-teacher", data / "coco.json", "--prompts", "masks", "-o", tmp_path / "t.pt")
    assert code == 1 and "--prompts" in err
    assert not (tmp_path / "t.run").exists()
    code, out, _ = run(capsys, "finetune-teacher", "--help")
    assert code == 0 and "--class-aware" in out and "--num-workers" in out


def test_two_ray_train_workers_on_cpu_match_one_process(capsys, data, tiny_sam_path, tmp_path):
    common = ["finetune-teacher", data / "weak_points.json", "--images", data / "images", "--sam", tiny_sam_path,
              "--prompts", "points", *TRAIN_FLAGS]
    ray_run = _cli(*common, "--num-workers", "2", "-o", tmp_path / "ray.pt")
    assert ray_run.returncode == 0, ray_run.stderr[-3000:]
    code, _, err = run(capsys, *common, "--num-workers", "0", "-o", tmp_path / "local.pt")
    assert code == 0, err
    ray_state, local_state = read_teacher(tmp_path / "ray.pt").state, read_teacher(tmp_path / "local.pt").state
    assert ray_state.keys() == local_state.keys()
    # The same data, prompts and sampled points; DDP averages the two halves' gradients, so the updates agree
    # up to float rounding (measured: 95 % of weights bit-equal, 99.97 % within 1e-6), which Adam can turn
    # into a sign flip on a near-zero gradient: at most 2 lr per step, on a handful of weights.
    max_drift = 2 * (3 * 1e-4 + 1e-5)
    close = total = 0
    for key in ray_state:
        diff = (ray_state[key].float() - local_state[key].float()).abs()
        assert diff.max() <= max_drift, key
        close += int((diff <= 1e-6).sum())
        total += diff.numel()
    assert close / total > 0.999
    base = load_sam(tiny_sam_path).mask_decoder.state_dict()
    assert any(not torch.equal(base[k], ray_state["mask_decoder." + k]) for k in base)  # it did train
    assert (tmp_path / "ray.run" / "ray").is_dir()  # Ray Train's own files under the run directory
    code, _, err = run(capsys, "pseudomask", data / "weak_points.json", "--weak", "points", "--images", data / "images",
                       "--detector", "none", "--teacher", tmp_path / "ray.pt", "--num-workers", "0",
                       "-o", tmp_path / "pseudo.json")
    assert code == 0, err
    assert any(a["omnilabel"]["source"] == "pseudo" for a in COCO(str(tmp_path / "pseudo.json")).dataset["annotations"])
