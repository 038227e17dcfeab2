"""`omnilabel finetune-teacher` end to end, in-process and on 2 Ray Train workers, and its teachers in `pseudomask`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_runner import run_in_process as run
from cli_runner import run_ok
from pycocotools.coco import COCO

from omnilabel.data.weak import split_coco
from omnilabel.jobs.options import Dataset, JobOptions
from omnilabel.jobs.train_teacher import TeacherRecipe, run_finetune_teacher
from omnilabel.models.sam_loader import load_sam
from omnilabel.models.tiny import build_tiny_sam, save_sam_checkpoint
from omnilabel.models.tiny_clip import build_tiny_clip
from omnilabel.teachers.finetune import FinetuneConfig
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
    run_ok(*main_args)
    return out


def test_finetune_cli_writes_a_small_teacher_and_refuses_a_second_run(capsys, cli_teacher, data, tiny_sam_path):
    capsys.readouterr()
    tf = read_teacher(cli_teacher)
    assert tf.meta["step"] == 4 and tf.meta["base"]["source"] == str(tiny_sam_path.resolve())
    assert tf.meta["config"]["box_jitter"] is True  # on by default
    assert {k.split(".")[0] for k in tf.state} == {"prompt_encoder", "mask_decoder"}
    run_dir = cli_teacher.with_name("bp.run")
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert len(list(run_dir.glob("embeddings/*/*.pt"))) == 6  # the 6 fully annotated images of 12
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [(r["event"], r["step"]) for r in log] == [("start", 0), ("step", 4)]
    assert log[1]["lr"] == pytest.approx(1e-5)  # dropped at step 3 of 4
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
                       "--clip-arch", model_name, "--no-box-jitter", "-o", tmp_path / "p_cls.pt", *TRAIN_FLAGS)
    assert code == 0, err
    assert read_teacher(tmp_path / "p_cls.pt").meta["config"]["box_jitter"] is False
    out = tmp_path / "pseudo.json"
    code, _, err = run(capsys, "pseudomask", data / "weak_points.json", "--weak", "points", "--images",
                       data / "images", "--detector", "none", "--teacher", tmp_path / "p_cls.pt",
                       "--num-workers", "0", "-o", out)  # neither --sam nor --clip: both from the teacher file
    assert code == 0, err
    pseudo = [a for a in COCO(str(out)).dataset["annotations"] if a["omnilabel"]["source"] == "pseudo"]
    assert pseudo and all(a["omnilabel"]["teacher"]["clip"] == "clip.pt" for a in pseudo)


def test_all_teachers_share_one_encoder(cli_teacher, tiny_sam_path, tmp_path):
    other = tmp_path / "other.pt"
    shutil.copy(cli_teacher, other)
    spec = TeacherSpec(sam=str(tiny_sam_path), detector="none", teacher=str(cli_teacher), teacher_box=str(cli_teacher),
                       teacher_refine=str(other))
    teachers = load_teachers(spec, resolve_paths(spec, load_detector=False))
    assert teachers.box_sam is teachers.sam  # one file, one decoder
    assert teachers.refine_sam is not teachers.sam and teachers.point_sam is None
    assert teachers.refine_sam.sam.image_encoder is teachers.sam.sam.image_encoder
    assert teachers.refine_sam.sam.mask_decoder is not teachers.sam.sam.mask_decoder


def test_the_papers_three_teachers_in_one_mixed_run(capsys, cli_teacher, data, tiny_sam_path, tmp_path):
    roles = {}
    for role in ("box", "point", "refine"):
        roles[role] = tmp_path / f"{role}_sam.pt"
        shutil.copy(cli_teacher, roles[role])
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps(split_coco(json.loads((data / "coco.json").read_text()), fully=0.25,
                                           weak="mixed-images", seed=0)))
    out = tmp_path / "pseudo.json"
    code, _, err = run(capsys, "pseudomask", mixed, "--images", data / "images", "--detector", "none",
                       "--teacher-box", roles["box"], "--teacher-point", roles["point"], "--teacher-refine",
                       roles["refine"], "-o", out)
    assert code == 0, err
    pseudo = [a for a in COCO(str(out)).dataset["annotations"] if a["omnilabel"]["source"] == "pseudo"]
    assert {a["omnilabel"]["weak"] for a in pseudo} == {"points", "boxes"}
    for a in pseudo:
        assert a["omnilabel"]["teacher"] == {"sam": tiny_sam_path.name, "teacher_box": "box_sam.pt",
                                             "teacher_point": "point_sam.pt", "teacher_refine": "refine_sam.pt"}
    models = json.loads((tmp_path / "pseudo.job" / "manifest.json").read_text())["models"]
    assert all(len(models[f"teacher_{role}_sha256"]) == 64 for role in roles)


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


def _train(data: Path, sam: Path, out: Path, workers: int) -> tuple[dict, list[dict]]:
    """A 4-step P-SAM run with a loss report every step, in this process (0) or on Ray Train workers."""
    steps: list[dict] = []
    recipe = TeacherRecipe(FinetuneConfig(prompts="points", steps=4, batch_size=4, lr=1e-4, checkpoint_every=2,
                                          log_every=1), sam=str(sam))
    run_finetune_teacher(Dataset(data / "weak_points.json", data / "images"), out, JobOptions(num_workers=workers),
                         recipe, on_event=lambda ev: steps.append(ev) if ev.get("event") == "step" else None)
    return read_teacher(out).state, steps


def test_ray_train_workers_train_what_one_process_trains(data, tiny_sam_path, tmp_path):
    """One Ray Train worker computes exactly what this process computes (same threads: Ray gives a worker its
    share of the cores); two DDP workers see the same data, prompts and points each step and average their
    gradients, so they agree with one process up to float rounding."""
    threads = torch.get_num_threads()
    torch.set_num_threads(JobOptions(num_workers=1).threads_per_worker())
    try:
        local, local_steps = _train(data, tiny_sam_path, tmp_path / "local.pt", 0)
    finally:
        torch.set_num_threads(threads)
    one, one_steps = _train(data, tiny_sam_path, tmp_path / "one.pt", 1)
    two, two_steps = _train(data, tiny_sam_path, tmp_path / "two.pt", 2)
    assert local.keys() == one.keys() == two.keys()
    assert all(torch.equal(one[k], local[k]) for k in local), "one Ray worker must train bit for bit as here"
    assert [r["loss"] for r in one_steps] == [r["loss"] for r in local_steps]
    # Two workers: the first step starts from the same weights on the same samples, so its loss agrees to
    # rounding; later losses follow weights that differ by rounding only.
    assert [r["step"] for r in two_steps] == [1, 2, 3, 4]
    assert two_steps[0]["loss"] == pytest.approx(local_steps[0]["loss"], rel=1e-5)
    for a, b in zip(two_steps, local_steps, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
    # Adam moves each weight by at most about lr per step, whatever rounding does to a near-zero gradient.
    base = load_sam(tiny_sam_path)
    base_state = {f"{part}.{k}": v for part in ("prompt_encoder", "mask_decoder")
                  for k, v in getattr(base, part).state_dict().items()}
    moved = sum(float((local[k].float() - base_state[k].float()).abs().sum()) for k in local)
    apart = sum(float((two[k].float() - local[k].float()).abs().sum()) for k in local)
    assert moved > 0 and apart <= 0.05 * moved, (apart, moved)
    assert max(float((two[k].float() - local[k].float()).abs().max()) for k in local) <= 2 * 4 * 1e-4
    assert (tmp_path / "two.run" / "ray").is_dir()  # Ray Train's own files under the run directory
