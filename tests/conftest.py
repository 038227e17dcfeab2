"""Session-wide tiny models and a synthetic dataset, built once (random weights, real architectures)."""

from __future__ import annotations

from pathlib import Path

import pytest

from omnilabel.data.synthetic import make_dataset
from omnilabel.models.tiny import build_tiny_sam, save_sam_checkpoint
from omnilabel.models.tiny_gdino import build_tiny_gdino


@pytest.fixture(scope="session")
def tiny_sam_path(tmp_path_factory) -> Path:
    """A tiny random SAM saved in Meta's official format (a plain state dict)."""
    return save_sam_checkpoint(build_tiny_sam(seed=0), tmp_path_factory.mktemp("sam") / "sam_tiny.pth")


@pytest.fixture(scope="session")
def tiny_gdino_dir(tmp_path_factory) -> Path:
    """A tiny random Grounding DINO with a local tokenizer, saved with save_pretrained."""
    return build_tiny_gdino(tmp_path_factory.mktemp("gdino") / "tiny", seed=0)


@pytest.fixture(scope="session")
def shapes_coco(tmp_path_factory) -> Path:
    """12 synthetic 96-px images with masks; images in ``coco.json``'s folder under ``images/``."""
    return make_dataset(tmp_path_factory.mktemp("shapes"), n_images=12, seed=5, size_hw=(96, 96), max_objects=4)


@pytest.fixture(scope="session")
def tiny_dinov2_dir(tmp_path_factory) -> Path:
    """A tiny random DINOv2 (8-px patches, 64 wide) saved with save_pretrained, as a downloaded one is."""
    from omnilabel.models.tiny_dinov2 import build_tiny_dinov2

    return build_tiny_dinov2(tmp_path_factory.mktemp("dinov2") / "tiny", seed=0)
