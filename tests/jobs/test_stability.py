"""`omnilabel stability`: Stable-SAM's mIoU / mBIoU / mSF equal a direct computation, every model sees the same
prompts from one encoding, and the job is the same in process, on Ray and after a kill."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from cli_runner import run_in_process as run
from cli_runner import run_subprocess
from pycocotools import mask as mask_utils
from segment_anything import SamPredictor

from omnilabel.data.images import read_image_rgb
from omnilabel.eval.miou import boundary_iou
from omnilabel.io import save_torch_atomic
from omnilabel.jobs.options import Dataset, JobOptions
from omnilabel.jobs.runner import run_shards_in_process
from omnilabel.jobs.stability import (
    StabilityConfig,
    StabilityModels,
    StabilityWorker,
    run_stability,
    score_instance,
)
from omnilabel.models.sam_loader import load_sam
from omnilabel.ops.masks import mask_iou
from omnilabel.ops.stability import PromptType, draw_prompts, instance_rng, stability_score
from omnilabel.teachers.teacher_ckpt import TEACHER_FORMAT, read_teacher, state_dict_sha256

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
K = 3


def _ok(capsys, *argv) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    return out


def _subset(src: Path, dst: Path, image_ids: list[int]) -> Path:
    data = json.loads(src.read_text())
    data["images"] = [im for im in data["images"] if im["id"] in image_ids]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in image_ids]
    dst.write_text(json.dumps(data))
    return dst


def _teacher_file(sam_path: Path, out: Path, *, nudge: float = 0.0) -> Path:
    """A decoder-only teacher file of the base SAM whose decoder is the base's own (``nudge`` 0) or moved."""
    sam = load_sam(sam_path)
    state = {f"{part}.{k}": v.clone() + (nudge if part == "mask_decoder" and v.is_floating_point() else 0)
             for part in ("prompt_encoder", "mask_decoder") for k, v in getattr(sam, part).state_dict().items()}
    sha = state_dict_sha256(sam.image_encoder.state_dict())
    save_torch_atomic({"format": TEACHER_FORMAT, "version": 1, "prompts": "points+boxes", "class_aware": False,
                       "step": 0, "start": None, "base": {"id": sam_path.name, "source": str(sam_path),
                                                          "encoder_sha256": sha},
                       "encoder_sha256": sha, "encoder_included": False, "arch": {}, "clip": None, "config": {},
                       "state": state}, out)
    return out


@pytest.fixture(scope="module")
def stab(shapes_coco, tiny_sam_path, tmp_path_factory) -> SimpleNamespace:
    """Four scenes, a teacher equal to the base SAM, and the in-process reference run (2 shards of 2)."""
    root = tmp_path_factory.mktemp("stability")
    images = shapes_coco.parent / "images"
    four = _subset(shapes_coco, root / "four.json", [1, 4, 5, 10])
    same = _teacher_file(tiny_sam_path, root / "same.pt")
    out = root / "ref.json"
    ref = run_stability(Dataset(four, images), out, StabilityModels(str(tiny_sam_path), (str(same),)),
                        StabilityConfig(k=K), JobOptions(batch_size=2))
    return SimpleNamespace(root=root, coco=shapes_coco, images=images, four=four, sam=tiny_sam_path, same=same,
                           ref=ref, out=out)


def _reference(sam_path: Path, coco: Path, images: Path, config: StabilityConfig) -> dict:
    """The protocol written out plainly: SamPredictor, one prompt per call; metrics on the full image."""
    data = json.loads(coco.read_text())
    predictor = SamPredictor(load_sam(sam_path))
    sums: dict[str, list[float]] = {p.value: [0.0, 0.0, 0.0, 0, 0] for p in config.prompts}
    for im in data["images"]:
        image = read_image_rgb(images / im["file_name"])
        predictor.set_image(image)
        for a in (a for a in data["annotations"] if a["image_id"] == im["id"]):
            gt = mask_utils.decode(a["segmentation"] if isinstance(a["segmentation"], dict) else
                                   mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], im["height"],
                                                                           im["width"]))).astype(bool)
            for ptype in config.prompts:
                prompts = draw_prompts(gt, ptype, instance_rng(config.seed, im["id"], a["id"], ptype), k=config.k)
                masks = []
                for p in prompts:
                    if ptype.n_points == 0:
                        m, _, _ = predictor.predict(box=p, multimask_output=False)
                    else:
                        m, s, _ = predictor.predict(point_coords=p, point_labels=np.ones(len(p)),
                                                    multimask_output=len(p) == 1)
                        m = m[[int(np.argmax(s))]]
                    masks.append(m[0])
                masks = np.array(masks)
                s = sums[ptype.value]
                s[0] += mask_iou(masks, np.broadcast_to(gt, masks.shape)).sum()
                s[1] += sum(boundary_iou(m, gt) for m in masks)
                if len(masks) > 1:
                    s[2] += stability_score(masks)
                    s[3] += 1
                s[4] += len(masks)
    return {p: {"miou": 100 * s[0] / s[4], "mbiou": 100 * s[1] / s[4], "msf": 100 * s[2] / s[3] if s[3] else None}
            for p, s in sums.items()}


