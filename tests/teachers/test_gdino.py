from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from omnilabel.data.synthetic import CLASSES, render_scene
from omnilabel.errors import CheckpointError, InputError
from omnilabel.models.tiny_gdino import BERT_IDS, build_tiny_gdino
from omnilabel.ops.boxes import box_iou
from omnilabel.teachers.gdino import (
    GDinoConfig,
    GDinoTeacher,
    build_prompt,
    chunk_class_names,
    class_token_indices,
    normalize_class_name,
    token_logits_to_class_scores,
)

# Category ids deliberately not 0..k-1, so a detection's id must come from the mapping, not the index.
IDS = [11, 12, 13, 14]
COLOURS = "red green blue yellow black white small large big little old new".split()
OBJECTS = ["traffic light", "fire hydrant", "parking meter", "teddy bear", "wine glass", "cell phone",
           "dining table", "potted plant", "tennis racket", "hair drier"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_gdino(tmp_path_factory.mktemp("gdino") / "tiny", seed=0)


@pytest.fixture(scope="module")
def teacher(model_dir):
    return GDinoTeacher(model_dir)


@pytest.fixture(scope="module")
def image():
    img, _ = render_scene(np.random.default_rng(3), size_hw=(96, 144))
    return img


def _same_class_overlap(inst, iou_thresh):
    iou = box_iou(inst.boxes_xyxy, inst.boxes_xyxy)
    np.fill_diagonal(iou, 0.0)
    same = inst.category_ids[:, None] == inst.category_ids[None, :]
    return bool(((iou > iou_thresh) & same).any())


def test_tiny_gdino_loads_offline_with_bert_delimiter_ids(model_dir):
    from transformers import AutoProcessor, GroundingDinoForObjectDetection

    model = GroundingDinoForObjectDetection.from_pretrained(model_dir, local_files_only=True)
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    tok = processor.tokenizer
    assert (tok.cls_token_id, tok.sep_token_id, tok.pad_token_id) == (101, 102, 0)
    assert tok.convert_tokens_to_ids(["."])[0] == BERT_IDS["."]
    assert set(model.model.special_tokens.tolist()) >= {101, 102, 1012}
    assert tok.unk_token not in tok.tokenize("traffic light. xylophone. ring. st bernard.")
    assert model.config.max_text_len == 256


def test_same_seed_same_weights(tmp_path, model_dir):
    from safetensors.torch import load_file

    again = load_file(build_tiny_gdino(tmp_path / "again", seed=0) / "model.safetensors")
    first = load_file(model_dir / "model.safetensors")
    assert again.keys() == first.keys()
    assert all(torch.equal(again[k], first[k]) for k in first)


def test_detect_returns_valid_sorted_filtered_boxes(teacher, image):
    h, w = image.shape[:2]
    calls = teacher.forward_calls
    inst = teacher.detect(image, CLASSES, category_ids=IDS)
    assert teacher.forward_calls == calls + 1
    assert len(inst) > 0 and inst.masks is None and inst.image_size == (h, w)
    b = inst.boxes_xyxy
    assert b.dtype == np.float64 and inst.scores.dtype == np.float64 and inst.category_ids.dtype == np.int64
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
    assert (inst.scores >= 0.3).all() and (inst.scores <= 1).all()
    assert np.all(np.diff(inst.scores) <= 0)
    assert set(inst.category_ids.tolist()) <= set(IDS)
    assert not _same_class_overlap(inst, 0.9)


def test_boxes_follow_transformers_post_processing(teacher, image):
    """Every detection is one of the boxes transformers' own post-processing gives for the same prompt."""
    h, w = image.shape[:2]
    inst = teacher.detect(image, CLASSES, category_ids=IDS)
    proc = teacher.processor
    inputs = proc(images=image, text=build_prompt(CLASSES)[0], return_tensors="pt")
    with torch.inference_mode():
        out = teacher.model(**inputs)
    ref = proc.post_process_grounded_object_detection(out, inputs["input_ids"], threshold=0.0, text_threshold=0.0,
                                                      target_sizes=[(h, w)])[0]["boxes"].numpy()
    ref = np.clip(ref, 0, [w, h, w, h])
    dist = np.abs(inst.boxes_xyxy[:, None, :] - ref[None, :, :]).max(axis=2)
    assert dist.min(axis=1).max() < 1e-3


def test_nms_modes_and_caps(teacher, image):
    loose = GDinoTeacher(teacher.model, processor=teacher.processor, config=GDinoConfig(nms_iou=1.0))
    everything = loose.detect(image, CLASSES, category_ids=IDS)
    for mode in ("class_wise", "agnostic"):
        strict = GDinoTeacher(teacher.model, processor=teacher.processor,
                              config=GDinoConfig(nms_iou=0.3, nms_mode=mode))
        kept = strict.detect(image, CLASSES, category_ids=IDS)
        assert 0 < len(kept) < len(everything)
        iou = box_iou(kept.boxes_xyxy, kept.boxes_xyxy)
        np.fill_diagonal(iou, 0.0)
        if mode == "agnostic":
            assert not (iou > 0.3).any()
        else:
            assert not _same_class_overlap(kept, 0.3)
            assert (iou > 0.3).any()  # boxes of different classes are left alone
    capped = GDinoTeacher(teacher.model, processor=teacher.processor,
                          config=replace(loose.config, max_detections=3)).detect(image, CLASSES, category_ids=IDS)
    np.testing.assert_allclose(capped.scores, everything.scores[:3])
    strict_thresh = teacher.detect(image, CLASSES, category_ids=IDS, box_threshold=0.999)
    assert 0 < len(strict_thresh) < len(teacher.detect(image, CLASSES, category_ids=IDS))
    assert (strict_thresh.scores >= 0.999).all()


def test_long_class_list_is_chunked_not_run_per_class(teacher, image):
    names = [f"{c} {o}" for c in COLOURS for o in OBJECTS][:120]
    tok = teacher.processor.tokenizer
    chunks = chunk_class_names(tok, names, 256)
    assert sorted(i for c in chunks for i in c) == list(range(len(names)))
    total = sum(len(tok.tokenize(n)) + 1 for n in names)
    assert total > 254 and len(chunks) == math.ceil(total / 254)
    for chunk in chunks:
        assert len(tok(build_prompt([names[i] for i in chunk])[0])["input_ids"]) <= 256

    calls = teacher.forward_calls
    inst = teacher.detect(image, names, category_ids=range(1000, 1000 + len(names)))
    assert teacher.forward_calls - calls == len(chunks)
    assert 1 < len(chunks) <= len(names) // 20
    assert len(inst) > 0 and set(inst.category_ids.tolist()) <= set(range(1000, 1120))
    assert np.all(np.diff(inst.scores) <= 0)
    assert not _same_class_overlap(inst, 0.9)


def test_chunking_packs_and_rejects_oversized_names(teacher):
    tok = teacher.processor.tokenizer
    assert chunk_class_names(tok, [], 256) == []
    assert chunk_class_names(tok, ["circle", "ring"], 256) == [[0, 1]]
    # costs 2 ("circle" + ".") and 3 ("traffic light" + "."), capacity 6 - 2 = 4: first-fit decreasing
    names = ["traffic light", "circle", "fire hydrant", "ring"]
    assert chunk_class_names(tok, names, 6) == [[0], [2], [1, 3]]
    with pytest.raises(InputError, match="too long"):
        chunk_class_names(tok, ["xylophone"], 6)


def test_token_spans_map_multiword_names_and_word_pieces(teacher):
    tok = teacher.processor.tokenizer
    names = ["Traffic Light", "xylophone", "St. Bernard"]
    prompt, spans = build_prompt(names)
    assert prompt == "traffic light. xylophone. st bernard."
    enc = tok(prompt, return_offsets_mapping=True)
    idx = class_token_indices(np.asarray(enc["offset_mapping"]), spans)
    tokens = enc.tokens()
    assert [tokens[i] for i in idx[0]] == ["traffic", "light"]
    assert len(idx[1]) > 1 and tokens[idx[1][0]] == "x" and all(tokens[i].startswith("##") for i in idx[1][1:])
    assert "".join(tokens[i] for i in idx[2]).replace("##", "") == "stbernard"
    delimiters = [i for i, t in enumerate(tokens) if t in ("[CLS]", "[SEP]", ".")]
    assert not set(delimiters) & {int(i) for part in idx for i in part}

    logits = np.full((4, len(tokens)), -5.0)
    logits[0, idx[0][1]] = 3.0        # "light" alone → traffic light
    logits[1, idx[1][-1]] = 2.0       # the last word piece of xylophone
    logits[1, idx[0][0]] = 1.0        # weaker on "traffic"
    logits[2, delimiters] = 9.0       # only delimiters: no class gains
    logits[3, idx[2]] = np.linspace(-1.0, 0.0, len(idx[2]))
    logits[3, idx[2][2]] = 4.0        # a middle piece of a two-word name
    logits[:, -1] = -np.inf
    scores = token_logits_to_class_scores(logits, idx)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    assert scores.shape == (4, 3)
    assert scores.argmax(axis=1)[[0, 1, 3]].tolist() == [0, 1, 2]
    np.testing.assert_allclose(scores[0], [sig(3.0), sig(-5.0), sig(-5.0)])
    np.testing.assert_allclose(scores[1], [sig(1.0), sig(2.0), sig(-5.0)])
    np.testing.assert_allclose(scores[2], sig(-5.0))
    np.testing.assert_allclose(scores[3], [sig(-5.0), sig(-5.0), sig(4.0)])


def test_bad_inputs_raise_input_errors(teacher, image):
    with pytest.raises(InputError):
        teacher.detect(image[..., 0], CLASSES, category_ids=IDS)
    with pytest.raises(InputError):
        teacher.detect(image.astype(np.float32), CLASSES, category_ids=IDS)
    with pytest.raises(InputError, match="category ids"):
        teacher.detect(image, CLASSES, category_ids=IDS[:2])
    with pytest.raises(InputError, match="empty"):
        normalize_class_name(" . ")
    with pytest.raises(InputError):
        GDinoConfig(box_threshold=1.5)
    calls = teacher.forward_calls
    empty = teacher.detect(image, [], category_ids=[])
    assert len(empty) == 0 and teacher.forward_calls == calls


def test_broken_checkpoints_raise_checkpoint_errors(tmp_path, model_dir):
    with pytest.raises(CheckpointError, match="config.json"):
        GDinoTeacher(tmp_path / "missing")
    no_tok = shutil.copytree(model_dir, tmp_path / "no_tokenizer")
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="delimiter ids"):
        GDinoTeacher(no_tok)
    deeper = shutil.copytree(model_dir, tmp_path / "deeper")
    cfg = json.loads((deeper / "config.json").read_text())
    cfg["encoder_layers"] = 2
    (deeper / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing keys"):
        GDinoTeacher(deeper)
    wider = shutil.copytree(model_dir, tmp_path / "wider")
    cfg = json.loads((wider / "config.json").read_text())
    cfg["num_queries"] = 40
    (wider / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError):
        GDinoTeacher(wider)
