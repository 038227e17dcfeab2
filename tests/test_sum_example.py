"""SUM on the shipped example: a refiner of the shipped teacher finds the wrong pixels of its pseudomasks; and the
measure itself (``omnilabel.eval.uncertainty``) on cases worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_runner import run_in_process as run
from pycocotools import mask as mask_utils

from omnilabel.data.maps import UINT16_MAX, UncertaintyMap
from omnilabel.eval.uncertainty import auroc_from_histograms, uncertainty_vs_errors

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TEACHER = EXAMPLES / "teacher" / "shapes-sam.pt"
SHAPES = EXAMPLES / "shapes"
#: Refiner steps. Measured on the example's 131 pseudomasks (mean u on wrong / correct pixels, AUROC):
#: 1 step (the teacher's decoder, barely trained) 0.195 / 0.043, 0.874; 10 steps 0.197 / 0.018, 0.944;
#: 20 steps 0.184 / 0.013, 0.954; 300 steps 0.145 / 0.0066, 0.963. So the bars below need a refiner that learnt.
STEPS = 10
MIN_AUROC, MAX_U_CORRECT = 0.90, 0.03


def test_a_refiner_of_the_shipped_teacher_finds_the_wrong_pixels_of_its_pseudomasks(capsys, tmp_path):
    refiner = tmp_path / "refiner.pt"
    code, _, err = run(capsys, "finetune-teacher", SHAPES / "weak.json", "--images", SHAPES / "images", "--prompts",
                       "refine", "--teacher", TEACHER, "--steps", STEPS, "--batch-size", 8, "--lr", 1e-4, "-o", refiner)
    assert code == 0, err
    pseudo = tmp_path / "pseudo.json"
    code, _, err = run(capsys, "pseudomask", SHAPES / "weak.json", "--images", SHAPES / "images", "--weak", "auto",
                       "--teacher", TEACHER, "--detector", "none", "--refiner", refiner, "-o", pseudo)
    assert code == 0, err
    n_pseudo = sum(a["omnilabel"]["source"] == "pseudo" for a in json.loads(pseudo.read_text())["annotations"])
    got = uncertainty_vs_errors(pseudo, SHAPES / "gt.json")
    assert got["maps"] == n_pseudo > 100
    assert 0.0 < got["wrong_fraction"] < 0.1  # a good teacher: few wrong pixels, but some
    assert got["mean_u_wrong"] > 5 * got["mean_u_correct"], got
    assert got["mean_u_correct"] < MAX_U_CORRECT, got
    assert got["auroc"] > MIN_AUROC, got


# -- the measure ----------------------------------------------------------------------------------------


def test_auroc_from_histograms_counts_ties_as_one_half():
    # scores 0, 1, 2: positives 1, 1, 2 and negatives 2, 1, 0. Over the 4 x 3 pairs a positive wins against
    # every negative of a lower bin and half of those of its own: bin 0: 0 + 2/2 = 1; bin 1: 2 + 1/2 = 2.5;
    # bin 2 (two of them): 3 each = 6. AUROC = 9.5 / 12.
    assert auroc_from_histograms([1, 1, 2], [2, 1, 0]) == pytest.approx(9.5 / 12)
    assert auroc_from_histograms([0, 0, 3], [4, 0, 0]) == 1.0
    assert auroc_from_histograms([4, 0, 0], [0, 0, 3]) == 0.0
    assert auroc_from_histograms([0, 5, 0], [0, 2, 0]) == 0.5  # all tied


def test_auroc_from_histograms_is_the_mann_whitney_statistic():
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 6, size=40), rng.integers(0, 6, size=30)
    pairs = (pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()
    got = auroc_from_histograms(np.bincount(pos, minlength=6), np.bincount(neg, minlength=6))
    assert got == pytest.approx(pairs / (40 * 30), abs=1e-12)


@pytest.mark.parametrize(("pos", "neg", "message"), [
    ([1, 2], [1, 2, 3], "one length"),
    ([0, 0], [1, 2], "both classes"),
    ([1, 2], [0, 0], "both classes"),
])
def test_auroc_from_histograms_refuses_what_has_no_auroc(pos, neg, message):
    with pytest.raises(ValueError, match=message):
        auroc_from_histograms(pos, neg)


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def test_uncertainty_vs_errors_on_a_mask_worked_out_by_hand(tmp_path):
    gt_mask = np.zeros((4, 4), dtype=bool)
    gt_mask[:2] = True
    pm = gt_mask.copy()
    pm[0, 0], pm[2, 0] = False, True  # two wrong pixels of 16
    u = np.zeros((4, 4), dtype=np.float32)
    u[0, 0], u[2, 0] = 0.5, 1.0  # on the wrong ones
    u[3, 3] = 0.5  # and on one correct pixel, tying the lower of them
    UncertaintyMap(u).save(tmp_path / "maps" / "1.png")
    image = {"id": 1, "file_name": "a.png", "height": 4, "width": 4}
    cats = [{"id": 1, "name": "square"}]

    def ann(ann_id: int, mask: np.ndarray, meta: dict) -> dict:
        return {"id": ann_id, "image_id": 1, "category_id": 1, "segmentation": _rle(mask), "area": int(mask.sum()),
                "bbox": [0, 0, 4, 4], "iscrowd": 0, "omnilabel": meta}

    (tmp_path / "gt.json").write_text(json.dumps({"images": [image], "categories": cats,
                                                  "annotations": [ann(5, gt_mask, {})]}))
    (tmp_path / "pseudo.json").write_text(json.dumps({"images": [image], "categories": cats, "annotations": [
        ann(1, pm, {"source": "pseudo", "weak_id": 5, "uncertainty": "maps/1.png"}),
        ann(2, gt_mask, {"source": "gt", "weak_id": 5})]}))  # no map: not counted
    got = uncertainty_vs_errors(tmp_path / "pseudo.json", tmp_path / "gt.json")
    half = round(0.5 * UINT16_MAX) / UINT16_MAX  # as stored
    assert got["maps"] == 1 and got["pixels"] == 16 and got["wrong_fraction"] == pytest.approx(2 / 16)
    assert got["mean_u_wrong"] == pytest.approx((half + 1.0) / 2, abs=1e-6)
    assert got["mean_u_correct"] == pytest.approx(half / 14, abs=1e-6)
    # positives 0.5 and 1.0 against 13 zeros and one 0.5: (13 + 1/2) + 14 of 2 x 14 pairs
    assert got["auroc"] == pytest.approx(27.5 / 28)