def test_the_json_equals_the_protocol_computed_directly_on_one_image(stab, tmp_path, capsys):
    one = _subset(stab.coco, tmp_path / "one.json", [1])  # three instances
    out = tmp_path / "one.stability.json"
    text = _ok(capsys, "stability", one, "--images", stab.images, "--sam", stab.sam, "--k", K, "--prompts",
               ",".join(p.value for p in PromptType), "--json", out)
    got = json.loads(out.read_text())
    config = StabilityConfig(prompts=tuple(PromptType), k=K)
    want = _reference(stab.sam, one, stab.images, config)
    assert got["instances"] == 3 and got["settings"]["k"] == K and got["settings"]["noise"] == 0.4
    for ptype, row in want.items():
        r = got["results"]["sam"][ptype]
        assert r["prompts"] == 3 * (1 if ptype == "box" else K) and r["instances"] == 3
        assert r["miou"] == pytest.approx(row["miou"], abs=0.01), ptype
        assert r["mbiou"] == pytest.approx(row["mbiou"], abs=0.01), ptype
        assert (r["msf"] is None) == (ptype == "box")
        if r["msf"] is not None:
            assert r["msf"] == pytest.approx(row["msf"], abs=0.01), ptype
    assert "noisy-box" in text and "10-points" in text and " / -" in text  # the table; the GT box has no mSF


def test_every_model_sees_the_same_prompts_from_one_encoding(stab, tmp_path):
    ref = stab.ref
    assert [m["name"] for m in ref["models"]] == ["sam", "same.pt"] and ref["encoder_calls"] == 1
    assert ref["results"]["same.pt"] == ref["results"]["sam"]
    # a teacher with another decoder gets other numbers, and adds no encoder pass
    moved = _teacher_file(stab.sam, tmp_path / "moved.pt", nudge=0.05)
    other = run_stability(Dataset(stab.four, stab.images), tmp_path / "o.json",
                          StabilityModels(str(stab.sam), (str(stab.same), str(moved))), StabilityConfig(k=K))
    assert other["encoder_calls"] == 1
    assert other["results"]["sam"] == ref["results"]["sam"] == other["results"]["same.pt"]
    assert other["results"]["moved.pt"] != other["results"]["sam"]
    # a subset of the prompt types draws the prompts the full run draws
    sub = run_stability(Dataset(stab.four, stab.images), tmp_path / "s.json", StabilityModels(str(stab.sam)),
                        StabilityConfig(prompts=(PromptType.POINTS_3, PromptType.NOISY_BOX), k=K))
    assert sub["results"]["sam"] == {p: ref["results"]["sam"][p] for p in ("3-points", "noisy-box")}


class Crash(Exception):
    pass


def test_a_killed_job_resumes_and_skips_its_finished_shard(stab, tmp_path):
    out = tmp_path / "r.json"
    args = (Dataset(stab.four, stab.images), out, StabilityModels(str(stab.sam), (str(stab.same),)),
            StabilityConfig(k=K), JobOptions(batch_size=2))

    def crash_after_first_shard(worker_args, todo):
        for item in run_shards_in_process(StabilityWorker, worker_args, todo):
            yield item
            raise Crash

    with pytest.raises(Crash):
        run_stability(*args, executor=crash_after_first_shard)
    assert not out.exists()
    shards = sorted((tmp_path / "r.job" / "shards").glob("*.jsonl"))
    assert len(shards) == 1
    stamp = shards[0].stat().st_mtime_ns
    asked = []

    def recording(worker_args, todo):
        asked.append(sorted(todo))
        yield from run_shards_in_process(StabilityWorker, worker_args, todo)

    summary = run_stability(*args, executor=recording)
    assert summary["skipped_shards"] == 1 and asked == [[1]]
    assert shards[0].stat().st_mtime_ns == stamp, "the finished shard was recomputed"
    assert summary["results"] == stab.ref["results"] and summary["instances"] == stab.ref["instances"] == 12


def test_two_ray_workers_write_what_one_process_writes(stab):
    threads = torch.get_num_threads()
    torch.set_num_threads(JobOptions(num_workers=2).threads_per_worker())
    try:
        one = run_stability(Dataset(stab.four, stab.images), stab.root / "one.json",
                            StabilityModels(str(stab.sam), (str(stab.same),)), StabilityConfig(k=K),
                            JobOptions(batch_size=2))
    finally:
        torch.set_num_threads(threads)
    out = stab.root / "ray.json"
    done = run_subprocess("stability", stab.four, "--images", stab.images, "--sam", stab.sam, "--teacher", stab.same,
                          "--k", K, "--num-workers", "2", "--batch-size", "2", "--json", out)
    assert done.returncode == 0, done.stderr
    assert len(list((stab.root / "ray.job" / "shards").glob("*.jsonl"))) == 2
    ray = json.loads(out.read_text())
    assert ray["results"] == one["results"] and ray["models"] == one["models"] and ray["images"] == 4


