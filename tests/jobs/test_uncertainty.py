"""`omnilabel uncertainty` and `pseudomask --refiner`: SUM maps of pseudomasks, the same either way, on Ray,
after a kill, and only with the models that made the file."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from cli_runner import run_in_process as run
from cli_runner import run_ok as _ok
from cli_runner import run_subprocess
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from omnilabel.data.maps import read_uncertainty_map
from omnilabel.data.weak import split_coco
from omnilabel.io import file_sha256
from omnilabel.jobs.options import Dataset, JobOptions
from omnilabel.jobs.runner import run_shards_in_process
from omnilabel.jobs.uncertainty import UncertaintyConfig, UncertaintyWorker, run_uncertainty
from omnilabel.ops.masks import segmentation_to_rle
from omnilabel.ops.uncertainty import uncertainty_mean

EXAMPLE_TEACHER = Path(__file__).resolve().parents[2] / "examples" / "teacher" / "shapes-sam.pt"
#: The fields ``uncertainty`` and ``pseudomask --refiner`` add to a pseudomask's ``omnilabel`` record.
ADDED = ("uncertainty", "uncertainty_mean")



@pytest.fixture(scope="module")
def sum_job(shapes_coco, tiny_sam_path, tmp_path_factory) -> SimpleNamespace:
    """A weak file (one kind of label per image; one box image also keeps a full mask), a P-/B-SAM teacher, a
    refiner of that teacher, and the teacher's pseudomask file (no detector: points and boxes)."""
    root = tmp_path_factory.mktemp("sum_job")
    shutil.copytree(shapes_coco.parent, root / "data")
    images = root / "data" / "images"
    gt = json.loads((root / "data" / "coco.json").read_text())
    weak = split_coco(gt, fully=0.25, weak="mixed-images", seed=3)
    full = {a["id"]: a for a in gt["annotations"]}
    box_image = next(a["image_id"] for a in weak["annotations"] if "bbox" in a and "segmentation" not in a)
    k = next(i for i, a in enumerate(weak["annotations"]) if a["image_id"] == box_image)
    weak["annotations"][k] = copy.deepcopy(full[weak["annotations"][k]["id"]])
    weak_path = root / "data" / "weak.json"
    weak_path.write_text(json.dumps(weak))
    teacher, refiner, pseudo = root / "t.pt", root / "r.pt", root / "pseudo.json"
    _ok("finetune-teacher", weak_path, "--images", images, "--sam", tiny_sam_path, "--prompts", "points+boxes",
        "--steps", "1", "--batch-size", "4", "-o", teacher)
    _ok("finetune-teacher", weak_path, "--images", images, "--teacher", teacher, "--prompts", "refine",
        "--min-iou", "0", "--steps", "2", "--batch-size", "4", "--lr", "1e-4", "-o", refiner)
    _ok("pseudomask", weak_path, "--images", images, "--teacher", teacher, "--detector", "none", "-o", pseudo)
    return SimpleNamespace(root=root, images=images, weak=weak_path, teacher=teacher, refiner=refiner,
                           pseudo=pseudo, box_image=box_image)


@pytest.fixture(scope="module")
def scored(sum_job) -> Path:
    """``uncertainty`` on the pseudomask file, in this process: the reference."""
    out = sum_job.root / "scored.json"
    _ok("uncertainty", sum_job.pseudo, "--images", sum_job.images, "--refiner", sum_job.refiner, "-o", out)
    return out


def _meta(ann: dict) -> dict:
    return ann.get("omnilabel") or {}


def _without_scores(ann: dict) -> dict:
    """An annotation without what scoring adds."""
    out = copy.deepcopy(ann)
    for key in ADDED:
        out.get("omnilabel", {}).pop(key, None)
    return out


def _portable(path: Path) -> tuple[dict, dict[int, bytes]]:
    """A scored file with each map reference cut to ``<image id>/<key>.png`` (the folder is named after the
    output), and annotation id → its map file's bytes."""
    data = json.loads(path.read_text())
    maps = {}
    for ann in data["annotations"]:
        ref = _meta(ann).get("uncertainty")
        if ref is not None:
            maps[ann["id"]] = (path.parent / ref).read_bytes()
            ann["omnilabel"]["uncertainty"] = ref.split("/", 1)[1]
    return data, maps


def _mask(ann: dict, h: int, w: int) -> np.ndarray:
    return mask_utils.decode(segmentation_to_rle(ann["segmentation"], h, w)).astype(bool)


# -- what it writes -------------------------------------------------------------------------------------


