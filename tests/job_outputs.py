"""Inputs and output checks shared by the tests that run a job several ways (in process, Ray, a cluster)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from omnilabel.data.weak import split_coco


def weak_copy(shapes_coco: Path, root: Path, weak: str) -> Path:
    """Copy the synthetic dataset (coco.json and images/) under ``root/data`` and write ``weak.json``: a
    quarter of its images keep their masks, every other annotation becomes ``weak``. Returns weak.json."""
    shutil.copytree(shapes_coco.parent, root / "data")
    gt = json.loads((root / "data" / "coco.json").read_text())
    path = root / "data" / "weak.json"
    path.write_text(json.dumps(split_coco(gt, fully=0.25, weak=weak, seed=0)))
    return path


def assert_same_annotations(a: list[dict], b: list[dict], *, ignore: tuple[str, ...] = ("score",)) -> None:
    """Equal annotations, masks to the pixel; scores to float rounding (workers may run another number of
    threads); the fields in ``ignore`` apart from the score are not compared."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["segmentation"] == y["segmentation"]
        assert {k: v for k, v in x.items() if k not in ignore} == {k: v for k, v in y.items() if k not in ignore}
        assert x["score"] == pytest.approx(y["score"], abs=1e-5)