def test_the_shipped_teacher_is_accurate_with_its_box_and_steadier_with_more_clicks(tiny_sam_path, tmp_path):
    """The trained example teacher holds its own encoder: it is encoded with it, plain SAM with the base's."""
    coco = _subset(EXAMPLES / "shapes" / "gt.json", tmp_path / "ex.json", [11, 12, 14, 20])
    got = run_stability(Dataset(coco, EXAMPLES / "shapes" / "images"), tmp_path / "ex.stability.json",
                        StabilityModels(str(tiny_sam_path), (str(EXAMPLES / "teacher" / "shapes-sam.pt"),)),
                        StabilityConfig(prompts=(PromptType.BOX, PromptType.POINT_1, PromptType.POINTS_5), k=8))
    teacher, plain = got["results"]["shapes-sam.pt"], got["results"]["sam"]
    own = read_teacher(EXAMPLES / "teacher" / "shapes-sam.pt").encoder_sha256
    assert got["encoder_calls"] == 2 and [m["encoder"] for m in got["models"]] == ["base", own]
    assert teacher["box"]["miou"] > 70 and teacher["box"]["mbiou"] > 50
    assert plain["box"]["miou"] < 30  # an untrained SAM
    assert teacher["1-point"]["msf"] < teacher["5-points"]["msf"]


def test_an_unreadable_image_fails_alone(stab, tmp_path):
    shutil.copytree(stab.images, tmp_path / "images")
    data = json.loads(stab.four.read_text())
    (tmp_path / "images" / data["images"][1]["file_name"]).write_bytes(b"not an image")
    summary = run_stability(Dataset(stab.four, tmp_path / "images"), tmp_path / "u.json",
                            StabilityModels(str(stab.sam)), StabilityConfig(prompts=(PromptType.BOX,), k=1))
    assert summary["errors"] == 1 and summary["images"] == 4
    errors = [json.loads(line) for line in Path(summary["errors_path"]).read_text().splitlines()]
    assert [e["image_id"] for e in errors] == [data["images"][1]["id"]]
    assert summary["instances"] == 12 - 3 == summary["results"]["sam"]["box"]["prompts"]  # image 4 has 3


def _no_masks(data: dict) -> None:
    for a in data["annotations"]:
        a.pop("segmentation")


def _crowd_only(data: dict) -> None:
    for a in data["annotations"]:
        a["iscrowd"] = 1


@pytest.mark.parametrize(("edit", "argv", "message"), [
    (_no_masks, [], "no annotation has a `segmentation`"),
    (_crowd_only, [], "no annotation has a `segmentation`"),
    (None, ["--prompts", "box,2-points"], "--prompts 'box,2-points': unknown prompt type '2-points'; choose from"),
    (None, ["--prompts", "box,box"], "named twice"),
    (None, ["--k", "0"], "--k must be >= 1"),
    (None, ["--min-box-iou", "1"], "--min-box-iou must be in [0, 1)"),
    (None, ["--teacher", "nowhere.pt"], "teacher file not found: nowhere.pt"),
], ids=["no masks", "crowd only", "bad prompt", "twice", "k 0", "min iou 1", "no teacher"])
def test_bad_input_fails_naming_what_before_anything_is_written(stab, tmp_path, capsys, monkeypatch, edit, argv,
                                                                 message):
    data = json.loads(stab.four.read_text())
    if edit is not None:
        edit(data)
    src = tmp_path / "in" / "bad.json"
    src.parent.mkdir()
    src.write_text(json.dumps(data))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, _, err = run(capsys, "stability", src, "--images", stab.images, "--sam", stab.sam, *argv,
                       "--json", work / "s.json")
    assert code == 1 and message in err and "Traceback" not in err, err
    if edit is not None:
        assert str(src) in err
    assert list(work.iterdir()) == [] and list(src.parent.iterdir()) == [src]


@pytest.mark.parametrize("where", ["middle", "corner"])
def test_scores_on_the_crop_equal_the_full_image_ones(where):
    """Boundary IoU's band is the full image's (2% of its diagonal), also where masks touch the border."""
    gt = np.zeros((120, 90), dtype=bool)
    preds = np.zeros((3, 120, 90), dtype=bool)
    y, x = (40, 30) if where == "middle" else (0, 0)
    gt[y:y + 30, x:x + 25] = True
    preds[0, y:y + 30, x:x + 25] = True
    preds[1, y + 5:y + 40, x:x + 20] = True
    preds[2, y + 2:y + 12, x + 3:x + 9] = True
    iou, biou, sf = score_instance(preds, gt, radius_px=3, with_sf=True)
    assert iou == pytest.approx(mask_iou(preds, np.broadcast_to(gt, preds.shape)).sum())
    assert biou == pytest.approx(sum(boundary_iou(p, gt) for p in preds))  # 0.02 x 150 px = 3 px
    assert sf == pytest.approx(stability_score(preds)) and 0 < sf < 1
    assert score_instance(preds[:1], gt, radius_px=3, with_sf=False) == (1.0, 1.0, None)
