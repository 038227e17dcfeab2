"""The command line as a user drives it: exit codes, messages, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_runner import run_in_process as run
from pycocotools.coco import COCO

from omnilabel.cli import app, main
from omnilabel.data.synthetic import make_dataset
from omnilabel.ops.masks import masks_to_rle, rle_to_masks


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("shapes"), n_images=20, seed=3, size_hw=(64, 64), max_objects=4)


def test_help_of_every_command(capsys):
    # Typer names a command after its function, underscores as dashes, unless it is named explicitly.
    names = [c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands]
    names += [g.typer_instance.info.name for g in app.registered_groups]
    assert {"split", "validate", "synth", "pseudomask", "finetune-teacher", "train-student", "predict",
            "evaluate", "visualize", "weights"} <= set(names)
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for cmd in names:
        assert cmd in out, cmd
        code, cmd_out, _ = run(capsys, cmd, "--help")
        assert code == 0, cmd
        assert "Usage" in cmd_out and len(cmd_out) > 200, cmd
    code, out, _ = run(capsys, "weights", "--help")
    assert code == 0 and all(sub in out for sub in ("list", "download", "path", "init-sam"))
    code, out, _ = run(capsys, "weights", "init-sam", "--help")
    assert code == 0 and "--embed-dim" in out
    code, out, _ = run(capsys, "weights", "list", "--help")
    assert code == 0 and "--embed-dim" not in out  # each action takes only its own options


def test_split_then_validate_then_load(capsys, shapes, tmp_path):
    weak = tmp_path / "weak.json"
    code, out, err = run(capsys, "split", str(shapes), "--fully", "0.1", "--weak", "boxes", "--seed", "1",
                         "-o", str(weak))
    assert code == 0, err
    data = json.loads(weak.read_text())
    assert len(data["omnilabel_split"]["full_image_ids"]) == 2
    full = set(data["omnilabel_split"]["full_image_ids"])
    for ann in data["annotations"]:
        if ann["image_id"] in full:
            assert "segmentation" in ann
        else:
            assert "bbox" in ann and "segmentation" not in ann and "point" not in ann
    COCO(str(weak))
    code, out, err = run(capsys, "validate", str(weak), "--images", str(shapes.parent / "images"))
    assert code == 0, err
    assert "OK" in out


def test_evaluate_gt_is_perfect_and_eroded_is_worse(capsys, shapes, tmp_path):
    code, out, err = run(capsys, "evaluate", str(shapes), "--gt", str(shapes), "--json", str(tmp_path / "m.json"))
    assert code == 0, err
    perfect = json.loads((tmp_path / "m.json").read_text())["segm"]
    assert perfect["AP"] == pytest.approx(1.0)

    import cv2

    gt = json.loads(shapes.read_text())
    sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    results = []
    for ann in gt["annotations"]:
        m = rle_to_masks([ann["segmentation"]], *sizes[ann["image_id"]])[0]
        eroded = cv2.erode(m.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        results.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "score": 1.0,
                        "segmentation": masks_to_rle(eroded[None])[0]})
    pred = tmp_path / "eroded.json"
    pred.write_text(json.dumps(results))
    code, out, err = run(capsys, "evaluate", str(pred), "--gt", str(shapes), "--json", str(tmp_path / "e.json"))
    assert code == 0, err
    assert json.loads((tmp_path / "e.json").read_text())["segm"]["AP"] < perfect["AP"] - 0.1


def _bad(base: dict, mutate) -> dict:
    data = json.loads(json.dumps(base))
    mutate(data)
    return data


def _set_ann(i: int, **fields):
    def mutate(data):
        data["annotations"][i].update(fields)
    return mutate


BAD_CASES = [
    ("bbox_w_zero", _set_ann(0, segmentation=None, bbox=[1, 1, 0, 5]), ["annotation id=", "bbox"]),
    ("point_outside", _set_ann(0, segmentation=None, point=[500.0, 1.0]), ["annotation id=", "point"]),
    ("unknown_category", _set_ann(0, category_id=999), ["annotation id=", "category_id"]),
    ("duplicate_id", lambda d: d["annotations"][1].update(id=d["annotations"][0]["id"]), ["duplicate", "id"]),
    ("no_file_name", lambda d: d["images"][0].pop("file_name"), ["image id=", "file_name"]),
    ("short_polygon", _set_ann(0, segmentation=[[1, 1, 5, 5]]), ["annotation id=", "segmentation"]),
    ("outside_images", lambda d: d["images"][0].update(file_name="../secret.png"), ["image id=", "file_name"]),
]


@pytest.mark.parametrize(("name", "mutate", "words"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_exits_nonzero_names_record_and_writes_nothing(capsys, shapes, tmp_path, name, mutate, words):
    bad = tmp_path / f"{name}.json"
    bad.write_text(json.dumps(_bad(json.loads(shapes.read_text()), mutate)))
    target = tmp_path / "out.json"
    code, _, err = run(capsys, "split", str(bad), "--fully", "0.5", "-o", str(target)) if name != "outside_images" \
        else run(capsys, "validate", str(bad), "--images", str(shapes.parent / "images"))
    assert code != 0
    assert str(bad) in err
    for word in words:
        assert word in err, (word, err)
    assert "Traceback" not in err
    assert not target.exists()


def test_malformed_json_and_debug_traceback(capsys, tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [}')
    code, _, err = run(capsys, "split", str(bad))
    assert code == 1 and "line 1" in err and "Traceback" not in err
    from omnilabel.errors import InputError

    with pytest.raises(InputError):
        main(["--debug", "split", str(bad)])


def test_usage_error_exit_code(capsys):
    code, _, err = run(capsys, "split")
    assert code == 2
    assert "Missing argument" in err or "COCO" in err


def test_pseudomask_throughput_flags_change_speed_not_output_nor_the_job(capsys, shapes, tmp_path, tiny_sam_path):
    from omnilabel.data.weak import split_coco

    weak = tmp_path / "weak.json"
    weak.write_text(json.dumps(split_coco(json.loads(shapes.read_text()), fully=0.0, weak="boxes", seed=0)))
    common = ["pseudomask", weak, "--weak", "boxes", "--images", shapes.parent / "images", "--sam", tiny_sam_path,
              "--detector", "none", "--num-workers", "0", "--batch-size", "8"]
    for flags, message in ((["--encoder-batch", "0"], "--encoder-batch must be an integer >= 1"),
                           (["--prefetch", "-1"], "--prefetch must be an integer >= 0")):
        code, _, err = run(capsys, *common, *flags, "-o", tmp_path / "bad.json")
        assert code == 1 and message in err
        assert not (tmp_path / "bad.json").exists() and not (tmp_path / "bad.job").exists()
    code, _, err = run(capsys, *common, "-o", tmp_path / "a.json")
    assert code == 0, err
    code, _, err = run(capsys, *common, "--encoder-batch", "3", "--prefetch", "0", "-o", tmp_path / "b.json")
    assert code == 0, err
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert a["annotations"] and a["annotations"] == b["annotations"]
    # not part of the job: a finished job resumed with other values recomputes nothing
    code, stdout, err = run(capsys, *common, "--encoder-batch", "5", "--prefetch", "4", "-o", tmp_path / "a.json")
    assert code == 0, err
    assert "shards resumed (not recomputed)" in stdout
