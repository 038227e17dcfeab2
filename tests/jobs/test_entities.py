"""`omnilabel entities`: E-SAM entity masks as COCO + 16-bit id maps that join by `entity_id`, the same in
process, on Ray and after a kill; ids kept from a COCO file, assigned from a folder."""

from __future__ import annotations

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

from omnilabel.jobs.entities import EntitiesInputs, EntityWorker, read_id_map, run_entities
from omnilabel.jobs.options import JobOptions
from omnilabel.jobs.runner import run_shards_in_process
from omnilabel.teachers.entity import EntityConfig
from omnilabel.teachers.loading import TeacherSpec

#: Small grids so that the tiny SAM segments an image in a fraction of a second.
GRIDS = ["--points-per-side", "4", "--gallery-points-per-side", "8"]
CONFIG = EntityConfig(grid_points_per_side=4, gallery_points_per_side=8)



@pytest.fixture(scope="module")
def ent(shapes_coco, tiny_sam_path, tmp_path_factory) -> SimpleNamespace:
    """The synthetic dataset with ids shifted (so kept ids differ from assigned ones), and the in-process
    reference run with maps."""
    root = tmp_path_factory.mktemp("entities")
    shutil.copytree(shapes_coco.parent, root / "data")
    data = json.loads((root / "data" / "coco.json").read_text())
    data["images"] = data["images"][:6]
    for im in data["images"]:
        im["id"] += 100
    data["annotations"] = []
    coco = root / "data" / "six.json"
    coco.write_text(json.dumps(data))
    out, maps = root / "ent.json", root / "maps"
    _ok("entities", coco, "--images", root / "data" / "images", "--sam", tiny_sam_path, "--maps", maps,
        "--batch-size", "2", "-o", out, *GRIDS)
    return SimpleNamespace(root=root, coco=coco, images=root / "data" / "images", out=out, maps=maps,
                           sam=tiny_sam_path)


def test_entities_load_in_pycocotools_keep_the_image_ids_and_join_their_maps(ent):
    coco = COCO(str(ent.out))
    data = json.loads(ent.out.read_text())
    source = json.loads(ent.coco.read_text())
    assert [im["id"] for im in data["images"]] == [im["id"] for im in source["images"]]
    assert data["categories"] == [{"id": 1, "name": "entity", "supercategory": "entity"}]
    assert data["info"]["omnilabel"]["entities"]["maps"] == "maps"
    assert [a["id"] for a in data["annotations"]] == list(range(1, len(data["annotations"]) + 1))
    for im in data["images"]:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[im["id"]]))
        assert anns, im
        id_map = read_id_map(ent.maps / f"{im['id']}.png")
        assert id_map.shape == (im["height"], im["width"])
        ids = [a["omnilabel"]["entity_id"] for a in anns]
        # every id in the map has exactly one annotation, and each annotation's mask is its id's pixels
        assert sorted(ids) == list(range(1, len(anns) + 1))
        assert set(np.unique(id_map)) - {0} == set(ids)
        union = np.zeros(id_map.shape, dtype=int)
        for a in anns:
            m = coco.annToMask(a).astype(bool)
            np.testing.assert_array_equal(m, id_map == a["omnilabel"]["entity_id"])
            assert a["area"] == int(m.sum()) and a["category_id"] == 1 and 0 <= a["score"]
            assert a["omnilabel"]["source"] == "entity"
            union += m
        assert union.max() <= 1, "entities overlap"


def test_a_folder_gets_the_ids_predict_assigns(ent, tmp_path):
    folder = tmp_path / "imgs"
    shutil.copytree(ent.images, folder)
    for p in sorted(folder.iterdir())[3:]:
        p.unlink()
    out = tmp_path / "e.json"
    summary = run_entities(EntitiesInputs(images=folder), out, TeacherSpec(sam=str(ent.sam)), CONFIG)
    data = json.loads(out.read_text())
    assert [(im["id"], im["file_name"]) for im in data["images"]] == [
        (i + 1, p.name) for i, p in enumerate(sorted(folder.iterdir()))]
    assert summary["images"] == 3 and summary["encoder_calls"] == 1.0
    assert 0.0 < summary["covered_before_usr"] <= summary["covered"] <= 1.0


