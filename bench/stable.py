"""Stable-SAM on the shipped example: stability under loose prompts and pseudomasks from loose weak labels.

Runs the commands a user would, with the shipped teacher (``examples/teacher/shapes-sam.pt``):

1. ``finetune-teacher weak.json --stable --teacher shapes-sam.pt`` on the example's 6 fully annotated images:
   Stable-SAM's plugins on top of the shipped teacher (everything else frozen); and the same on ``--synth-train``
   new synthetic scenes (``synth --seed 3``) for one epoch, Stable-SAM's own default;
2. ``stability`` of both teachers on held-out scenes (``synth --seed 2``): mIoU / mBIoU / mSF per prompt type
   (GT box, noisy box at noise 0.4, 1 / 3 / 5 random clicks), k random prompts per instance;
3. pseudomask mIoU on the same held-out scenes from loose weak labels: one noisy box per object (noise 0.4,
   IoU with the GT box >= 0.5, ``omnilabel.ops.stability.noisy_boxes``), or one click uniform over the object's
   pixels (off-centre, ``random_points``), each labelled by both teachers (``--detector none``), against the
   held-out GT; exact GT boxes as the reference.

Numbers are measured, not asserted (the test of the example asserts the direction of the noisy-box gain).

    python bench/stable.py                       # about 15 minutes on 2 CPU cores
    python bench/stable.py --steps 60 --k 8 --no-write
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import command_line, machine_line, markdown_table, omnilabel, today, usable_cores, write_section

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ROOT / "examples" / "shapes"
TEACHER = ROOT / "examples" / "teacher" / "shapes-sam.pt"
PROMPTS = ("box", "noisy-box", "1-point", "3-points", "5-points")


def loose_weak(gt_path: Path, out: Path, kind: str, seed: int) -> Path:
    """A weak file of the GT's images with one loose label per object: ``noisy-box``, ``click`` or ``box``."""
    from pycocotools import mask as mask_utils

    from omnilabel.ops.masks import segmentation_to_rle
    from omnilabel.ops.stability import noisy_boxes, random_points

    data = json.loads(gt_path.read_text())
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    anns = []
    for a in data["annotations"]:
        h, w = sizes[a["image_id"]]
        mask = mask_utils.decode(segmentation_to_rle(a["segmentation"], h, w)).astype(bool)
        if not mask.any():
            continue
        rng = np.random.default_rng([seed, a["id"]])
        ys, xs = np.nonzero(mask)
        box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)
        weak = {k: a[k] for k in ("id", "image_id", "category_id")}
        if kind == "click":
            weak["point"] = random_points(mask, rng, 1, 1)[0, 0].tolist()
        else:
            b = box if kind == "box" else noisy_boxes(box, rng, 1, image_hw=(h, w))[0]
            weak["bbox"] = [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]
        anns.append(weak)
    out.write_text(json.dumps({**{k: v for k, v in data.items() if k != "annotations"}, "annotations": anns}))
    return out


