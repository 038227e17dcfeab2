"""Entity proposals: masked crops, CLIP's labelling rule, and reading an entities file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from omnilabel.errors import InputError
from omnilabel.models.tiny_clip import build_tiny_clip
from omnilabel.ops.masks import masks_to_rle
from omnilabel.teachers.proposals import (
    ClipImageClassifier,
    ProposalConfig,
    background_names,
    classify_entities,
    label_entities,
    masked_crops,
    read_proposals,
)

CATEGORIES = {1: "circle", 2: "square", 3: "triangle", 4: "ring"}


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> ClipImageClassifier:
    model_name, path = build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny_clip.pt", seed=0)
    return ClipImageClassifier.from_pretrained(path, model_name=model_name)


# --- crops --------------------------------------------------------------------------------------------------------


def _disk(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


@pytest.mark.parametrize(("name", "mask_box"), [
    ("wide box in the middle", (20, 30, 60, 40)),  # x0, y0, x1, y1 (pixel edges)
    ("tall box", (40, 10, 50, 50)),
    ("box at the image corner", (0, 0, 12, 9)),
    ("one pixel", (70, 55, 71, 56)),
])
def test_crop_is_the_masked_box_plus_margin_and_the_fill_elsewhere(name, mask_box):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    x0, y0, x1, y1 = mask_box
    mask = np.zeros((60, 80), dtype=bool)
    mask[y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) < 0.7
    mask[y0, x0] = mask[y1 - 1, x1 - 1] = True  # the box stays the tight box
    longer = max(x1 - x0, y1 - y0)
    margin = int(np.ceil(0.1 * longer - 1e-9))
    side = longer + 2 * margin
    fill = (11.0, 22.0, 33.0)
    crops, windows = masked_crops(image, mask[None], size_hw=(side, side), margin_frac=0.1, fill_rgb=fill)
    wx0, wy0, wx1, wy1 = windows[0].tolist()
    assert wx1 - wx0 == wy1 - wy0 == side
    assert wx0 <= x0 - margin and wy0 <= y0 - margin and wx1 >= x1 + margin and wy1 >= y1 + margin
    # the longer side is grown by exactly the margin: nothing more than asked for
    assert (wx0 == x0 - margin) if x1 - x0 == longer else (wy0 == y0 - margin)
    crop = crops[0].permute(1, 2, 0).numpy()
    assert crop.shape == (side, side, 3)
    # the window's pixels inside the mask are the image's; everything else, outside the image too, is the fill
    in_window = np.zeros((side, side), dtype=bool)
    expected = np.broadcast_to(np.asarray(fill, np.float32), (side, side, 3)).copy()
    for r in range(side):
        for c in range(side):
            y, x = wy0 + r, wx0 + c
            if 0 <= y < 60 and 0 <= x < 80 and mask[y, x]:
                in_window[r, c] = True
                expected[r, c] = image[y, x]
    assert in_window.sum() == mask.sum()
    np.testing.assert_array_equal(crop, expected)


def test_crops_are_resized_to_clip_input_with_the_fill_kept_far_from_the_object():
    image = np.full((100, 100, 3), 200, dtype=np.uint8)
    mask = _disk(100, 100, 50, 50, 30)[None]
    crops, windows = masked_crops(image, mask, size_hw=(32, 32), margin_frac=0.1, fill_rgb=(10.0, 20.0, 30.0))
    assert crops.shape == (1, 3, 32, 32) and crops.dtype == torch.float32
    assert windows[0].tolist() == [13, 13, 88, 88]  # the disk's box [20, 81), 7 px margin (ceil 6.1)
    corner = crops[0, :, :3, :3]  # outside the disk: fill only
    torch.testing.assert_close(corner, torch.tensor([10.0, 20.0, 30.0]).view(3, 1, 1).expand(3, 3, 3))
    torch.testing.assert_close(crops[0, :, 16, 16], torch.full((3,), 200.0))  # the disk's centre
    assert float(crops.min()) >= 0.0 and float(crops.max()) <= 255.0


def test_fill_is_clips_mean_pixel_which_normalises_to_zero(classifier):
    assert classifier.size_hw == (32, 32)
    crops = torch.tensor(classifier.fill_rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    mean = torch.tensor(classifier.mean_rgb).view(1, 3, 1, 1) * 255
    std = torch.tensor(classifier.std_rgb).view(1, 3, 1, 1) * 255
    assert torch.allclose((crops - mean) / std, torch.zeros(1), atol=1e-6)


# --- the labelling rule -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("probs", "allowed", "label", "score", "kept"), [
    # columns: circle(1), square(2), background
    ([0.8, 0.1, 0.1], [1], 1, 0.8, True),
    # sky under a one-tag image: a softmax over the tag alone would say 1.0; against everything it is 0.05
    ([0.05, 0.05, 0.9], [1], 1, 0.05, False),
    # CLIP sees a square, the image is tagged circle only: the label must be a tag, and it is unlikely
    ([0.2, 0.7, 0.1], [1], 1, 0.2, False),
    ([0.2, 0.7, 0.1], [1, 2], 2, 0.7, True),
    ([0.45, 0.45, 0.1], [1, 2], 1, 0.45, False),  # a tie goes to the lower id
    ([0.5, 0.3, 0.2], [1, 2], 1, 0.5, True),  # at the threshold: kept
])
def test_label_is_the_likeliest_allowed_class_against_all_classes_and_background(probs, allowed, label, score, kept):
    labels, scores, keep = label_entities(np.array([probs]), class_ids=[1, 2], allowed_ids=allowed, threshold=0.5)
    assert labels.tolist() == [label] and scores.tolist() == pytest.approx([score]) and keep.tolist() == [kept]


def test_label_rule_refuses_classes_it_does_not_score():
    with pytest.raises(ValueError, match="subset"):
        label_entities(np.full((1, 3), 1 / 3), class_ids=[1, 2], allowed_ids=[7], threshold=0.5)


def test_background_texts_leave_out_dataset_class_names():
    names = background_names(["person", "Sky", "traffic_light", "Road"])
    assert "sky" not in names and "road" not in names and "background" in names and "grass" in names


@pytest.mark.parametrize("threshold", [-0.1, 1.5])
def test_threshold_outside_unit_interval_is_refused(threshold):
    with pytest.raises(InputError, match="--proposal-threshold"):
        ProposalConfig(threshold=threshold)


# --- classification, controlled -----------------------------------------------------------------------------------

# Pure colours on a background of CLIP's mean pixel; what a fake image tower "sees" in each.
_COLOUR_NAME = {0: "circle", 1: "triangle", 2: "square"}  # red, green, blue channel


def _scene(fill_rgb) -> tuple[np.ndarray, list[dict]]:
    image = np.empty((64, 64, 3), dtype=np.uint8)
    image[:] = np.round(fill_rgb).astype(np.uint8)
    masks = np.zeros((4, 64, 64), dtype=bool)
    masks[0, 4:20, 5:25] = True  # red → "circle"
    masks[1, 40:60, 40:60] = True  # green → "triangle"
    masks[2, 30:50, 8:28] = True  # blue → "square"
    masks[3] = ~masks[:3].any(axis=0)  # the rest: mean colour → "background"
    for k, rgb in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        image[masks[k]] = rgb
    entities = [{"entity_id": 10 + k, "segmentation": rle} for k, rle in enumerate(masks_to_rle(masks))]
    return image, entities


@pytest.fixture()
def fake_tower(classifier, monkeypatch):
    """``encode_image`` gives each crop the text embedding of the name its colour stands for."""
    names = ["circle", "square", "triangle", "ring", *background_names(CATEGORIES.values())]
    text = classifier.text_embeddings(names)
    seen: list[int] = []

    def encode_image(x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        seen.append(len(x))
        channel_means = x.mean(dim=(2, 3))  # 0 where a crop is all fill
        rows = []
        for m in channel_means:
            name = _COLOUR_NAME[int(m.argmax())] if float(m.max()) > 0.05 else "background"
            rows.append(text[names.index(name)])
        return torch.stack(rows)

    monkeypatch.setattr(classifier.model, "encode_image", encode_image)
    return names, text.double(), seen


def _expected_probs(classifier, text: torch.Tensor, names: list[str], name: str) -> np.ndarray:
    logits = classifier.logit_scale * text[names.index(name)] @ text.T
    return torch.softmax(logits, dim=-1).numpy()


def test_entities_get_the_class_clip_sees_among_the_tags_and_unlikely_ones_are_dropped(classifier, fake_tower):
    names, text, seen = fake_tower
    image, entities = _scene(classifier.fill_rgb)
    probs = {n: _expected_probs(classifier, text, names, n) for n in ("circle", "triangle", "square", "background")}
    col = {c: names.index(CATEGORIES[c]) for c in CATEGORIES}
    tags = [1, 3]  # circle, triangle
    # per entity: (label among the tags, its probability against every class and the background)
    want = {}
    for entity_id, seen_as in zip((10, 11, 12, 13), ("circle", "triangle", "square", "background"), strict=True):
        label = max(tags, key=lambda c: (probs[seen_as][col[c]], -c))
        want[entity_id] = (label, float(probs[seen_as][col[label]]))
    # the entities CLIP sees as a tag are far likelier than those it sees as another class or as background
    sure = min(want[10][1], want[11][1])
    unsure = max(want[12][1], want[13][1])
    assert sure > unsure
    config = ProposalConfig(threshold=(sure + unsure) / 2)
    classifier.crop_batch = 3
    inst, counts = classify_entities(classifier, image, entities, allowed_ids=tags, categories=CATEGORIES,
                                     config=config)
    assert seen == [3, 1]  # one image-tower pass per chunk of crops
    assert inst.data["entity_id"].tolist() == [10, 11]
    assert inst.category_ids.tolist() == [1, 3] == [want[10][0], want[11][0]]
    np.testing.assert_allclose(inst.scores, [want[10][1], want[11][1]], atol=1e-5)
    assert counts == {"empty": 0, "below_threshold": 2}
    assert inst.masks_rle() == [entities[0]["segmentation"], entities[1]["segmentation"]]  # the masks as they are

    # one tag only: the green entity is no "circle", though a softmax over that one tag would give it 1.0
    inst, _ = classify_entities(classifier, image, entities, allowed_ids=[1], categories=CATEGORIES, config=config)
    assert inst.data["entity_id"].tolist() == [10] and inst.category_ids.tolist() == [1]

    # every class allowed (an unlabelled image): the blue entity is a square
    inst, _ = classify_entities(classifier, image, entities, allowed_ids=sorted(CATEGORIES), categories=CATEGORIES,
                                config=ProposalConfig(threshold=0.0))
    got = dict(zip(inst.data["entity_id"].tolist(), inst.category_ids.tolist(), strict=True))
    assert got[10] == 1 and got[11] == 3 and got[12] == 2
    np.testing.assert_allclose(inst.scores[2], probs["square"][col[2]], atol=1e-5)


def test_class_names_go_through_the_text_tower_once_per_job(classifier):
    image, entities = _scene(classifier.fill_rgb)
    classifier.text.clear_cache()
    classifier._text.clear()
    before = classifier.text.forward_calls
    for _ in range(2):
        classify_entities(classifier, image, entities, allowed_ids=[1], categories=CATEGORIES,
                          config=ProposalConfig(threshold=0.0))
    assert classifier.text.forward_calls == before + 1


def test_an_empty_entity_is_counted_not_classified(classifier):
    image, entities = _scene(classifier.fill_rgb)
    empty = {"entity_id": 99, "segmentation": masks_to_rle(np.zeros((1, 64, 64), dtype=bool))[0]}
    inst, counts = classify_entities(classifier, image, [empty, entities[0]], allowed_ids=[1],
                                     categories=CATEGORIES, config=ProposalConfig(threshold=0.0))
    assert counts["empty"] == 1 and inst.data["entity_id"].tolist() == [10]


# --- the entities file --------------------------------------------------------------------------------------------

_IMAGES = [{"id": 1, "file_name": "a/one.png", "height": 8, "width": 8},
           {"id": 2, "file_name": "two.png", "height": 8, "width": 8},
           {"id": 3, "file_name": "three.png", "height": 8, "width": 8}]


def _entities_file(tmp_path, *, images=None, annotations=None, info=None):
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, :4], masks[1, 4:] = True, True
    rles = masks_to_rle(masks)
    data = {"info": info if info is not None else {"omnilabel": {"command": "entities"}},
            "images": images if images is not None else [{**im, "file_name": im["file_name"].split("/")[-1]}
                                                          for im in _IMAGES[:2]],
            "annotations": annotations if annotations is not None else [
                {"id": k + 1, "image_id": 1 + k // 2, "category_id": 1, "segmentation": rles[k % 2], "iscrowd": 0,
                 "omnilabel": {"source": "entity", "entity_id": k % 2 + 1}} for k in range(4)],
            "categories": [{"id": 1, "name": "entity", "supercategory": "entity"}]}
    path = tmp_path / "entities.json"
    path.write_text(json.dumps(data))
    return path, rles


def test_reads_the_entities_of_the_images_asked_for_and_lists_the_missing(tmp_path):
    path, rles = _entities_file(tmp_path)
    index = read_proposals(path, _IMAGES, need=[1, 3], source="weak.json")
    assert index.missing == [3]
    assert index.entities == {1: [{"entity_id": 1, "segmentation": rles[0]}, {"entity_id": 2, "segmentation": rles[1]}]}


def test_a_file_name_that_differs_names_both_files_the_image_and_the_field(tmp_path):
    images = [{**_IMAGES[0], "file_name": "other.png"}, _IMAGES[1]]
    path, _ = _entities_file(tmp_path, images=images)
    with pytest.raises(InputError) as err:
        read_proposals(path, _IMAGES, need=[1], source="weak.json")
    msg = str(err.value)
    assert str(path) in msg and "weak.json" in msg and "image id=1" in msg and "file_name" in msg
    assert "'other.png'" in msg and "'a/one.png'" in msg


def test_a_size_that_differs_is_refused(tmp_path):
    path, _ = _entities_file(tmp_path, images=[{**_IMAGES[0], "height": 9}])
    with pytest.raises(InputError, match=r"image id=1: height: 9"):
        read_proposals(path, _IMAGES, need=[1])


def test_a_file_that_is_not_an_entities_file_names_the_annotation(tmp_path):
    rle = masks_to_rle(np.ones((1, 8, 8), dtype=bool))[0]
    path, _ = _entities_file(tmp_path, info={}, annotations=[
        {"id": 7, "image_id": 2, "category_id": 3, "segmentation": rle, "omnilabel": {"source": "pseudo"}}])
    with pytest.raises(InputError) as err:
        read_proposals(path, _IMAGES, need=[1])
    msg = str(err.value)
    assert str(path) in msg and "annotation id=7" in msg and "omnilabel.entity_id" in msg
    assert "omnilabel entities" in msg
    path, _ = _entities_file(tmp_path, info={"omnilabel": {"command": "pseudomask"}})
    with pytest.raises(InputError, match=r"info\.omnilabel\.command: 'pseudomask'"):
        read_proposals(path, _IMAGES, need=[1])


def test_a_mask_of_another_size_names_the_annotation_and_field(tmp_path):
    small = masks_to_rle(np.ones((1, 4, 4), dtype=bool))[0]
    path, _ = _entities_file(tmp_path, annotations=[
        {"id": 5, "image_id": 1, "category_id": 1, "segmentation": small, "omnilabel": {"source": "entity",
                                                                                          "entity_id": 1}}])
    with pytest.raises(InputError, match=r"annotation id=5 \(#0\): segmentation\.size: \[4, 4\]"):
        read_proposals(path, _IMAGES, need=[1])
