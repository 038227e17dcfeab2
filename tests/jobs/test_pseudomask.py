"""`omnilabel pseudomask` end to end: every setting, defaults, resume, bad images, offline weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cli_runner import run_in_process as run
from pycocotools.coco import COCO

from omnilabel.data.weak import split_coco


@pytest.fixture()
def dataset(shapes_coco, tmp_path) -> Path:
    """A private copy of the synthetic dataset (images beside the JSON)."""
    root = tmp_path / "data"
    shutil.copytree(shapes_coco.parent, root)
    return root


def _write_weak(dataset: Path, weak: str) -> Path:
    gt = json.loads((dataset / "coco.json").read_text())
    path = dataset / f"weak_{weak}.json"
    path.write_text(json.dumps(split_coco(gt, fully=0.25, weak=weak, seed=0)))
    return path


@pytest.mark.parametrize(("mode", "split"), [("points", "points"), ("boxes", "boxes"), ("tags", "tags"),
                                             ("none", "tags"), ("auto", "mixed")])
def test_every_setting_writes_loadable_coco(capsys, dataset, tiny_sam_path, tiny_gdino_dir, mode, split):
    weak = _write_weak(dataset, split)
    out = dataset / f"pseudo_{mode}.json"
    code, stdout, err = run(capsys, "pseudomask", weak, "--weak", mode, "--images", dataset / "images",
                            "--sam", tiny_sam_path, "--detector", tiny_gdino_dir, "-o", out)
    assert code == 0, err
    assert "seconds per image" in stdout
    coco = COCO(str(out))
    weak_data = json.loads(weak.read_text())
    assert coco.dataset["images"] == weak_data["images"]
    anns = coco.dataset["annotations"]
    assert [a["id"] for a in anns] == list(range(1, len(anns) + 1))
    src = {a["id"]: a for a in weak_data["annotations"]}
    gt_out = [a for a in anns if a["omnilabel"]["source"] == "gt"]
    assert len(gt_out) == sum(1 for a in weak_data["annotations"] if "segmentation" in a)
    for a in gt_out:
        assert a["segmentation"] == src[a["omnilabel"]["weak_id"]]["segmentation"]
    pseudo = [a for a in anns if a["omnilabel"]["source"] == "pseudo"]
    assert pseudo
    for a in pseudo:
        assert a["area"] > 0 and len(a["bbox"]) == 4 and isinstance(a["segmentation"]["counts"], str)
        assert a["omnilabel"]["teacher"]["sam"] == tiny_sam_path.name
    if mode in ("points", "boxes"):
        ids = [a["omnilabel"]["weak_id"] for a in pseudo]
        assert len(ids) == len(set(ids)) and set(ids) <= set(src)
    code, stdout, err = run(capsys, "evaluate", out, "--gt", dataset / "coco.json")
    assert code == 0, err
    assert "AP50" in stdout
    if mode in ("points", "boxes"):
        assert "mIoU" in stdout and mode in stdout


def test_defaults_images_and_output_beside_input(capsys, dataset, tiny_sam_path):
    weak = _write_weak(dataset, "boxes")
    # the COCO file names images as `000000.png`; put the JSON next to them so --images defaults right
    local = dataset / "images" / "weak.json"
    shutil.copy(weak, local)
    code, _, err = run(capsys, "pseudomask", "--weak", "boxes", local, "--sam", tiny_sam_path)
    assert code == 0, err
    assert (dataset / "images" / "weak.pseudo.json").exists()
    COCO(str(dataset / "images" / "weak.pseudo.json"))


def test_no_detector_leaves_out_the_images_only_a_detector_could_label(capsys, dataset, tiny_sam_path):
    weak = _write_weak(dataset, "mixed")
    data = json.loads(weak.read_text())
    data["images"].append({**data["images"][0], "id": 999})  # an unlabelled image
    weak.write_text(json.dumps(data))
    tagged = {a["image_id"] for a in data["annotations"]
              if not any(k in a for k in ("segmentation", "bbox", "point"))} | {999}
    out = dataset / "pseudo.json"
    code, _, err = run(capsys, "pseudomask", weak, "--images", dataset / "images", "--sam", tiny_sam_path,
                       "--detector", "none", "--num-workers", "0", "-o", out)
    assert code == 0, err
    assert f"{len(tagged)} image(s) with image-level tags or no labels" in err
    coco = COCO(str(out))
    kept = {im["id"] for im in coco.dataset["images"]}
    assert kept == {im["id"] for im in data["images"]} - tagged and kept
    assert {a["image_id"] for a in coco.dataset["annotations"]} <= kept
    src = {a["id"]: a for a in data["annotations"]}
    for a in coco.dataset["annotations"]:
        info = a["omnilabel"]
        if info["weak"] == "points":
            assert info["prompt"]["point"] == pytest.approx(src[info["weak_id"]]["point"], abs=0.01)
            assert len(info["prompt"]["bbox"]) == 4
        elif info["weak"] == "boxes":
            assert info["prompt"]["bbox"] == pytest.approx(src[info["weak_id"]]["bbox"], abs=0.01)
    # a file where every image needs a detector is refused before anything is written
    gt = json.loads((dataset / "coco.json").read_text())
    only_tags = dataset / "only_tags.json"
    only_tags.write_text(json.dumps(split_coco(gt, fully=0.0, weak="tags", seed=0)))
    code, _, err = run(capsys, "pseudomask", only_tags, "--images", dataset / "images", "--sam", tiny_sam_path,
                       "--detector", "none", "-o", dataset / "tags.json")
    assert code == 1 and "need a detector" in err and not (dataset / "tags.json").exists()


def test_killed_job_resumes_without_recomputing(capsys, dataset, tiny_sam_path, tiny_gdino_dir):
    weak = _write_weak(dataset, "mixed")
    common = ["pseudomask", weak, "--images", dataset / "images", "--sam", tiny_sam_path,
              "--detector", tiny_gdino_dir, "--batch-size", "3", "--num-workers", "0"]
    code, _, err = run(capsys, *common, "-o", dataset / "ref.json")
    assert code == 0, err
    job = dataset / "ref.job"
    shards = sorted((job / "shards").glob("*.jsonl"))
    assert len(shards) == 4
    # as if killed after two shards: the others and the output are gone
    for s in shards[2:]:
        s.unlink()
    stamp = {s: s.stat().st_mtime_ns for s in shards[:2]}
    (dataset / "ref.json").rename(dataset / "first.json")
    code, stdout, err = run(capsys, *common, "-o", dataset / "ref.json")
    assert code == 0, err
    assert "resumed" in stdout
    assert all(s.stat().st_mtime_ns == t for s, t in stamp.items())
    assert (dataset / "ref.json").read_bytes() == (dataset / "first.json").read_bytes()
    # a different setting in the same job dir refuses, --overwrite restarts
    code, _, err = run(capsys, *common, "--box-threshold", "0.5", "-o", dataset / "ref.json")
    assert code != 0 and "different job" in err
    code, _, err = run(capsys, *common, "--box-threshold", "0.5", "-o", dataset / "ref.json", "--overwrite")
    assert code == 0, err


def test_missing_and_corrupt_images_are_recorded_and_the_job_goes_on(capsys, dataset, tiny_sam_path):
    weak = _write_weak(dataset, "boxes")
    data = json.loads(weak.read_text())
    names = [im["file_name"] for im in data["images"]]
    (dataset / "images" / names[1]).unlink()
    (dataset / "images" / names[2]).write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = dataset / "p.json"
    code, stdout, err = run(capsys, "pseudomask", weak, "--weak", "boxes", "--images", dataset / "images",
                            "--sam", tiny_sam_path, "-o", out)
    assert code == 0, err
    assert f"1 of {len(names)} images do not exist" in err
    errors = [json.loads(line) for line in (dataset / "p.job" / "errors.jsonl").read_text().splitlines()]
    assert sorted(e["image_id"] for e in errors) == sorted(data["images"][i]["id"] for i in (1, 2))
    assert all(e["error"] for e in errors)
    labelled = {a["image_id"] for a in json.loads(out.read_text())["annotations"]}
    expected = {a["image_id"] for a in data["annotations"]} - {data["images"][i]["id"] for i in (1, 2)}
    assert labelled == expected


def test_offline_missing_weights_say_what_to_do(capsys, dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("OMNILABEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMNILABEL_OFFLINE", "1")
    weak = _write_weak(dataset, "boxes")
    out = dataset / "never.json"
    code, _, err = run(capsys, "pseudomask", weak, "--weak", "boxes", "--images", dataset / "images", "--sam", "vit_b",
                       "-o", out)
    assert code == 1
    assert "sam_vit_b_01ec64.pth" in err and "omnilabel weights download vit_b" in err
    assert str(tmp_path / "cache") in err
    assert not out.exists()


def test_mode_misfit_fails_before_any_model_loads(capsys, dataset):
    weak = _write_weak(dataset, "boxes")
    code, _, err = run(capsys, "pseudomask", weak, "--weak", "points", "--sam", "/nonexistent/sam.pth")
    assert code == 1 and "annotation id=" in err and "--weak points" in err


def test_out_of_memory_halves_the_prompt_batch_and_retries(dataset, tiny_sam_path, monkeypatch):
    import torch

    from omnilabel.data.coco import category_names, load_coco
    from omnilabel.data.weak import plan_weak
    from omnilabel.jobs.pseudomask import PseudomaskWorker, plan_tasks
    from omnilabel.teachers.loading import TeacherSpec
    from omnilabel.teachers.pipeline import PipelineConfig
    from omnilabel.teachers.sam import SamTeacher

    weak = _write_weak(dataset, "boxes")
    data = load_coco(weak)
    plans = plan_weak(data, "boxes", has_detector=False).images
    tasks = [t for t in plan_tasks(data, dataset / "images", plans, allow_outside_images=False)
             if sum("bbox" in a and "segmentation" not in a for a in t.annotations) >= 3][:2]
    assert tasks
    spec = TeacherSpec(sam=str(tiny_sam_path), detector="none")
    worker = PseudomaskWorker(spec, {"sam": tiny_sam_path}, category_names(data), PipelineConfig(weak="boxes"))
    expected = worker(tasks)
    sam = worker.pipeline.teachers.sam
    encodes = sam.encoder_calls

    real_decode = SamTeacher._decode
    sizes = []

    def decode_with_small_memory(self, emb, batch):
        sizes.append(len(batch.indices))
        if len(batch.indices) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_decode(self, emb, batch)

    monkeypatch.setattr(SamTeacher, "_decode", decode_with_small_memory)
    got = worker(tasks)
    assert [r["annotations"] for r in got] == [r["annotations"] for r in expected]
    assert sam.encoder_calls - encodes == len(tasks), "out-of-memory in the decoder must not re-encode"
    assert sam.oom_splits > 0 and max(sizes) >= 3 and sizes.count(1) >= 3

    def decode_never_fits(self, emb, batch):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(SamTeacher, "_decode", decode_never_fits)
    failed = worker(tasks[:1])
    assert "out of memory" in failed[0]["error"]


def test_a_job_with_no_image_refuses_with_where_it_looked(capsys, dataset, tiny_sam_path):
    weak = _write_weak(dataset, "boxes")  # beside images/, whose file_names are relative to images/
    code, _, err = run(capsys, "pseudomask", weak, "--weak", "boxes", "--sam", tiny_sam_path, "-o", dataset / "p.json")
    assert code == 1 and "none of its 12 images exists under" in err and str(dataset) in err
    assert f"--images {dataset / 'images'}" in err  # where they are
    assert not (dataset / "p.json").exists() and not (dataset / "p.job").exists()


def test_a_job_whose_images_all_fail_does_not_succeed(capsys, dataset, tiny_sam_path):
    weak = _write_weak(dataset, "boxes")
    for path in (dataset / "images").iterdir():
        path.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = dataset / "p.json"
    code, _, err = run(capsys, "pseudomask", weak, "--weak", "boxes", "--images", dataset / "images",
                       "--sam", tiny_sam_path, "-o", out)
    assert code == 1 and "all 12 images failed" in err and "errors.jsonl" in err
    assert not out.exists()
    assert len((dataset / "p.job" / "errors.jsonl").read_text().splitlines()) == 12