def pseudomask_miou(teacher: Path, weak: Path, images: Path, gt: Path, out: Path) -> float:
    omnilabel("pseudomask", weak, "--weak", "auto", "--images", images, "--detector", "none", "--teacher", teacher,
              "-o", out, "--overwrite")
    omnilabel("evaluate", out, "--gt", gt, "--json", out.with_suffix(".eval.json"))
    return float(json.loads(out.with_suffix(".eval.json").read_text())["teacher"]["all"]["miou"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="--stable training steps (batch 8)")
    parser.add_argument("--k", type=int, default=20, help="random prompts per instance and type (paper: 20)")
    parser.add_argument("--heldout", type=int, default=24, help="held-out scenes")
    parser.add_argument("--synth-train", type=int, default=200, help="scenes of the second --stable run")
    parser.add_argument("--work", type=Path, default=None, help="keep the files here (default: a temp folder)")
    parser.add_argument("--no-write", action="store_true", help="print the tables only")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="omnilabel-stable-"))
    work.mkdir(parents=True, exist_ok=True)
    stable = work / "stable.pt"
    t_train = omnilabel("finetune-teacher", SHAPES / "weak.json", "--images", SHAPES / "images", "--teacher",
                        TEACHER, "--stable", "--steps", args.steps, "--batch-size", 8, "--seed", 0, "-o", stable,
                        "--overwrite")
    train = work / "train"
    omnilabel("synth", train, "--n", args.synth_train, "--seed", 3)
    stable_synth = work / "stable_synth.pt"
    t_train_synth = omnilabel("finetune-teacher", train / "coco.json", "--images", train / "images", "--teacher",
                              TEACHER, "--stable", "--batch-size", 8, "--seed", 0, "-o", stable_synth, "--overwrite")
    held = work / "heldout"
    omnilabel("synth", held, "--n", args.heldout, "--seed", 2)
    gt, images = held / "coco.json", held / "images"
    stab = work / "stability.json"
    t_stab = omnilabel("stability", gt, "--images", images, "--no-plain-sam", "--teacher", TEACHER, "--teacher",
                       stable, "--teacher", stable_synth, "--k", args.k, "--prompts", ",".join(PROMPTS), "--json", stab,
                       "--overwrite")
    res = json.loads(stab.read_text())["results"]
    names = {"shapes-sam.pt": "shipped", "stable.pt": f"+ Stable-SAM, example GT ({args.steps} steps)",
             "stable_synth.pt": f"+ Stable-SAM, {args.synth_train} scenes (1 epoch)"}
    files = {"shapes-sam.pt": TEACHER, "stable.pt": stable, "stable_synth.pt": stable_synth}

    def cell(r: dict) -> str:
        return " / ".join("-" if r[m] is None else f"{r[m]:.1f}" for m in ("miou", "mbiou", "msf"))

    t1 = markdown_table([f"prompt (k = {args.k})", *names.values()],
                        [[p, *(cell(res[n][p]) for n in names)] for p in PROMPTS])
    miou: dict[str, dict[str, float]] = {}
    for kind in ("box", "noisy-box", "click"):
        weak = loose_weak(gt, work / f"weak_{kind}.json", kind, seed=0)
        miou[kind] = {n: pseudomask_miou(files[n], weak, images, gt, work / f"pseudo_{kind}_{n}.json")
                      for n in names}
    labels = {"box": "exact GT box (reference)", "noisy-box": "noisy box (0.4, IoU >= 0.5)",
              "click": "one click, uniform over the object"}
    t2 = markdown_table(["weak label, one per object", *names.values()],
                        [[labels[k], *(f"{miou[k][n]:.4f}" for n in names)] for k in labels])
    body = "\n\n".join([
        "## Stable-SAM: stability under loose prompts (`bench/stable.py`)",
        f"{today()} · {machine_line(threads=usable_cores(), device='cpu')} · `{command_line()}`",
        f"The shipped teacher, and Stable-SAM's plugins trained on top of it with `finetune-teacher --stable` on "
        f"the example's 6 fully annotated images ({args.steps} steps of 8 instances, Adam lr 1e-3, the RTS prompt "
        f"mixture; {t_train:.0f} s), and on {args.synth_train} new synthetic scenes for one epoch, Stable-SAM's "
        f"default ({t_train_synth:.0f} s). Held-out: {args.heldout} new scenes (`synth --seed 2`). "
        f"`omnilabel stability`, mIoU / mBIoU / mSF (x 100; {t_stab:.0f} s):",
        t1,
        "Pseudomask mIoU on the held-out scenes from one loose label per object (`pseudomask --detector none`; a "
        "click goes click → SAM's box → box + click as in Algorithm 1 without a detector):",
        t2])
    print(body)
    if not args.no_write:
        print(f"wrote {write_section('stable', body)}", file=sys.stderr)


if __name__ == "__main__":
    main()