def test_the_job_after_pseudomask_gives_the_maps_pseudomask_refiner_gives(capsys, sum_job, scored, tmp_path):
    together = tmp_path / "together.json"
    code, _, err = run(capsys, "pseudomask", sum_job.weak, "--images", sum_job.images, "--teacher", sum_job.teacher,
                       "--detector", "none", "--refiner", sum_job.refiner, "-o", together)
    assert code == 0, err
    pseudo = json.loads(sum_job.pseudo.read_text())
    after = COCO(str(scored)).dataset
    same_pass = json.loads(together.read_text())
    sizes = {im["id"]: (im["height"], im["width"]) for im in pseudo["images"]}
    assert {k: v for k, v in after.items() if k not in ("annotations", "info")} == \
        {k: v for k, v in pseudo.items() if k not in ("annotations", "info")}
    record = after["info"]["omnilabel"]
    assert record["uncertainty"]["refiner"] == "r.pt"
    assert record["uncertainty"]["refiner_sha256"] == file_sha256(sum_job.refiner)
    assert {k: v for k, v in record.items() if k != "uncertainty"} == pseudo["info"]["omnilabel"]
    # the same annotations with the same ids, plus a map and its mean on every pseudomask
    assert [a["id"] for a in after["annotations"]] == [a["id"] for a in pseudo["annotations"]]
    assert len(same_pass["annotations"]) == len(pseudo["annotations"])
    kinds, gt_in_scored_image, peaks = set(), False, []
    for p, a, s in zip(pseudo["annotations"], after["annotations"], same_pass["annotations"], strict=True):
        assert _without_scores(a) == p
        s_meta = _without_scores(s)["omnilabel"]
        s_meta.get("teacher", {}).pop("refiner", None)
        assert {**_without_scores(s), "omnilabel": s_meta} == p
        if _meta(p)["source"] == "gt":
            assert not set(ADDED) & (set(_meta(a)) | set(_meta(s))), a
            gt_in_scored_image |= a["image_id"] == sum_job.box_image
            continue
        kinds.add(_meta(p)["weak"])
        u_after = read_uncertainty_map(scored.parent / _meta(a)["uncertainty"]).values
        u_same = read_uncertainty_map(together.parent / _meta(s)["uncertainty"]).values
        assert u_after.shape == sizes[p["image_id"]]
        assert 0.0 <= u_after.min() and u_after.max() <= 1.0
        np.testing.assert_array_equal(u_after, u_same)
        assert _meta(a)["uncertainty_mean"] == pytest.approx(_meta(s)["uncertainty_mean"], abs=1e-6)
        # the summary is the mean over the mask and its 3-px band (to the maps' 16-bit rounding)
        mask = _mask(p, *sizes[p["image_id"]])
        assert _meta(a)["uncertainty_mean"] == pytest.approx(uncertainty_mean(u_after, mask, band_px=3), abs=1e-4)
        peaks.append(float(u_after.max()))
    assert kinds == {"points", "boxes"} and len(peaks) >= 10
    assert gt_in_scored_image, "the image that mixes a GT mask and boxes must keep its GT mask unscored"
    assert max(peaks) > 0.05, "SAM and the refiner should disagree somewhere"


