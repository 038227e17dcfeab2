"""The student model: ``transformers``' ``Mask2FormerForUniversalSegmentation`` on a ResNet backbone.

A :class:`StudentConfig` names the architecture; :func:`hf_config` turns it (and an optional pretrained
source) into the ``Mask2FormerConfig`` that :func:`build_model` instantiates. The run directory stores that
config as a dict, so ``omnilabel.students.run.load_student`` rebuilds the model without flags or downloads.

Pretrained weights (``--pretrained``):

* ``none``: random initialisation (tests, the ``tiny`` preset);
* ``auto``: ImageNet-1k weights of the backbone in ``transformers`` format: the weight registry's
  ``resnet-50`` … (``microsoft/resnet-50`` …, see ``omnilabel.models.registry``), taken from
  ``$OMNILABEL_CACHE/resnet-50/`` or downloaded there; with no network (or ``OMNILABEL_OFFLINE=1``) the error
  says which files to put where, or to pass ``none`` or a path;
* a path: a local ``transformers`` directory (``config.json`` + weights) of either a ResNet (the backbone
  takes its weights and architecture) or a Mask2Former, e.g. a released COCO checkpoint (every weight is
  taken; the class head is re-initialised when the number of classes differs, and the checkpoint's
  backbone, widths and number of queries replace the preset's).

With pretrained backbone weights, the backbone's BatchNorm layers are frozen (statistics and affine), as
detectron2's ``FrozenBN`` does for Mask2Former's ResNets; from scratch they train.

Evaluation size: the ``paper`` student is evaluated as Mask2Former's COCO test resizes (shorter side 800,
longer side at most 1333, padded bottom/right to a multiple of 32); the ``tiny`` one, like students written
before those fields existed, resizes the longer side to ``image_size`` and pads to a square (see
``omnilabel.students.data.eval_size_hw``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from omnilabel.errors import CheckpointError
from omnilabel.events import OnEvent

if TYPE_CHECKING:
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

#: ResNet stages Mask2Former's pixel decoder reads (strides 4, 8, 16, 32).
STAGES = ["stage1", "stage2", "stage3", "stage4"]
#: The run directory's description of the model (written by training, read by predict).
STUDENT_JSON = "student.json"


@dataclass(frozen=True)
class BackboneSpec:
    """A ResNet in ``transformers``' ``ResNetConfig`` terms, and where its ImageNet weights live.

    Attributes:
        layer_type: ``basic`` (ResNet-18/34) or ``bottleneck`` (ResNet-50 and deeper).
        depths: blocks per stage.
        hidden_sizes: output channels per stage.
        embedding_size: channels of the stem.
        weights: name of the ImageNet-1k weights in ``omnilabel.models.registry`` (kind ``resnet``), or None.
    """

    layer_type: Literal["basic", "bottleneck"]
    depths: tuple[int, ...]
    hidden_sizes: tuple[int, ...]
    embedding_size: int = 64
    weights: str | None = None


_WIDE = (256, 512, 1024, 2048)
BACKBONES: dict[str, BackboneSpec] = {
    # For tests and demos: 4 stages of one basic block each, 16-128 channels (~0.3 M parameters).
    "tiny": BackboneSpec("basic", (1, 1, 1, 1), (16, 32, 64, 128), 16),
    "resnet18": BackboneSpec("basic", (2, 2, 2, 2), (64, 128, 256, 512), weights="resnet-18"),
    "resnet34": BackboneSpec("basic", (3, 4, 6, 3), (64, 128, 256, 512), weights="resnet-34"),
    "resnet50": BackboneSpec("bottleneck", (3, 4, 6, 3), _WIDE, weights="resnet-50"),
    "resnet101": BackboneSpec("bottleneck", (3, 4, 23, 3), _WIDE, weights="resnet-101"),
    "resnet152": BackboneSpec("bottleneck", (3, 8, 36, 3), _WIDE, weights="resnet-152"),
}


@dataclass(frozen=True)
class StudentConfig:
    """The student's architecture and input sizes (defaults: Mask2Former R50, COCO instance, LSJ).

    Attributes:
        backbone: a key of ``BACKBONES`` (``resnet50``: the paper's student).
        num_queries: object queries (Mask2Former COCO instance: 100).
        image_size: side in pixels of the square training crops (Mask2Former LSJ: 1024).
        eval_min_size: evaluation resizes the shorter side to this many pixels (Mask2Former COCO test:
            ``ResizeShortestEdge`` 800), pads bottom/right to a multiple of 32; None: the longer side to
            ``image_size``, padded to a square (the ``tiny`` preset, and students written before this field).
        eval_max_size: at evaluation the longer side is at most this many pixels (Mask2Former COCO test:
            1333); None: no limit. Ignored when ``eval_min_size`` is None.
        hidden_dim: width of the pixel decoder and the transformer decoder (Mask2Former: 256).
        encoder_layers: deformable-attention layers of the pixel decoder (Mask2Former: 6).
        decoder_layers: masked-attention decoder layers, counting the first prediction (HF default: 10,
            i.e. Mask2Former's 9 layers + the prediction from the queries alone).
        num_heads: attention heads (Mask2Former: 8).
        dim_feedforward: FFN width of the transformer decoder (Mask2Former: 2048).
        encoder_feedforward_dim: FFN width of the pixel decoder (Mask2Former: 1024).
        train_num_points: points sampled per mask for the mask loss (Mask2Former: 112 * 112 = 12544).
    """

    backbone: str = "resnet50"
    num_queries: int = 100
    image_size: int = 1024
    eval_min_size: int | None = 800
    eval_max_size: int | None = 1333
    hidden_dim: int = 256
    encoder_layers: int = 6
    decoder_layers: int = 10
    num_heads: int = 8
    dim_feedforward: int = 2048
    encoder_feedforward_dim: int = 1024
    train_num_points: int = 12544


#: ``paper``: the recipe's model. ``tiny``: a ~0.5 M-parameter model of the same architecture for tests, the
#: benchmark and the demo (128-px inputs, evaluated at 128 px padded to a square, 20 queries, 1 encoder + 3
#: decoder layers, 64 wide, 1024 points).
PRESETS: dict[str, StudentConfig] = {
    "paper": StudentConfig(),
    "tiny": StudentConfig(backbone="tiny", num_queries=20, image_size=128, eval_min_size=None, eval_max_size=None,
                          hidden_dim=64, encoder_layers=1, decoder_layers=3, num_heads=4, dim_feedforward=128,
                          encoder_feedforward_dim=128, train_num_points=1024),
}


@dataclass(frozen=True)
class PretrainedSource:
    """Local weights to start from: a ``transformers`` ResNet or Mask2Former directory."""

    kind: Literal["resnet", "mask2former"]
    path: str


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence ``transformers``' warnings (e.g. that Mask2Former was released with Swin, not ResNet)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _weights_file(folder: Path) -> Path | None:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    return None


def imagenet_weights_dir(backbone: str, *, on_event: OnEvent | None = None) -> Path:
    """The local directory of a backbone's ImageNet weights (``$OMNILABEL_CACHE/resnet-50/`` …), downloading
    them into the cache through the weight registry if missing.

    Args:
        backbone: a key of ``BACKBONES``.
        on_event: receives the registry's ``download`` events.

    Raises:
        CheckpointError: the backbone has no ImageNet weights, or they are not cached and cannot be
            downloaded (the registry's message names the files and where to put them; the ``none``/path
            choices follow).
    """
    from omnilabel.models.registry import resolve

    spec = _backbone_spec(backbone)
    if spec.weights is None:
        raise CheckpointError(f"backbone {backbone!r} has no ImageNet weights; pass --pretrained none (random "
                              "initialisation) or --pretrained PATH")
    try:
        return resolve(spec.weights, kind="resnet", on_event=on_event)
    except CheckpointError as exc:
        raise CheckpointError(
            f"ImageNet weights of {backbone}: {exc}\nOr pass --pretrained none (random initialisation) or "
            "--pretrained PATH (a local transformers ResNet or Mask2Former directory).") from exc


def resolve_pretrained(pretrained: str, *, backbone: str, on_event: OnEvent | None = None
                       ) -> PretrainedSource | None:
    """Turn ``--pretrained`` (``auto``, ``none`` or a path) into local weights, or None for random init.

    Args:
        pretrained: ``auto``, ``none`` or a path.
        backbone: a key of ``BACKBONES`` (whose ImageNet weights ``auto`` means).
        on_event: receives ``download`` events when ``auto`` downloads the weights.

    Raises:
        CheckpointError: see :func:`imagenet_weights_dir`; a path that is not a ``transformers`` ResNet or
            Mask2Former directory.
    """
    if pretrained == "none":
        return None
    if pretrained == "auto":
        return PretrainedSource("resnet", str(imagenet_weights_dir(backbone, on_event=on_event)))
    path = Path(pretrained).expanduser()
    config_path = path / "config.json"
    if not path.is_dir() or not config_path.is_file():
        raise CheckpointError(f"--pretrained {pretrained}: expected auto, none, or a transformers model "
                              "directory (config.json + model.safetensors) of a ResNet or a Mask2Former")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise CheckpointError(f"{config_path}: unreadable config ({exc})") from exc
    if model_type not in ("resnet", "mask2former"):
        raise CheckpointError(f"{path}: a {model_type!r} model; --pretrained takes a ResNet or a Mask2Former")
    if _weights_file(path) is None:
        raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin")
    return PretrainedSource(model_type, str(path.resolve()))


def _backbone_spec(backbone: str) -> BackboneSpec:
    try:
        return BACKBONES[backbone]
    except KeyError:
        raise CheckpointError(f"unknown backbone {backbone!r}; choose one of: {', '.join(BACKBONES)}") from None


def hf_config(cfg: StudentConfig, *, class_names: list[str],
              source: PretrainedSource | None = None) -> tuple[StudentConfig, Mask2FormerConfig]:
    """The ``Mask2FormerConfig`` of a student, and the student config it really has.

    A Mask2Former checkpoint brings its own architecture: the returned ``StudentConfig`` then carries the
    checkpoint's backbone type, width, layers and queries (``image_size`` and the evaluation sizes are kept).

    Args:
        cfg: the requested architecture.
        class_names: the K dataset classes, in contiguous label order 0..K-1.
        source: pretrained weights whose config defines the backbone (ResNet) or everything (Mask2Former).
    """
    from transformers import Mask2FormerConfig, ResNetConfig

    labels = {"id2label": dict(enumerate(class_names)), "label2id": {n: i for i, n in enumerate(class_names)}}
    with quiet_transformers():
        if source is not None and source.kind == "mask2former":
            m2f = Mask2FormerConfig.from_pretrained(source.path, **labels)
            actual = dataclasses.replace(
                cfg, backbone=str(m2f.backbone_config.model_type), num_queries=m2f.num_queries,
                hidden_dim=m2f.hidden_dim, encoder_layers=m2f.encoder_layers, decoder_layers=m2f.decoder_layers,
                num_heads=m2f.num_attention_heads, dim_feedforward=m2f.dim_feedforward,
                encoder_feedforward_dim=m2f.encoder_feedforward_dim, train_num_points=m2f.train_num_points)
            return actual, m2f
        if source is not None:
            backbone = ResNetConfig.from_pretrained(source.path, out_features=STAGES)
        else:
            spec = _backbone_spec(cfg.backbone)
            backbone = ResNetConfig(embedding_size=spec.embedding_size, hidden_sizes=list(spec.hidden_sizes),
                                    depths=list(spec.depths), layer_type=spec.layer_type, out_features=STAGES)
        m2f = Mask2FormerConfig(
            backbone_config=backbone, num_queries=cfg.num_queries, hidden_dim=cfg.hidden_dim,
            feature_size=cfg.hidden_dim, mask_feature_size=cfg.hidden_dim, encoder_layers=cfg.encoder_layers,
            decoder_layers=cfg.decoder_layers, num_attention_heads=cfg.num_heads,
            dim_feedforward=cfg.dim_feedforward, encoder_feedforward_dim=cfg.encoder_feedforward_dim,
            train_num_points=cfg.train_num_points, **labels)
    return cfg, m2f


def build_model(config: Mask2FormerConfig | dict[str, Any], *,
                source: PretrainedSource | None = None) -> Mask2FormerForUniversalSegmentation:
    """Instantiate the student (float32, training mode) with the weighted loss as its criterion.

    Args:
        config: a ``Mask2FormerConfig`` or its ``to_dict()``.
        source: weights to load: a ResNet into the backbone, or a whole Mask2Former (class head excepted
            when its size differs).

    Raises:
        CheckpointError: weights missing, unreadable, or not matching the architecture (names the keys).
    """
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

    from omnilabel.students.loss import WeightedMask2FormerLoss

    with quiet_transformers():
        if isinstance(config, dict):
            config = Mask2FormerConfig.from_dict(config)
        model = Mask2FormerForUniversalSegmentation(config)
    if source is not None and source.kind == "mask2former":
        state = _read_state_dict(Path(source.path))
        head = {k for k in state if k.startswith("class_predictor.") or k == "criterion.empty_weight"}
        own = model.state_dict()
        if any(state[k].shape != own[k].shape for k in head if k in own):
            state = {k: v for k, v in state.items() if k not in head}
        load_weights(model, state, source=source.path, optional=head)
    elif source is not None:
        state = {k.removeprefix("resnet."): v for k, v in _read_state_dict(Path(source.path)).items()
                 if not k.startswith("classifier.")}
        load_weights(model.model.pixel_level_module.encoder, state, source=source.path)
    model.criterion = WeightedMask2FormerLoss(config, weight_dict=model.weight_dict)
    return model.float()


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    path = _weights_file(folder)
    if path is None:
        raise CheckpointError(f"{folder}: no model.safetensors or pytorch_model.bin")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt file, whatever the library raises
        raise CheckpointError(f"{path}: cannot read weights ({exc})") from exc


def load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str,
                 optional: set[str] | frozenset[str] = frozenset()) -> None:
    """Load a state dict strictly; keys in ``optional`` may be missing.

    Raises:
        CheckpointError: missing or unexpected keys, or shape mismatches (the message names them).
    """
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state and k not in optional)
    unexpected = sorted(k for k in state if k not in own)
    wrong = sorted(f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in state
                   if k in own and state[k].shape != own[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:8])}{' …' if len(keys) > 8 else ''}"
                 for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("shape mismatches", wrong)) if keys]
        raise CheckpointError(f"{source}: weights do not match the model; " + "; ".join(parts))
    module.load_state_dict(state, strict=False)


def backbone_of(model: torch.nn.Module) -> torch.nn.Module:
    """The backbone (``ResNetBackbone``) of a student, DDP-wrapped or not."""
    model = getattr(model, "module", model)
    return model.model.pixel_level_module.encoder


def set_train_mode(model: torch.nn.Module, *, freeze_backbone_bn: bool) -> None:
    """``model.train()``, keeping the backbone's BatchNorm frozen when asked (pretrained backbones)."""
    model.train()
    if freeze_backbone_bn:
        for module in backbone_of(model).modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eval()
                for p in module.parameters():
                    p.requires_grad_(False)