def test_two_ray_workers_write_what_one_process_writes(ent):
    """Bit for bit, with the threads a Ray worker gets (its share of the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(JobOptions(num_workers=2).threads_per_worker())
    try:
        ref = run_entities(EntitiesInputs(ent.coco, ent.images), ent.root / "one.json",
                           TeacherSpec(sam=str(ent.sam)), CONFIG, JobOptions(batch_size=2), maps=ent.root / "m1")
    finally:
        torch.set_num_threads(threads)
    out = ent.root / "ray.json"
    done = run_subprocess("entities", ent.coco, "--images", ent.images, "--sam", ent.sam, "--num-workers", "2",
                          "--batch-size", "2", "--maps", ent.root / "m2", "-o", out, *GRIDS)
    assert done.returncode == 0, done.stderr
    assert len(list((ent.root / "ray.job" / "shards").glob("*.jsonl"))) == 3
    ray, one = json.loads(out.read_text()), json.loads(Path(ref["output"]).read_text())
    for d in (ray, one):
        d["info"]["omnilabel"]["entities"].pop("maps")
    assert ray == one and ray["annotations"]
    for p in sorted((ent.root / "m1").iterdir()):
        assert (ent.root / "m2" / p.name).read_bytes() == p.read_bytes(), p.name


class Crash(Exception):
    pass


def test_a_killed_job_resumes_and_skips_its_finished_shards(ent, tmp_path):
    inputs, spec, out = EntitiesInputs(ent.coco, ent.images), TeacherSpec(sam=str(ent.sam)), tmp_path / "e.json"

    def crash_after_first_shard(worker_args, todo):
        for item in run_shards_in_process(EntityWorker, worker_args, todo):
            yield item
            raise Crash

    with pytest.raises(Crash):
        run_entities(inputs, out, spec, CONFIG, JobOptions(batch_size=2), maps=tmp_path / "maps",
                     executor=crash_after_first_shard)
    assert not out.exists()
    shards = sorted((tmp_path / "e.job" / "shards").glob("*.jsonl"))
    assert len(shards) == 1
    stamp = shards[0].stat().st_mtime_ns
    asked = []

    def recording(worker_args, todo):
        asked.append(sorted(todo))
        yield from run_shards_in_process(EntityWorker, worker_args, todo)

    summary = run_entities(inputs, out, spec, CONFIG, JobOptions(batch_size=2), maps=tmp_path / "maps",
                           executor=recording)
    assert summary["skipped_shards"] == 1 and asked == [[1, 2]]
    assert shards[0].stat().st_mtime_ns == stamp, "the finished shard was recomputed"
    assert json.loads(out.read_text())["annotations"] == json.loads(ent.out.read_text())["annotations"]
    for p in sorted(ent.maps.iterdir()):
        assert (tmp_path / "maps" / p.name).read_bytes() == p.read_bytes()


def test_other_settings_are_another_job(ent, tmp_path, capsys):
    out = tmp_path / "e.json"
    _ok("entities", ent.coco, "--images", ent.images, "--sam", ent.sam, "-o", out, *GRIDS)
    code, _, err = run(capsys, "entities", str(ent.coco), "--images", str(ent.images), "--sam", str(ent.sam),
                       "-o", str(out), "--points-per-side", "5", "--gallery-points-per-side", "8")
    assert code == 1 and "config" in err and "--overwrite" in err, err


def test_an_unreadable_image_fails_alone(ent, tmp_path):
    data = json.loads(ent.coco.read_text())
    shutil.copytree(ent.images, tmp_path / "images")
    (tmp_path / "images" / data["images"][1]["file_name"]).write_bytes(b"not an image")
    summary = run_entities(EntitiesInputs(ent.coco, tmp_path / "images"), tmp_path / "e.json",
                           TeacherSpec(sam=str(ent.sam)), CONFIG)
    assert summary["errors"] == 1 and summary["images"] == 6
    errors = [json.loads(line) for line in Path(summary["errors_path"]).read_text().splitlines()]
    assert [e["image_id"] for e in errors] == [data["images"][1]["id"]]
    kept = {a["image_id"] for a in json.loads((tmp_path / "e.json").read_text())["annotations"]}
    assert data["images"][1]["id"] not in kept and len(kept) == 5


@pytest.mark.parametrize(("argv", "message"), [
    ([], "give a COCO file naming the images, or --images"),
    (["--images", "nowhere"], "nowhere: not a folder"),
    (["--images", "IMAGES", "--points-per-side", "0"], "grid_points_per_side must be >= 1"),
])
def test_bad_input_fails_before_anything_is_written(ent, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    argv = [str(ent.images) if a == "IMAGES" else a for a in argv]
    code, _, err = run(capsys, "entities", *argv, "--sam", str(ent.sam), "-o", str(tmp_path / "e.json"))
    assert code == 1 and message in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_masks_decode_from_rle_as_coco_expects(ent):
    data = json.loads(ent.out.read_text())
    a = data["annotations"][0]
    im = next(i for i in data["images"] if i["id"] == a["image_id"])
    m = mask_utils.decode({"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()})
    assert m.shape == (im["height"], im["width"]) and a["bbox"] == list(mask_utils.toBbox(a["segmentation"]))
