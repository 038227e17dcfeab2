"""SUM on the shipped example: how well uncertainty maps find wrong pixels, and what SUM training buys.

Runs the commands a user would, on ``examples/shapes`` with the shipped teacher (``examples/teacher``):

1. a refiner: ``finetune-teacher weak.json --prompts refine --teacher shapes-sam.pt`` (the 6 fully annotated
   images), then ``pseudomask --refiner`` (maps in the same pass) and the AUROC of ``u`` for "this pixel of
   the pseudomask is wrong" against ``gt.json`` (``omnilabel.eval.uncertainty``), every pixel of every map;
2. teacher fine-tuning from the shipped teacher on the GT only vs with ``--unlabeled pseudo_u.json`` (SUM),
   same steps, lr and seed; each teacher labels a held-out set (``synth --seed 2``, boxes and points) and its
   pseudomask mIoU against the held-out GT is reported, beside the shipped teacher's;
3. the student (``--preset tiny``) trained on ``pseudo_u.json`` with and without ``--uncertainty``; mask AP on
   held-out scenes (``synth --seed 1``).

Numbers are measured, not asserted: on 6 GT images and a few hundred CPU steps they are noisy.

    python bench/sum.py                                   # about 30 minutes on 2 CPU cores
    python bench/sum.py --teacher-steps 100 --student-steps 300 --no-write
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _common import command_line, machine_line, markdown_table, omnilabel, today, usable_cores, write_section

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ROOT / "examples" / "shapes"
TEACHER = ROOT / "examples" / "teacher" / "shapes-sam.pt"


def teacher_miou(teacher: Path | None, weak: Path, images: Path, gt: Path, out: Path) -> float:
    """Pseudomask mIoU (all weak types) of a teacher on a weak file, against its GT."""
    args = ["pseudomask", weak, "--weak", "auto", "--images", images, "--detector", "none", "-o", out,
            "--overwrite", "--teacher", teacher or TEACHER]
    omnilabel(*args)
    omnilabel("evaluate", out, "--gt", gt, "--json", out.with_suffix(".eval.json"))
    return float(json.loads(out.with_suffix(".eval.json").read_text())["teacher"]["all"]["miou"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--refiner-steps", type=int, default=300)
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--student-steps", type=int, default=1500)
    parser.add_argument("--work", type=Path, default=None, help="keep the files here (default: a temp folder)")
    parser.add_argument("--no-write", action="store_true", help="print the tables only")
    args = parser.parse_args()

    from omnilabel.eval.uncertainty import uncertainty_vs_errors

    work = args.work or Path(tempfile.mkdtemp(prefix="omnilabel-sum-"))
    work.mkdir(parents=True, exist_ok=True)
    weak, gt, images = SHAPES / "weak.json", SHAPES / "gt.json", SHAPES / "images"
    common = ["--images", images, "--batch-size", 8, "--lr", 1e-4, "--seed", 0, "--overwrite"]

    # 1. refiner, maps, AUROC
    refiner = work / "refiner.pt"
    t_ref = omnilabel("finetune-teacher", weak, "--prompts", "refine", "--teacher", TEACHER,
                      "--steps", args.refiner_steps, *common, "-o", refiner)
    pseudo_u = work / "pseudo_u.json"
    t_maps = omnilabel("pseudomask", weak, "--weak", "auto", "--images", images, "--teacher", TEACHER,
                       "--detector", "none", "--refiner", refiner, "-o", pseudo_u, "--overwrite")
    u = uncertainty_vs_errors(pseudo_u, gt)

    # 2. GT-only vs SUM fine-tuning, held-out pseudomask mIoU
    held = work / "heldout-teacher"
    omnilabel("synth", held, "--n", 24, "--seed", 2)
    held_weak = held / "weak.json"
    omnilabel("split", held / "coco.json", "--fully", 0, "--weak", "mixed-images", "--seed", 0, "-o", held_weak)
    gt_only, sum_t = work / "gt_only.pt", work / "sum.pt"
    t_gt = omnilabel("finetune-teacher", weak, "--teacher", TEACHER, "--steps", args.teacher_steps, *common,
                     "-o", gt_only)
    t_sum = omnilabel("finetune-teacher", weak, "--teacher", TEACHER, "--unlabeled", pseudo_u,
                      "--steps", args.teacher_steps, *common, "-o", sum_t)
    miou = {name: teacher_miou(t, held_weak, held / "images", held / "coco.json", work / f"held_{name}.json")
            for name, t in (("shipped", None), ("gt_only", gt_only), ("sum", sum_t))}

    # 3. student with and without --uncertainty
    held_s = work / "heldout-student"
    omnilabel("synth", held_s, "--n", 16, "--seed", 1)
    ap = {}
    for name, flag in (("plain", "--no-uncertainty"), ("uncertainty", "--uncertainty")):
        run = work / f"student_{name}"
        omnilabel("train-student", pseudo_u, "--images", images, "--preset", "tiny", "--max-steps",
                  args.student_steps, "--num-workers", 0, flag, "-o", run, "--overwrite")
        preds = work / f"preds_{name}.json"
        omnilabel("predict", run, "--coco", held_s / "coco.json", "--images", held_s / "images", "-o", preds,
                  "--num-workers", 0, "--overwrite")
        omnilabel("evaluate", preds, "--gt", held_s / "coco.json", "--json", preds.with_suffix(".eval.json"))
        ap[name] = json.loads(preds.with_suffix(".eval.json").read_text())["segm"]

    t1 = markdown_table(
        ["maps", "pixels", "wrong pixels", "mean u (wrong)", "mean u (correct)", "AUROC", "bytes per map",
         "refiner training", "pseudomask --refiner"],
        [[u["maps"], u["pixels"], f"{u['wrong_fraction']:.2%}", f"{u['mean_u_wrong']:.4f}",
          f"{u['mean_u_correct']:.4f}", f"{u['auroc']:.3f}", f"{u['bytes_per_map']:.0f}", f"{t_ref:.0f} s",
          f"{t_maps:.0f} s"]])
    t2 = markdown_table(["teacher", "held-out pseudomask mIoU", "fine-tuning"],
                        [["shipped (no fine-tuning)", f"{miou['shipped']:.4f}", "-"],
                         [f"fine-tuned on GT only ({args.teacher_steps} steps)", f"{miou['gt_only']:.4f}",
                          f"{t_gt:.0f} s"],
                         [f"SUM: GT + --unlabeled ({args.teacher_steps} steps)", f"{miou['sum']:.4f}",
                          f"{t_sum:.0f} s"]])
    t3 = markdown_table(["student", "mask AP", "AP50", "AP75"],
                        [[name, f"{ap[name]['AP']:.4f}", f"{ap[name]['AP50']:.4f}", f"{ap[name]['AP75']:.4f}"]
                         for name in ("plain", "uncertainty")])
    body = "\n\n".join([
        "## SUM: uncertainty maps, SUM fine-tuning, uncertainty-weighted student",
        f"{today()} · {machine_line(threads=usable_cores(), device='cpu')} · `{command_line()}`",
        "On `examples/shapes` with the shipped teacher. Refiner trained on the 6 fully annotated images "
        f"({args.refiner_steps} steps, batch 8, lr 1e-4). A pixel is *wrong* where a pseudomask and the GT mask "
        "of its weak label disagree; every pixel of every map counts.",
        t1,
        "Held-out pseudomask mIoU (24 new scenes, points and boxes, `--detector none`) of teachers fine-tuned "
        "from the shipped one on the example's GT, without and with its pseudomasks as SUM's unlabelled data:",
        t2,
        f"Student (`--preset tiny`, {args.student_steps} steps) on `pseudo_u.json`, mask AP on 16 held-out "
        "scenes:",
        t3])
    print(body)
    if not args.no_write:
        print(f"wrote {write_section('sum', body)}", file=sys.stderr)


if __name__ == "__main__":
    main()
