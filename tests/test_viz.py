"""omnilabel visualize: overlays, prompts, GT comparison and mIoU, uncertainty heat maps, contact sheet, HTML."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pytest
from cli_runner import run_in_process
from PIL import Image

from omnilabel.data.maps import UncertaintyMap
from omnilabel.errors import InputError
from omnilabel.eval.miou import image_miou
from omnilabel.ops.masks import masks_to_rle
from omnilabel.viz import VizConfig, instance_color, visualize
from omnilabel.viz_html import GAP_PX

H, W = 96, 128
ALPHA = 0.45
CATEGORIES = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]


def _rect(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """(H, W) bool, rows y0..y1-1 and columns x0..x1-1 set."""
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


MASK_A = _rect(30, 60, 10, 50)  # circle, prompted by a point inside it
MASK_B = _rect(40, 80, 70, 110)  # square, prompted by a box 2 px wider on each side
MASK_B_HALF = _rect(40, 80, 70, 90)  # IoU with MASK_B: 0.5


def _image(seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8: a gradient with a little noise, so no pixel equals a palette blend by chance."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    rgb = np.stack([xx * 2 % 256, yy * 2 % 256, np.full_like(xx, 120)], axis=-1) + rng.integers(0, 8, (H, W, 3))
    return rgb.astype(np.uint8)


def _seg(mask: np.ndarray) -> dict:
    return masks_to_rle(mask[None])[0]


def _write_images(folder: Path, names: list[str]) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = [_image(i) for i in range(len(names))]
    for name, arr in zip(names, arrays, strict=True):
        Image.fromarray(arr).save(folder / name)
    return arrays


def _images(names: list[str]) -> list[dict]:
    return [{"id": i + 1, "file_name": n, "height": H, "width": W} for i, n in enumerate(names)]


def _pseudo_ann(ann_id: int, image_id: int, cat: int, mask: np.ndarray, score: float, weak_id: int,
                prompt: dict | None = None) -> dict:
    info = {"source": "pseudo", "weak": "points", "weak_id": weak_id}
    if prompt is not None:
        info["prompt"] = prompt
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "segmentation": _seg(mask), "score": score,
            "iscrowd": 0, "omnilabel": info}


@pytest.fixture
def scene(tmp_path) -> dict:
    """One image, two pseudomasks (A: point prompt, B: box prompt) and a GT file (B's GT is half of B)."""
    arrays = _write_images(tmp_path, ["a.png"])
    pseudo = {"images": _images(["a.png"]), "categories": CATEGORIES, "annotations": [
        _pseudo_ann(1, 1, 1, MASK_A, 0.93, 100, {"point": [30.5, 45.5]}),
        _pseudo_ann(2, 1, 2, MASK_B, 0.8, 101, {"bbox": [68, 38, 44, 44]})]}
    gt = {"images": _images(["a.png"]), "categories": CATEGORIES, "annotations": [
        {"id": 100, "image_id": 1, "category_id": 1, "segmentation": _seg(MASK_A), "iscrowd": 0},
        {"id": 101, "image_id": 1, "category_id": 2, "segmentation": _seg(MASK_B_HALF), "iscrowd": 0}]}
    (tmp_path / "pseudo.json").write_text(json.dumps(pseudo))
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    return {"dir": tmp_path, "pseudo": tmp_path / "pseudo.json", "gt": tmp_path / "gt.json", "image": arrays[0]}


def _blend(pixel: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    return np.rint((1 - ALPHA) * pixel.astype(np.float32) + ALPHA * np.asarray(color, np.float32)).astype(np.uint8)


def _read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_overlay_keeps_size_colours_masks_and_leaves_background(scene, tmp_path):
    out = tmp_path / "viz"
    summary = visualize(scene["pseudo"], output_dir=out)
    overlay = _read(out / "images" / "1_a.png")
    img = scene["image"]
    assert overlay.shape == (H, W, 3) and summary["images"] == 1
    # Inside each mask (away from its boundary, prompt and label): the image blended with its colour.
    np.testing.assert_array_equal(overlay[50, 20], _blend(img[50, 20], instance_color(0)))
    np.testing.assert_array_equal(overlay[60, 90], _blend(img[60, 90], instance_color(1)))
    assert instance_color(0) != instance_color(1)
    assert not np.array_equal(overlay[50, 20], img[50, 20])
    # Boundary pixels carry the full colour.
    assert tuple(overlay[59, 30]) == instance_color(0)
    # Far from every mask, prompt and label: the input, unchanged.
    for y, x in [(90, 5), (5, 120), (88, 60), (10, 5)]:
        np.testing.assert_array_equal(overlay[y, x], img[y, x])


def test_point_and_box_prompts_are_drawn(scene, tmp_path):
    out = tmp_path / "viz"
    visualize(scene["pseudo"], output_dir=out)
    overlay, img = _read(out / "images" / "1_a.png"), scene["image"]
    # The point [30.5, 45.5] is pixel (row 45, col 30): a filled circle in the full colour.
    assert tuple(overlay[45, 30]) == instance_color(0)
    # The box [68, 38, 44, 44] has its outline 2 px outside mask B: bottom-left corner and left edge.
    assert tuple(overlay[81, 68]) == instance_color(1)
    assert tuple(overlay[81, 68]) != tuple(img[81, 68])
    assert tuple(overlay[60, 68]) == instance_color(1)  # a dash on the left edge (rows 59..62)


def test_weak_file_draws_its_own_points_and_boxes(tmp_path):
    img = _write_images(tmp_path, ["w.png"])[0]
    weak = {"images": _images(["w.png"]), "categories": CATEGORIES, "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "point": [20.5, 70.5]},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [60, 50, 30, 20]},
        {"id": 3, "image_id": 1, "category_id": 2}]}
    (tmp_path / "weak.json").write_text(json.dumps(weak))
    visualize(tmp_path / "weak.json", output_dir=tmp_path / "viz")
    overlay = _read(tmp_path / "viz" / "images" / "1_w.png")
    assert tuple(overlay[70, 20]) == instance_color(0)
    assert tuple(overlay[69, 60]) == instance_color(1)  # bottom-left corner of the box
    np.testing.assert_array_equal(overlay[60, 75], img[60, 75])  # inside the box: not filled
    assert not np.array_equal(overlay[2, 2], img[2, 2])  # the tag's label, top-left


def test_min_score_and_max_images(scene, tmp_path):
    out = tmp_path / "viz"
    visualize(scene["pseudo"], output_dir=out, config=VizConfig(min_score=0.85, max_images=1))
    overlay, img = _read(out / "images" / "1_a.png"), scene["image"]
    np.testing.assert_array_equal(overlay[60, 90], img[60, 90])  # B scores 0.8: not drawn
    np.testing.assert_array_equal(overlay[50, 20], _blend(img[50, 20], instance_color(0)))


def test_gt_compare_miou_contact_sheet(scene, tmp_path):
    out = tmp_path / "viz"
    summary = visualize(scene["pseudo"], output_dir=out, gt_path=scene["gt"])
    compare = _read(out / "compare" / "1_a.png")
    assert compare.shape[1] == 2 * W + GAP_PX and compare.shape[0] > H
    # Paired by weak_id: IoU 1.0 for A, 0.5 for B.
    assert summary["mean_miou"] == pytest.approx(0.75) and summary["scored_images"] == 1
    # The right half, below the header, is the overlay.
    header = compare.shape[0] - H
    np.testing.assert_array_equal(compare[header:, W + GAP_PX:], _read(out / "images" / "1_a.png"))
    sheet = Image.open(out / "contact_sheet.png")
    sheet.load()
    assert sheet.width >= 256 and sheet.height >= 256 and summary["contact_sheet_images"] == 1


def test_with_gt_a_pseudomask_takes_the_colour_of_the_gt_instance_it_came_from(scene, tmp_path):
    pseudo = json.loads(scene["pseudo"].read_text())
    pseudo["annotations"].reverse()  # B (weak_id 101, the GT's 2nd instance) first, then A
    (tmp_path / "reversed.json").write_text(json.dumps(pseudo))
    out, img = tmp_path / "viz", scene["image"]
    visualize(tmp_path / "reversed.json", output_dir=out / "plain")
    plain = _read(out / "plain" / "images" / "1_a.png")
    np.testing.assert_array_equal(plain[60, 90], _blend(img[60, 90], instance_color(0)))  # by position
    visualize(tmp_path / "reversed.json", output_dir=out / "gt", gt_path=scene["gt"])
    paired = _read(out / "gt" / "images" / "1_a.png")
    np.testing.assert_array_equal(paired[60, 90], _blend(img[60, 90], instance_color(1)))  # as its GT
    np.testing.assert_array_equal(paired[50, 20], _blend(img[50, 20], instance_color(0)))


def test_miou_without_weak_ids_matches_greedily_by_class():
    image = {"id": 1, "height": H, "width": W}
    gt = [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": _seg(MASK_A)},
          {"id": 2, "image_id": 1, "category_id": 2, "segmentation": _seg(MASK_B_HALF)},
          {"id": 3, "image_id": 1, "category_id": 2, "segmentation": _seg(_rect(85, 95, 0, 10))}]
    preds = [{"image_id": 1, "category_id": 1, "segmentation": _seg(MASK_A), "score": 0.9},
             {"image_id": 1, "category_id": 1, "segmentation": _seg(MASK_A), "score": 0.8},  # duplicate
             {"image_id": 1, "category_id": 2, "segmentation": _seg(MASK_B), "score": 0.7},
             {"image_id": 1, "category_id": 1, "segmentation": _seg(_rect(85, 95, 0, 10)), "score": 0.6}]
    # A: 1.0; B-half: 0.5; the third GT is covered only by a prediction of another class: 0.
    assert image_miou(preds, gt, image=image) == pytest.approx(1.5 / 3)
    assert image_miou(preds, [], image=image) is None
    # One prediction covering two GT masks of its class matches only one of them (IoU 0.5 each).
    two = [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": _seg(_rect(0, 10, 0, 10))},
           {"id": 2, "image_id": 1, "category_id": 1, "segmentation": _seg(_rect(0, 10, 10, 20))}]
    wide = [{"image_id": 1, "category_id": 1, "segmentation": _seg(_rect(0, 10, 0, 20)), "score": 0.9}]
    assert image_miou(wide, two, image=image) == pytest.approx(0.25)
    assert image_miou([], gt, image=image) == 0.0


def test_html_escapes_names_and_sorts_worst_first(tmp_path):
    names = ["good.png", "bad<&>.png"]
    _write_images(tmp_path, names)
    cats = [{"id": 1, "name": "cat & <dog>"}, {"id": 2, "name": "square"}]
    pseudo = {"images": _images(names), "categories": cats, "annotations": [
        _pseudo_ann(1, 1, 1, MASK_A, 0.9, 100), _pseudo_ann(2, 2, 2, MASK_B, 0.9, 101)]}
    gt = {"images": _images(names), "categories": cats, "annotations": [
        {"id": 100, "image_id": 1, "category_id": 1, "segmentation": _seg(MASK_A), "iscrowd": 0},
        {"id": 101, "image_id": 2, "category_id": 2, "segmentation": _seg(MASK_B_HALF), "iscrowd": 0}]}
    (tmp_path / "pseudo.json").write_text(json.dumps(pseudo))
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    out = tmp_path / "viz"
    summary = visualize(tmp_path / "pseudo.json", output_dir=out, gt_path=tmp_path / "gt.json",
                        config=VizConfig(html=True))
    page = (out / "index.html").read_text(encoding="utf-8")
    assert summary["html"] == str(out / "index.html")
    assert html.escape("bad<&>.png") in page and "bad<&>.png" not in page
    assert html.escape("cat & <dog>") in page and "<dog>" not in page
    assert "mean mIoU 0.750" in page and "mIoU 0.500" in page and "mIoU 1.000" in page
    assert page.index(html.escape("bad<&>.png")) < page.index("good.png")  # worst first
    assert "<script" not in page and "http" not in page
    for name in ("images/1_good.png", "compare/2_bad.png", "contact_sheet.png"):
        assert name in page and (out / name).is_file()


def test_uncertainty_heat_map_only_where_positive(scene, tmp_path):
    u = np.zeros((H, W), dtype=np.float32)
    u[60:70, 60:70] = 0.8
    UncertaintyMap(u).save(scene["dir"] / "maps" / "a.npy")
    pseudo = json.loads(scene["pseudo"].read_text())
    pseudo["annotations"][0]["omnilabel"]["uncertainty"] = "maps/a.npy"
    scene["pseudo"].write_text(json.dumps(pseudo))
    out = tmp_path / "viz"
    summary = visualize(scene["pseudo"], output_dir=out, config=VizConfig(uncertainty=True))
    heat, overlay = _read(out / "uncertainty" / "1_a.png"), _read(out / "images" / "1_a.png")
    assert heat.shape == overlay.shape and summary["uncertainty"] == 1
    hot = u > 0
    np.testing.assert_array_equal(heat[~hot], overlay[~hot])
    assert (np.abs(heat[hot].astype(int) - overlay[hot].astype(int)).sum(axis=1) > 0).all()


def test_uncertainty_errors(scene, tmp_path):
    with pytest.raises(InputError, match="no drawn annotation names an uncertainty map"):
        visualize(scene["pseudo"], output_dir=tmp_path / "viz", config=VizConfig(uncertainty=True))
    pseudo = json.loads(scene["pseudo"].read_text())
    pseudo["annotations"][1]["omnilabel"]["uncertainty"] = "maps/missing.png"
    scene["pseudo"].write_text(json.dumps(pseudo))
    with pytest.raises(InputError) as err:
        visualize(scene["pseudo"], output_dir=tmp_path / "viz", config=VizConfig(uncertainty=True))
    assert "annotation id=2" in str(err.value) and "missing.png" in str(err.value)
    assert not (tmp_path / "viz").exists()


def test_results_list_needs_gt(scene, tmp_path):
    results = [{"image_id": 1, "category_id": 1, "segmentation": _seg(MASK_A), "score": 0.9}]
    path = tmp_path / "predictions.json"
    path.write_text(json.dumps(results))
    with pytest.raises(InputError, match="--gt"):
        visualize(path, output_dir=tmp_path / "viz")
    summary = visualize(path, output_dir=tmp_path / "viz", gt_path=scene["gt"])
    # Greedy by class: A matched (1.0), B-half unmatched (0).
    assert summary["mean_miou"] == pytest.approx(0.5)
    assert (tmp_path / "viz" / "compare" / "1_a.png").is_file()


def test_missing_image_refused_before_writing(scene, tmp_path):
    (scene["dir"] / "a.png").unlink()
    with pytest.raises(InputError) as err:
        visualize(scene["pseudo"], output_dir=tmp_path / "viz")
    assert "image id=1" in str(err.value) and "a.png" in str(err.value)
    assert not (tmp_path / "viz").exists()


def test_cli_end_to_end(capsys, scene, tmp_path):
    out = tmp_path / "viz"
    code, stdout, err = run_in_process(capsys, "visualize", scene["pseudo"], "--images", scene["dir"], "-o", out,
                                       "--gt", scene["gt"], "--html", "--thumb-size", "64")
    assert code == 0, err
    assert "wrote 1 images" in stdout and "mean mIoU" in stdout and "0.750" in stdout
    assert (out / "images" / "1_a.png").is_file() and (out / "index.html").is_file()
    code, _, err = run_in_process(capsys, "visualize", scene["pseudo"], "-o", out, "--alpha", "2")
    assert code == 1 and "--alpha" in err
