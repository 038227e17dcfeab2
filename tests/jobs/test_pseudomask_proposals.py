"""`omnilabel pseudomask --proposals entities.json`: entity masks, labelled by CLIP, for tags and unlabelled images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_runner import run_in_process as run
from cli_runner import run_ok, run_subprocess
from job_outputs import assert_same_annotations
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from omnilabel.data.weak import split_coco
from omnilabel.models.tiny_clip import build_tiny_clip
from omnilabel.ops.masks import masks_to_rle


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> tuple[str, Path]:
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny_clip.pt", seed=0)


def _entities(gt: dict) -> dict:
    """An entities file made by hand from the GT masks: each visible instance an entity, and what no instance
    covers (the background) one more, as `omnilabel entities` would write it."""
    anns = []
    for im in gt["images"]:
        h, w = im["height"], im["width"]
        rles = [a["segmentation"] for a in gt["annotations"] if a["image_id"] == im["id"]]
        covered = mask_utils.decode([{"size": r["size"], "counts": r["counts"].encode()} for r in rles]).any(axis=2) \
            if rles else np.zeros((h, w), dtype=bool)
        for k, rle in enumerate([*rles, *masks_to_rle(~covered[None])], start=1):
            area = float(mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode()}))
            anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": 1, "segmentation": rle,
                         "area": area, "bbox": [0.0, 0.0, 1.0, 1.0], "iscrowd": 0, "score": 1.0,
                         "omnilabel": {"source": "entity", "entity_id": k}})
    return {"info": {"omnilabel": {"command": "entities"}}, "images": gt["images"], "annotations": anns,
            "categories": [{"id": 1, "name": "entity", "supercategory": "entity"}]}


@pytest.fixture(scope="module")
def data(shapes_coco, tmp_path_factory) -> Path:
    """The synthetic dataset with a tags split (a quarter of the images keep their masks) and its entities."""
    root = tmp_path_factory.mktemp("proposals") / "data"
    shutil.copytree(shapes_coco.parent, root)
    gt = json.loads((root / "coco.json").read_text())
    (root / "weak_tags.json").write_text(json.dumps(split_coco(gt, fully=0.25, weak="tags", seed=0)))
    (root / "entities.json").write_text(json.dumps(_entities(gt)))
    return root


def _args(data: Path, tiny_sam_path: Path, tiny_clip, weak: str, *extra, proposals: Path | None = None) -> list:
    """``pseudomask weak_WEAK.json --detector none --proposals ENTITIES`` with the tiny models."""
    return ["pseudomask", data / f"weak_{weak}.json", "--images", data / "images", "--sam", tiny_sam_path,
            "--detector", "none", "--proposals", proposals or data / "entities.json", "--clip", tiny_clip[1],
            "--clip-arch", tiny_clip[0], *extra]


@pytest.fixture(scope="module")
def tags_run(data, tiny_sam_path, tiny_clip) -> Path:
    """The tags split labelled in this process with every entity kept (threshold 0)."""

    out = data / "tags_ref.json"
    run_ok(*_args(data, tiny_sam_path, tiny_clip, "tags", "--proposal-threshold", "0", "--batch-size", "3",
                  "-o", out))
    return out


def _entity_masks(data: Path) -> dict[tuple[int, int], dict]:
    ents = json.loads((data / "entities.json").read_text())["annotations"]
    return {(a["image_id"], a["omnilabel"]["entity_id"]): a["segmentation"] for a in ents}


def test_tags_images_take_entity_masks_labelled_among_their_tags(data, tags_run):
    coco = COCO(str(tags_run))
    weak = json.loads((data / "weak_tags.json").read_text())
    assert coco.dataset["images"] == weak["images"]  # every image is labelled, none left out
    tags: dict[int, set[int]] = {}
    for a in weak["annotations"]:
        if "segmentation" not in a:
            tags.setdefault(a["image_id"], set()).add(a["category_id"])
    entities = _entity_masks(data)
    pseudo = [a for a in coco.dataset["annotations"] if a["omnilabel"]["source"] == "pseudo"]
    assert {a["image_id"] for a in pseudo} == set(tags)
    for a in pseudo:
        info = a["omnilabel"]
        assert info["weak"] == "tags" and info["weak_id"] is None and set(info["prompt"]) == {"entity_id"}
        assert a["segmentation"] == entities[(a["image_id"], info["prompt"]["entity_id"])]  # the mask as it is
        assert a["category_id"] in tags[a["image_id"]]
        assert 0.0 <= a["score"] == info["clip_score"] <= 1.0
        assert info["teacher"]["classifier"] == tiny_clip_name(tags_run)
    # threshold 0: every entity of every tags image is kept, in entity order
    for image_id in tags:
        got = [a["omnilabel"]["prompt"]["entity_id"] for a in pseudo if a["image_id"] == image_id]
        assert got == sorted(k for i, k in entities if i == image_id)
    # entity masks need no SAM: an image with only tags is classified, never encoded
    records = [json.loads(line) for shard in sorted((data / "tags_ref.job" / "shards").glob("*.jsonl"))
               for line in shard.read_text().splitlines()]
    assert {r["image_id"] for r in records if "classify" in r["seconds"]} == set(tags)
    assert not any("encode" in r["seconds"] for r in records)
    gt = [a for a in coco.dataset["annotations"] if a["omnilabel"]["source"] == "gt"]
    assert len(gt) == sum("segmentation" in a for a in weak["annotations"])
    recorded = coco.dataset["info"]["omnilabel"]["proposals"]
    assert recorded["file"] == str((data / "entities.json").resolve()) and len(recorded["sha256"]) == 64
    assert recorded["threshold"] == 0.0


def tiny_clip_name(output: Path) -> str:
    return json.loads(output.read_text())["info"]["omnilabel"]["models"]["classifier"]


def test_unlabelled_images_use_every_class_and_the_threshold_drops(capsys, data, tiny_sam_path, tiny_clip, tags_run):
    shutil.copy(data / "weak_tags.json", data / "weak_none.json")
    out = data / "none.json"
    code, _, err = run(capsys, *_args(data, tiny_sam_path, tiny_clip, "none", "--weak", "none",
                                      "--proposal-threshold", "0", "-o", out))
    assert code == 0, err
    anns = [a for a in COCO(str(out)).dataset["annotations"] if a["omnilabel"]["source"] == "pseudo"]
    assert anns and all(a["omnilabel"]["weak"] == "none" for a in anns)
    weak = json.loads((data / "weak_tags.json").read_text())
    tags = {(a["image_id"], a["category_id"]) for a in weak["annotations"]}
    # labels come from every class: some are classes the image is not tagged with
    assert {a["category_id"] for a in anns} <= {1, 2, 3, 4}
    assert any((a["image_id"], a["category_id"]) not in tags for a in anns)
    # a threshold between the scores: the entities CLIP is less sure of are dropped, the others keep their label
    scores = sorted({a["score"] for a in anns})
    threshold = (scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2
    code, _, err = run(capsys, *_args(data, tiny_sam_path, tiny_clip, "none", "--weak", "none",
                                      "--proposal-threshold", str(threshold), "-o", data / "none_half.json"))
    assert code == 0, err
    kept = {(a["image_id"], a["omnilabel"]["prompt"]["entity_id"]): a
            for a in json.loads((data / "none_half.json").read_text())["annotations"]
            if a["omnilabel"]["source"] == "pseudo"}
    assert 0 < len(kept) < len(anns)
    for a in anns:
        key = (a["image_id"], a["omnilabel"]["prompt"]["entity_id"])
        assert (key in kept) == (a["score"] >= threshold)
        if key in kept:
            assert kept[key]["category_id"] == a["category_id"]


def test_auto_without_a_detector_labels_every_image_and_leaves_out_those_the_file_lacks(capsys, data, tiny_sam_path,
                                                                                       tiny_clip):
    gt = json.loads((data / "coco.json").read_text())
    weak = split_coco(gt, fully=0.25, weak="mixed-images", seed=1)
    first = weak["images"][0]
    weak["images"].append({**first, "id": 99})  # an unlabelled image (the pixels of the first)
    tagged = sorted({a["image_id"] for a in weak["annotations"] if not {"segmentation", "bbox", "point"} & set(a)})
    # one tagged image also carries the GT mask of its first object, and only that object's class as a tag: the
    # entity of that object (entity 1) is the annotated object again, and is dropped as a duplicate
    dup_image = tagged[1]
    annotated = next(a for a in gt["annotations"] if a["image_id"] == dup_image)
    weak["annotations"] = [a for a in weak["annotations"] if a["image_id"] != dup_image] + [
        {**annotated, "id": 90_001}, {"id": 90_002, "image_id": dup_image, "category_id": annotated["category_id"]}]
    (data / "weak_auto.json").write_text(json.dumps(weak))
    entities = _entities(gt)
    entities["images"].append({**first, "id": 99})
    entities["annotations"] += [{**a, "id": 1000 + a["id"], "image_id": 99} for a in entities["annotations"]
                                if a["image_id"] == first["id"]]
    lacking = tagged[0]
    entities["images"] = [im for im in entities["images"] if im["id"] != lacking]
    entities["annotations"] = [a for a in entities["annotations"] if a["image_id"] != lacking]
    proposals = data / "entities_auto.json"
    proposals.write_text(json.dumps(entities))
    out = data / "auto.json"
    code, _, err = run(capsys, *_args(data, tiny_sam_path, tiny_clip, "auto", "--proposal-threshold", "0",
                                      "-o", out, proposals=proposals))
    assert code == 0, err
    assert f"1 of the {len(tagged) + 1} image(s) with image-level tags or no labels are not in {proposals}" in err
    coco = COCO(str(out))
    assert {im["id"] for im in coco.dataset["images"]} == {im["id"] for im in weak["images"]} - {lacking}
    by_weak: dict[str, set[int]] = {}
    for a in coco.dataset["annotations"]:
        by_weak.setdefault(a["omnilabel"]["weak"], set()).add(a["image_id"])
    assert by_weak["none"] == {99}
    assert by_weak["tags"] == set(tagged) - {lacking}
    assert {"points", "boxes"} <= set(by_weak)
    on_dup = [a for a in coco.dataset["annotations"] if a["image_id"] == dup_image]
    assert [a["omnilabel"]["weak_id"] for a in on_dup if a["omnilabel"]["source"] == "gt"] == [90_001]
    dup_entities = [a["omnilabel"]["prompt"]["entity_id"] for a in on_dup if a["omnilabel"]["source"] == "pseudo"]
    assert dup_entities == sorted(k for i, k in _entity_masks(data) if i == dup_image)[1:]
    assert {a["category_id"] for a in on_dup} == {annotated["category_id"]}


def test_with_a_detector_the_entities_still_label_the_tags_and_the_detector_refines_points(
        capsys, data, tiny_sam_path, tiny_clip, tiny_gdino_dir):
    gt = json.loads((data / "coco.json").read_text())
    (data / "weak_mixed.json").write_text(json.dumps(split_coco(gt, fully=0.0, weak="mixed-images", seed=2)))
    out = data / "with_detector.json"
    args = _args(data, tiny_sam_path, tiny_clip, "mixed", "--proposal-threshold", "0", "-o", out)
    args[args.index("--detector") + 1] = tiny_gdino_dir
    code, _, err = run(capsys, *args)
    assert code == 0, err
    done = json.loads(out.read_text())
    assert done["info"]["omnilabel"]["models"]["detector"] == tiny_gdino_dir.name  # loaded, for the points
    anns = done["annotations"]
    assert {a["omnilabel"]["weak"] for a in anns} == {"tags", "points", "boxes"}
    for a in anns:
        if a["omnilabel"]["weak"] == "tags":
            assert set(a["omnilabel"]["prompt"]) == {"entity_id"} and "detector_score" not in a["omnilabel"]
        if a["omnilabel"]["weak"] == "points":
            assert a["omnilabel"]["prompt_box"] in ("gdino", "sam")


def test_bad_proposals_are_refused_before_any_model_loads(capsys, data, tiny_sam_path, tiny_clip, tmp_path):
    entities = json.loads((data / "entities.json").read_text())
    entities["images"][3]["file_name"] = "elsewhere/other.png"
    moved = tmp_path / "moved.json"
    moved.write_text(json.dumps(entities))
    weak = data / "weak_tags.json"
    out = ("-o", tmp_path / "out.json")
    code, _, err = run(capsys, *_args(data, tiny_sam_path, tiny_clip, "tags", *out, proposals=moved))
    image_id = entities["images"][3]["id"]
    assert code == 1 and str(moved) in err and str(weak) in err and f"image id={image_id}: file_name" in err
    # the weak file itself is no entities file: its first annotation is named
    code, _, err = run(capsys, *_args(data, tiny_sam_path, tiny_clip, "tags", *out, proposals=weak))
    first = json.loads(weak.read_text())["annotations"][0]["id"]
    assert code == 1 and str(weak) in err and f"annotation id={first} " in err and "omnilabel.entity_id" in err
    code, _, err = run(capsys, *_args(data, tiny_sam_path, tiny_clip, "tags", *out, "--refiner",
                                      tmp_path / "refiner.pt"))
    assert code == 1 and "--refiner cannot score entity proposals" in err
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "out.job").exists()


def test_rerun_resumes_and_another_proposals_file_is_another_job(capsys, data, tiny_sam_path, tiny_clip, tags_run):
    out = data / "resume.json"
    common = ["--batch-size", "3", "-o", out]
    code, _, err = run(capsys, *_args(data, tiny_sam_path, tiny_clip, "tags", "--proposal-threshold", "0", *common))
    assert code == 0, err
    assert out.read_bytes() == tags_run.read_bytes()
    shards = sorted((data / "resume.job" / "shards").glob("*.jsonl"))
    assert len(shards) == 4
    for s in shards[2:]:
        s.unlink()
    stamps = {s: s.stat().st_mtime_ns for s in shards[:2]}
    out.rename(data / "resume_first.json")
    code, stdout, err = run(capsys, *_args(data, tiny_sam_path, tiny_clip, "tags", "--proposal-threshold", "0",
                                           *common))
    assert code == 0, err
    assert "resumed" in stdout and all(s.stat().st_mtime_ns == t for s, t in stamps.items())
    assert out.read_bytes() == (data / "resume_first.json").read_bytes()
    # the same job dir with other entities: refused, then restarted with --overwrite
    entities = json.loads((data / "entities.json").read_text())
    entities["annotations"] = entities["annotations"][1:]
    changed = data / "entities_changed.json"
    changed.write_text(json.dumps(entities))
    other = _args(data, tiny_sam_path, tiny_clip, "tags", "--proposal-threshold", "0", *common, proposals=changed)
    code, _, err = run(capsys, *other)
    assert code != 0 and "different job" in err and "proposals" in err
    code, _, err = run(capsys, *other, "--overwrite")
    assert code == 0, err
    assert json.loads(out.read_text())["info"]["omnilabel"]["proposals"]["file"] == str(changed.resolve())
    # the threshold is part of the job too
    code, _, err = run(capsys, *_args(data, tiny_sam_path, tiny_clip, "tags", "--proposal-threshold", "0.2", *common,
                                      proposals=changed))
    assert code != 0 and "different job" in err and "pipeline" in err


def test_two_ray_workers_equal_in_process(data, tiny_sam_path, tiny_clip, tags_run):
    out = data / "tags_ray.json"
    done = run_subprocess(*_args(data, tiny_sam_path, tiny_clip, "tags", "--proposal-threshold", "0",
                                 "--batch-size", "3", "--num-workers", "2", "-o", out))
    assert done.returncode == 0, done.stderr
    ref, par = json.loads(tags_run.read_text()), json.loads(out.read_text())
    assert_same_annotations(ref["annotations"], par["annotations"], ignore=("score", "omnilabel"))
    for a, b in zip(ref["annotations"], par["annotations"], strict=True):
        assert a["omnilabel"].get("prompt") == b["omnilabel"].get("prompt")
        assert a["omnilabel"].get("clip_score") == pytest.approx(b["omnilabel"].get("clip_score"), abs=1e-5)
    assert len(list((data / "tags_ray.job" / "shards").glob("*.jsonl"))) == 4
