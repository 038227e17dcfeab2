"""Student training speed: images/s and seconds per step at a fixed size, in-process vs Ray Train workers.

Trains the ``tiny`` student (or ``--preset paper``) on synthetic scenes for ``--steps`` steps, once in this
process (``--num-workers 0``: one process, all cores) and once on ``--workers`` Ray Train workers (DDP over
gloo on CPU, NCCL with ``--device cuda``; the global batch is split between them), and reads the step times
the training loop records in ``metrics.jsonl``. The first ``--warmup`` steps are left out of the rates;
checkpoints and validation never count. ``wall`` is the whole call, Ray start-up included.

    python bench/student.py                      # tiny, 128 px, batch 4, 60 steps, 2 Ray workers
    python bench/student.py --steps 200 --workers 2 --no-write
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import command_line, machine_line, markdown_table, today, usable_cores, write_section


def _rates(run_dir: Path, *, warmup: int) -> tuple[float, float]:
    """Mean seconds per step and images per second over the step records after ``warmup`` steps."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("event") == "step" and r["step"] > warmup]
    start = next(r for r in records if r.get("event") == "start")
    if not steps:
        raise SystemExit(f"no step records after step {warmup}: raise --steps")
    seconds, n = 0.0, 0
    previous = max(warmup, start["step"])
    for r in steps:
        k = r["step"] - previous
        seconds += r["s_per_step"] * k
        n += k
        previous = r["step"]
    batch = json.loads((run_dir / "student.json").read_text())["train"]["batch_size"]
    return seconds / n, batch * n / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "paper"])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=64, help="synthetic training images")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()

    import torch

    from omnilabel.data.synthetic import make_dataset
    from omnilabel.jobs.options import Dataset, JobOptions
    from omnilabel.jobs.train_student import StudentInputs, StudentRecipe, run_train_student
    from omnilabel.students.run import make_configs

    rows, timings = [], []
    with tempfile.TemporaryDirectory(prefix="bench-student-") as tmp:
        root = Path(tmp)
        side = args.image_size
        coco = make_dataset(root / "data", n_images=args.images, seed=0, size_hw=(side, side), max_objects=4)
        model, train, pretrained = make_configs(
            args.preset, image_size=args.image_size, max_steps=args.steps, log_every=5,
            checkpoint_every=10**9, pretrained="none")
        for label, workers in (("in-process", 0), (f"Ray Train, {args.workers} workers", args.workers)):
            run_dir = root / f"run{workers}"
            t0 = time.perf_counter()
            run_train_student(StudentInputs(Dataset(coco, root / "data" / "images")), run_dir,
                              JobOptions(num_workers=workers, device=args.device, batch_size=args.batch_size),
                              StudentRecipe(model, train, pretrained))
            wall = time.perf_counter() - t0
            s_per_step, images_per_s = _rates(run_dir, warmup=args.warmup)
            per_worker = args.batch_size // max(workers, 1)
            threads = torch.get_num_threads() if workers == 0 else max(usable_cores() // workers, 1)
            rows.append([label, max(workers, 1), per_worker, threads, f"{s_per_step:.3f}", f"{images_per_s:.1f}",
                         f"{wall:.1f}"])
            timings.append((s_per_step, wall - args.steps * s_per_step))
            print(f"{label}: {s_per_step:.3f} s/step, {images_per_s:.1f} images/s, wall {wall:.1f} s", flush=True)
    table = markdown_table(["run", "workers", "images/worker/step", "threads/worker", "s/step", "images/s",
                            "wall s"], rows)
    print(table)
    if args.no_write:
        return
    body = "\n\n".join([
        "## Student training (`bench/student.py`)",
        f"{today()} — `{command_line()}`",
        f"{machine_line(threads=torch.get_num_threads(), device=args.device)}",
        f"`{args.preset}` student, {args.image_size}-px synthetic scenes, global batch {args.batch_size}, "
        f"{args.steps} steps (rates over steps {args.warmup + 1}-{args.steps}, from `metrics.jsonl`; "
        "`wall` includes start-up: model build, Ray and its workers).",
        table,
        f"Seconds per step, Ray over in-process: ×{timings[1][0] / timings[0][0]:.2f}. Start-up and epoch-end "
        f"work (wall − steps × s/step): {timings[0][1]:.1f} s in-process, {timings[1][1]:.1f} s on Ray.",
    ])
    print(f"wrote {write_section('student', body)}")


if __name__ == "__main__":
    main()