def test_two_ray_workers_score_what_one_process_scores(sum_job):
    """Bit for bit, with the threads a Ray worker gets (its share of the cores): torch's sums on another number
    of threads move a few map pixels by one 16-bit step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(JobOptions(num_workers=2).threads_per_worker())
    try:
        _ok("uncertainty", sum_job.pseudo, "--images", sum_job.images, "--refiner", sum_job.refiner,
            "-o", sum_job.root / "one.json")
    finally:
        torch.set_num_threads(threads)
    out = sum_job.root / "ray.json"
    done = run_subprocess("uncertainty", sum_job.pseudo, "--images", sum_job.images, "--refiner", sum_job.refiner,
                          "--num-workers", "2", "--batch-size", "3", "-o", out)
    assert done.returncode == 0, done.stderr
    assert len(list((sum_job.root / "ray.job" / "shards").glob("*.jsonl"))) == 3
    ray_data, ray_maps = _portable(out)
    ref_data, ref_maps = _portable(sum_job.root / "one.json")
    assert ray_data == ref_data
    assert ray_maps.keys() == ref_maps.keys() and ray_maps
    for ann_id in ref_maps:
        assert ray_maps[ann_id] == ref_maps[ann_id], ann_id


class Crash(Exception):
    pass


def test_a_killed_job_resumes_and_skips_its_finished_shards(sum_job, scored, tmp_path):
    inputs = Dataset(sum_job.pseudo, sum_job.images)
    config = UncertaintyConfig(refiner=str(sum_job.refiner))
    out = tmp_path / "u.json"

    def crash_after_first_shard(worker_args, todo):
        for item in run_shards_in_process(UncertaintyWorker, worker_args, todo):
            yield item
            raise Crash

    with pytest.raises(Crash):
        run_uncertainty(inputs, out, config, JobOptions(batch_size=3), executor=crash_after_first_shard)
    assert not out.exists()
    shards = sorted((tmp_path / "u.job" / "shards").glob("*.jsonl"))
    assert len(shards) == 1
    stamp = shards[0].stat().st_mtime_ns
    asked = []

    def recording(worker_args, todo):
        asked.append(sorted(todo))
        yield from run_shards_in_process(UncertaintyWorker, worker_args, todo)

    summary = run_uncertainty(inputs, out, config, JobOptions(batch_size=3), executor=recording)
    assert summary["skipped_shards"] == 1 and asked == [[1, 2]] and summary["errors"] == 0
    assert shards[0].stat().st_mtime_ns == stamp, "the finished shard was recomputed"
    assert _portable(out) == _portable(scored)


# -- what it refuses ------------------------------------------------------------------------------------


def _edited(sum_job, tmp_path: Path, edit) -> Path:
    data = json.loads(sum_job.pseudo.read_text())
    edit(data)
    path = tmp_path / "pseudo.json"
    path.write_text(json.dumps(data))
    return path


def _another_teacher(teacher: Path, path: Path) -> Path:
    """A valid teacher file of the same kind with other weights (a teacher trained further, say)."""
    obj = torch.load(teacher, map_location="cpu", weights_only=True)
    key = next(k for k in obj["state"] if k.startswith("mask_decoder"))
    obj["state"][key] = obj["state"][key] + 0.01
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("change", ["file at the recorded path", "recorded sha256"])
def test_another_teacher_than_the_one_that_made_the_file_is_refused(capsys, sum_job, tmp_path, change):
    def edit(data):
        info = data["info"]["omnilabel"]
        if change == "recorded sha256":
            info["models"]["teacher_sha256"] = "0" * 64
        else:
            info["teachers"]["teacher"] = str(_another_teacher(sum_job.teacher, tmp_path / "t.pt"))

    path = _edited(sum_job, tmp_path, edit)
    code, _, err = run(capsys, "uncertainty", path, "--images", sum_job.images, "--refiner", sum_job.refiner,
                       "-o", tmp_path / "u.json")
    assert code == 1 and "Traceback" not in err, err
    assert "was made with --teacher t.pt" in err and "the teacher that made it" in err
    assert not (tmp_path / "u.json").exists() and not (tmp_path / "u.job").exists()


def test_a_stored_mask_the_models_do_not_give_fails_its_image_only(capsys, sum_job, tmp_path):
    data = json.loads(sum_job.pseudo.read_text())
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    victim = next(a for a in data["annotations"] if _meta(a)["source"] == "pseudo")
    mask = _mask(victim, *sizes[victim["image_id"]])
    mask[:12, :12] = ~mask[:12, :12]
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()

    other = next(a["image_id"] for a in data["annotations"]
                 if _meta(a)["source"] == "pseudo" and a["image_id"] != victim["image_id"])

    def edit(d):  # the victim's image and one other, to keep it short
        d["images"] = [im for im in d["images"] if im["id"] in (victim["image_id"], other)]
        d["annotations"] = [a for a in d["annotations"] if a["image_id"] in (victim["image_id"], other)]
        next(a for a in d["annotations"] if a["id"] == victim["id"])["segmentation"] = rle

    path = _edited(sum_job, tmp_path, edit)
    code, out, err = run(capsys, "uncertainty", path, "--images", sum_job.images, "--refiner", sum_job.refiner,
                         "-o", tmp_path / "u.json")
    assert code == 0, err
    assert "failed images listed in" in out
    errors = [json.loads(line) for line in (tmp_path / "u.job" / "errors.jsonl").read_text().splitlines()]
    assert [e["image_id"] for e in errors] == [victim["image_id"]]
    message = errors[0]["error"]
    assert f"annotation id={victim['id']}:" in message and "differs from the stored one" in message
    scored = json.loads((tmp_path / "u.json").read_text())["annotations"]
    pseudo = [a for a in scored if _meta(a)["source"] == "pseudo"]
    assert {a["image_id"] for a in pseudo} == {victim["image_id"], other}
    assert all(("uncertainty" in _meta(a)) == (a["image_id"] == other) for a in pseudo)


def test_a_pseudomask_without_its_prompt_is_refused_before_any_model_loads(capsys, sum_job, tmp_path):
    data = json.loads(sum_job.pseudo.read_text())
    victim = [a for a in data["annotations"] if _meta(a)["source"] == "pseudo"][3]

    def edit(d):
        del next(a for a in d["annotations"] if a["id"] == victim["id"])["omnilabel"]["prompt"]

    path = _edited(sum_job, tmp_path, edit)
    code, _, err = run(capsys, "uncertainty", path, "--images", sum_job.images, "--refiner", tmp_path / "none.pt",
                       "--sam", tmp_path / "none.pth", "-o", tmp_path / "u.json")
    assert code == 1 and "Traceback" not in err, err
    assert f"annotation id={victim['id']}: omnilabel.prompt" in err and "needs the prompt that made it" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pseudo.json"]


def test_only_a_refiner_scores_and_only_a_pseudomask_file_is_scored(capsys, sum_job, tmp_path):
    code, _, err = run(capsys, "uncertainty", sum_job.pseudo, "--images", sum_job.images, "--refiner",
                       sum_job.teacher, "-o", tmp_path / "u.json")
    assert code == 1 and f"--refiner {sum_job.teacher} is a teacher for prompts 'points+boxes'" in err
    code, _, err = run(capsys, "uncertainty", sum_job.weak, "--images", sum_job.images, "--refiner",
                       sum_job.refiner, "-o", tmp_path / "u.json")
    assert code == 1 and "does not record the SAMs that made it" in err
    assert list(tmp_path.iterdir()) == []
