"""Building the student: presets, pretrained weights from local directories or the cache, strict loading."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import ResNetConfig, ResNetForImageClassification

from omnilabel.errors import CheckpointError, InputError
from omnilabel.students.mask2former import (
    BACKBONES,
    PRESETS,
    STAGES,
    backbone_of,
    build_model,
    hf_config,
    load_weights,
    resolve_pretrained,
    set_train_mode,
)
from omnilabel.students.run import make_configs

NAMES = ["circle", "square", "triangle"]


def _tiny_resnet_dir(path, seed: int = 0):
    torch.manual_seed(seed)
    config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic",
                          num_labels=10)
    model = ResNetForImageClassification(config)
    model.save_pretrained(path)
    return model


def test_tiny_preset_forward_shapes():
    cfg, m2f = hf_config(PRESETS["tiny"], class_names=NAMES)
    assert cfg == PRESETS["tiny"] and m2f.num_labels == 3 and m2f.num_queries == 20
    model = build_model(m2f.to_dict()).eval()  # what predict does: rebuild from the stored dict
    with torch.no_grad():
        out = model(pixel_values=torch.zeros(2, 3, 128, 128))
    assert out.class_queries_logits.shape == (2, 20, 4)
    assert out.masks_queries_logits.shape == (2, 20, 32, 32)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


def test_presets_and_overrides():
    model, train, pretrained = make_configs("paper")
    assert (model.backbone, model.num_queries, model.image_size) == ("resnet50", 100, 1024)
    assert (model.eval_min_size, model.eval_max_size) == (800, 1333)
    assert (train.lr, train.weight_decay, train.backbone_lr_mult, train.batch_size, train.epochs) == (
        1e-4, 0.05, 0.1, 32, 50)
    assert (train.lr_schedule, train.lr_gamma) == ("multistep", 0.1)
    assert train.lr_steps == pytest.approx((0.8889, 0.9630), abs=1e-4)
    assert pretrained == "auto"
    model, train, pretrained = make_configs("tiny", backbone="resnet18", lr=1e-3, max_steps=None)
    assert model.backbone == "resnet18" and model.num_queries == 20 and train.lr == 1e-3 and pretrained == "none"
    assert (model.eval_min_size, model.eval_max_size, train.lr_schedule) == (None, None, "poly")
    model, train, _ = make_configs("paper", lr_schedule="poly", lr_steps=[0.5, 0.75], eval_min_size=512,
                                   eval_max_size=853)
    assert train.lr_schedule == "poly" and train.lr_steps == (0.5, 0.75)
    assert (model.eval_min_size, model.eval_max_size) == (512, 853)
    for bad in ({"backbone": "vgg16"}, {"image_size": 100}, {"batch_size": 0}, {"min_score": 2.0},
                {"lr_schedule": "cosine"}, {"lr_steps": (0.9, 0.5)}, {"lr_steps": (0.5, 1.5)}, {"lr_steps": (0.0,)},
                {"lr_gamma": 0.0}, {"eval_max_size": 1333}, {"eval_min_size": 800, "eval_max_size": 600}):
        with pytest.raises(InputError):
            make_configs("tiny", **bad)
    with pytest.raises(InputError, match="cosine"):
        make_configs("paper", lr_schedule="cosine")


def test_resnet_directory_gives_the_backbone_its_weights_and_frozen_bn(tmp_path):
    resnet = _tiny_resnet_dir(tmp_path / "r")
    source = resolve_pretrained(str(tmp_path / "r"), backbone="tiny")
    assert source.kind == "resnet"
    _, m2f = hf_config(PRESETS["tiny"], class_names=NAMES, source=source)
    model = build_model(m2f, source=source)
    ours = backbone_of(model).state_dict()
    for key, value in resnet.resnet.state_dict().items():
        assert torch.equal(ours[key], value), key
    set_train_mode(model, freeze_backbone_bn=True)
    bn = next(m for m in backbone_of(model).modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not bn.training and not bn.weight.requires_grad
    assert model.class_predictor.weight.requires_grad


def test_mask2former_directory_keeps_all_but_the_class_head(tmp_path):
    _, m2f = hf_config(PRESETS["tiny"], class_names=["a", "b", "c", "d", "e"])
    torch.manual_seed(1)
    released = build_model(m2f)
    released.save_pretrained(tmp_path / "m2f")
    source = resolve_pretrained(str(tmp_path / "m2f"), backbone="resnet50")
    assert source.kind == "mask2former"
    cfg, new = hf_config(dataclasses.replace(PRESETS["paper"], image_size=256), class_names=NAMES, source=source)
    assert cfg.backbone == "resnet" and cfg.num_queries == 20 and cfg.hidden_dim == 64 and cfg.image_size == 256
    model = build_model(new, source=source)
    assert model.class_predictor.weight.shape == (4, 64)
    theirs = released.state_dict()
    for key, value in model.state_dict().items():
        if not key.startswith(("class_predictor.", "criterion.")):
            assert torch.equal(value, theirs[key]), key


def test_auto_uses_the_cache_and_explains_a_missing_download(tmp_path, monkeypatch):
    monkeypatch.setenv("OMNILABEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMNILABEL_OFFLINE", "1")
    with pytest.raises(CheckpointError) as err:
        resolve_pretrained("auto", backbone="resnet50")
    message = str(err.value)
    assert "microsoft/resnet-50" in message and "--pretrained none" in message and "--pretrained PATH" in message
    assert str(tmp_path / "cache" / "resnet-50" / "config.json") in message
    assert str(tmp_path / "cache" / "resnet-50" / "model.safetensors") in message
    with pytest.raises(CheckpointError, match="no ImageNet weights"):
        resolve_pretrained("auto", backbone="tiny")
    # a cached copy is used without any download (here a small ResNet stands in for ResNet-18)
    _tiny_resnet_dir(tmp_path / "cache" / "resnet-18")
    source = resolve_pretrained("auto", backbone="resnet18")
    assert source.kind == "resnet" and source.path.endswith("resnet-18")
    _, m2f = hf_config(PRESETS["tiny"], class_names=NAMES, source=source)
    assert m2f.backbone_config.hidden_sizes == [16, 32, 64, 128] and m2f.backbone_config.out_features == STAGES


def test_backbones_name_their_weights_in_the_registry():
    from omnilabel.models.registry import REGISTRY

    for name, spec in BACKBONES.items():
        if spec.weights is None:
            assert name == "tiny"
        else:
            assert REGISTRY[spec.weights].kind == "resnet" and spec.weights == name.replace("resnet", "resnet-")


def test_bad_paths_and_mismatched_weights(tmp_path):
    with pytest.raises(CheckpointError, match="expected auto, none"):
        resolve_pretrained(str(tmp_path / "missing"), backbone="tiny")
    model = build_model(hf_config(PRESETS["tiny"], class_names=NAMES)[1])
    state = model.state_dict()
    state.pop("class_predictor.bias")
    state["extra.weight"] = torch.zeros(1)
    state["class_predictor.weight"] = torch.zeros(9, 64)
    with pytest.raises(CheckpointError) as err:
        load_weights(model, state, source="ckpt.pt")
    text = str(err.value)
    assert "class_predictor.bias" in text and "extra.weight" in text and "(9, 64) != (4, 64)" in text
