"""Throughput of `omnilabel pseudomask` on one GPU: images per second by stage, encoder batch and read-ahead.

What it measures, for random-weight SAM ``vit_b`` and ``vit_h`` (built offline, as ``omnilabel weights
init-sam`` builds them; the encoder's cost does not depend on the weights), weak boxes on synthetic scenes:

- ``PseudomaskWorker`` — what ``run_pseudomask`` runs on each shard, shards of the job's default size —
  with ``--encoder-batch`` 1 and 8 and ``--prefetch`` 2 (on) and 0 (off). Each configuration labels shards
  after one untimed warm-up shard until ``--seconds`` have passed; img/s end to end is images over wall
  time, and per stage (read, encode, decode, encode_rle) images over the seconds the worker's records give
  that stage (reads run on the read-ahead thread when prefetch is on, so they overlap the rest).
- whether batching changes the output: the annotations of the images both encoder batches labelled.
- the image encoder alone, one batch of 8, with ``segment_anything``'s attention and with the
  ``scaled_dot_product_attention`` path ``SamTeacher`` uses on CUDA (and how far their outputs differ).

Synthetic scenes are few distinct images repeated under new ids (hard links), so that building the
dataset takes seconds; nothing is cached between images, so repeats cost what new images cost.

Usage::

    bash bench/gpu.sh                          # on a machine with a GPU: prints and writes BENCHMARKS.md
    python bench/gpu.py --quick                # anywhere: tiny SAM, few images, prints only
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import command_line, markdown_table, peak_rss_mib, today, usable_cores, write_section

from omnilabel.data.coco import category_names, load_coco, write_coco
from omnilabel.data.images import read_image_rgb
from omnilabel.data.synthetic import make_dataset
from omnilabel.data.weak import plan_weak, split_coco
from omnilabel.jobs.pseudomask import DEFAULT_SHARD_SIZE, PseudomaskWorker, Throughput, plan_tasks, shards_of
from omnilabel.models.precision import autocast_dtype
from omnilabel.teachers.loading import TeacherSpec
from omnilabel.teachers.pipeline import PipelineConfig

SECTION = "gpu"
STAGES = ("read", "encode", "decode", "encode_rle")
#: Images in the encoder-only comparison of the two attention paths.
ATTENTION_BATCH = 8


@dataclass
class Run:
    """One configuration's timed shards."""

    model: str
    throughput: Throughput
    images: int = 0
    wall_s: float = 0.0
    stages: Counter = field(default_factory=Counter)
    passes: int = 0
    errors: int = 0
    peak_mib: float = 0.0
    annotations: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    def rate(self, seconds: float) -> str:
        return f"{self.images / seconds:.1f}" if seconds > 0 else "—"


def describe_machine(device: str) -> list[str]:
    """GPU name, torch and CUDA versions, bf16, cores: printed first and written in the section."""
    lines = [f"torch {torch.__version__}", f"{usable_cores()} usable CPU cores"]
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        lines.insert(0, f"GPU {props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)")
        lines.append(f"CUDA {torch.version.cuda}")
        lines.append(f"bf16: {'yes' if torch.cuda.is_bf16_supported() else 'no (fp16 autocast)'}")
    else:
        lines.insert(0, "no GPU: device cpu")
        lines.append("bf16: no (float32 on the CPU)")
    dtype = autocast_dtype(device)
    lines.append(f"SAM autocast dtype: {dtype if dtype is not None else 'none (float32)'}")
    return lines


def build_dataset(work: Path, args: argparse.Namespace) -> Path:
    """``args.unique`` synthetic scenes, made in parallel, reduced to weak boxes and repeated to ``args.images``.

    Returns:
        The weak COCO file; its images are under ``work / "images"``.
    """
    per = 2
    parts = [(work / f"unique{k}", min(per, args.unique - k * per), args.seed + k)
             for k in range(-(-args.unique // per))]
    ctx = multiprocessing.get_context("spawn")  # before CUDA is touched, but spawn is safe either way
    workers = max(1, min(len(parts), usable_cores()))
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        coco_paths = list(pool.map(_make_part, [(d, n, s, args.scene_px, args.max_objects) for d, n, s in parts]))
    unique: dict[str, Any] = {"images": [], "annotations": [], "categories": None}
    for path in coco_paths:
        part = load_coco(path)
        unique["categories"] = part["categories"]
        offset = len(unique["images"])
        ann_offset = len(unique["annotations"])
        for im in part["images"]:
            unique["images"].append({**im, "id": im["id"] + offset,
                                     "file_name": str(path.parent / "images" / im["file_name"])})
        for a in part["annotations"]:
            unique["annotations"].append({**a, "id": a["id"] + ann_offset, "image_id": a["image_id"] + offset})
    weak = split_coco(unique, fully=0.0, weak="boxes", seed=args.seed)
    by_image: dict[int, list[dict[str, Any]]] = {}
    for a in weak["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    images_dir = work / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"images": [], "annotations": [], "categories": weak["categories"]}
    for i in range(args.images):
        src = weak["images"][i % len(weak["images"])]
        name = f"{i:06d}.png"
        _link(Path(src["file_name"]), images_dir / name)
        out["images"].append({**src, "id": i + 1, "file_name": name})
        for a in by_image.get(src["id"], []):
            out["annotations"].append({**a, "id": len(out["annotations"]) + 1, "image_id": i + 1})
    path = work / "weak_boxes.json"
    write_coco(out, path)
    return path


def _make_part(job: tuple[Path, int, int, int, int]) -> Path:
    out_dir, n, seed, px, max_objects = job
    return make_dataset(out_dir, n_images=n, seed=seed, size_hw=(px, px), max_objects=max_objects)


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def make_checkpoint(model: str, work: Path, seed: int) -> Path:
    """A random-weight SAM checkpoint in the official format: ``tiny`` (the tests') or an official size."""
    from omnilabel.models.sam_loader import OFFICIAL_SAM_ARCHS, init_sam_checkpoint
    from omnilabel.models.tiny import build_tiny_sam, save_sam_checkpoint

    path = work / f"sam_{model}_random.pth"
    if model == "tiny":
        return save_sam_checkpoint(build_tiny_sam(seed=seed), path)
    return init_sam_checkpoint(OFFICIAL_SAM_ARCHS[model], path, seed=seed)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_configuration(worker: PseudomaskWorker, shards: list[list[Any]], run: Run, *, seconds: float,
                       device: str) -> Run:
    """One untimed warm-up shard, then whole shards until ``seconds`` have passed (or the shards run out)."""
    worker.throughput = run.throughput
    worker(shards[0])
    sam = worker.pipeline.teachers.sam
    passes = sam.encoder_calls
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    t0 = time.perf_counter()
    for shard in shards[1:]:
        for rec in worker(shard):
            if "error" in rec:
                run.errors += 1
                continue
            run.images += 1
            run.stages.update(rec["seconds"])
            run.annotations[rec["image_id"]] = rec["annotations"]
        if time.perf_counter() - t0 >= seconds:
            break
    _sync(device)
    run.wall_s = time.perf_counter() - t0
    run.passes = sam.encoder_calls - passes
    run.peak_mib = (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else peak_rss_mib())
    return run


def compare_attention(worker: PseudomaskWorker, image_paths: list[str], *, device: str, reps: int) -> dict[str, Any]:
    """The image encoder alone on one batch: segment_anything's attention vs scaled_dot_product_attention."""
    from omnilabel.models.sam_attention import use_eager, use_sdpa

    teacher = worker.pipeline.teachers.sam
    encoder = teacher.sam.image_encoder
    images = [read_image_rgb(p) for p in image_paths]
    seconds, features = {}, {}
    for name, convert in (("eager", use_eager), ("sdpa", use_sdpa)):
        convert(encoder)
        teacher.encode_many(images)  # warm-up: kernel selection, allocator
        t0 = time.perf_counter()
        for _ in range(reps):
            embs = teacher.encode_many(images)
        seconds[name] = (time.perf_counter() - t0) / (reps * len(images))
        features[name] = torch.cat([e.features for e in embs]).float()
        del embs
    # leave the model as SamTeacher set it up: fused attention on CUDA only
    (use_sdpa if device.startswith("cuda") else use_eager)(encoder)
    ref = features["eager"]
    rel = float((features["sdpa"] - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    return {"eager_ms": 1e3 * seconds["eager"], "sdpa_ms": 1e3 * seconds["sdpa"], "max_rel_diff": rel}


def agreement(a: Run, b: Run) -> tuple[int, int, float]:
    """Images labelled by both runs, how many got identical annotations, and the mean mask IoU of the rest."""
    from omnilabel.ops.masks import mask_iou, rle_to_masks

    common = sorted(set(a.annotations) & set(b.annotations))
    same, ious = 0, []
    for image_id in common:
        x, y = a.annotations[image_id], b.annotations[image_id]
        if x == y:
            same += 1
            continue
        for p, q in zip(x, y, strict=False):
            h, w = p["segmentation"]["size"]
            mp, mq = rle_to_masks([p["segmentation"]], h, w), rle_to_masks([q["segmentation"]], h, w)
            ious.append(float(mask_iou(mp, mq)[0]))
    return len(common), same, float(np.mean(ious)) if ious else 1.0


def report(runs: list[Run], attention: dict[str, dict[str, Any]], agree: dict[str, tuple[int, int, float]],
           machine: list[str], notes: list[str], args: argparse.Namespace) -> str:
    rows = []
    for r in runs:
        rows.append([r.model, r.throughput.encoder_batch, "on" if r.throughput.prefetch else "off", r.images,
                     f"{r.wall_s:.1f}", r.rate(r.wall_s), *(r.rate(r.stages[s]) for s in STAGES),
                     f"{r.images / max(r.passes, 1):.1f}", f"{r.peak_mib:.0f}", r.errors])
    table = markdown_table(["SAM", "encoder batch", "prefetch", "images", "wall s", "end-to-end img/s",
                            *(f"{s} img/s" for s in STAGES), "images/encoder pass",
                            "peak GPU MiB" if args.device.startswith("cuda") else "peak RSS MiB", "errors"], rows)
    att_rows = [[m, f"{v['eager_ms']:.1f}", f"{v['sdpa_ms']:.1f}", f"×{v['eager_ms'] / v['sdpa_ms']:.2f}",
                 f"{v['max_rel_diff']:.1e}"] for m, v in attention.items()]
    att = markdown_table(["SAM", "eager ms/img", "sdpa ms/img", "speedup", "max abs diff / max abs"], att_rows)
    agree_txt = "; ".join(f"{m}: {same}/{n} images identical" + (f" (mean mask IoU of the others {iou:.4f})"
                                                                  if same < n else "")
                          for m, (n, same, iou) in agree.items())
    extra = "".join(f"- {n}\n" for n in notes)
    return f"""## GPU throughput of `pseudomask` (`bench/gpu.py`)

Run {today()}: {", ".join(machine)}.

Command: `{command_line()}`

Setup: {args.unique} distinct synthetic {args.scene_px}×{args.scene_px} scenes (up to {args.max_objects} \
objects), every annotation a weak box (`split_coco`, fully = 0), repeated to a pool of {args.images} images; \
random-weight SAM as `omnilabel weights init-sam` builds it, no detector. Measured through \
`PseudomaskWorker` (what `run_pseudomask` runs per shard; {DEFAULT_SHARD_SIZE} images per shard), one \
untimed warm-up shard per configuration, then whole shards for about {args.seconds:.0f} s.

{table}

- end-to-end img/s = images / wall time. A stage's img/s = images / the seconds the worker's records give
  that stage: the rate if that stage ran alone. With prefetch on, reads run on the read-ahead thread and
  overlap the models, so end to end can beat the read column's bound of the runs without it.
- encode includes waiting for the GPU (the encoder synchronises); decode includes SAM's prompt encoder,
  mask decoder, mask upsampling and the copy of the masks to the host; encode_rle the COCO records.
- Random weights: the encoder costs what a trained one costs; masks (and so decode/RLE work) differ from a
  trained SAM's.
- Output against encoder batch 1 (prefetch on): {agree_txt}.

The image encoder alone, one batch of {ATTENTION_BATCH} images (mean of a few passes after a warm-up):
`segment_anything`'s attention vs `scaled_dot_product_attention` with the relative-position bias as
`attn_mask` (`omnilabel.models.sam_attention`, what `SamTeacher` uses on CUDA):

{att}

{extra}"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny SAM, few small images: a check that runs anywhere")
    p.add_argument("--write", action="store_true", help="update BENCHMARKS.md (GPU runs only)")
    p.add_argument("--device", default=None, help="torch device [default: cuda if available, else cpu]")
    p.add_argument("--models", default=None, help="comma-separated: vit_b, vit_l, vit_h, tiny [vit_b,vit_h]")
    p.add_argument("--encoder-batches", default="1,8", help="comma-separated --encoder-batch values")
    p.add_argument("--prefetch", type=int, default=2, help="the --prefetch of the 'on' runs")
    p.add_argument("--images", type=int, default=None, help="pool of images [1600; quick: 40]")
    p.add_argument("--unique", type=int, default=None, help="distinct synthetic scenes [32; quick: 6]")
    p.add_argument("--scene-px", type=int, default=None, help="side of the square scenes [1024; quick: 256]")
    p.add_argument("--max-objects", type=int, default=8)
    p.add_argument("--seconds", type=float, default=None, help="timed seconds per configuration [15; quick: 2]")
    p.add_argument("--budget-s", type=float, default=540.0, help="skip configurations that would end later")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", type=Path, help="keep inputs here (default: a temporary folder)")
    args = p.parse_args(argv)
    quick = args.quick
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.models = [m.strip() for m in (args.models or ("tiny" if quick else "vit_b,vit_h")).split(",") if m.strip()]
    args.images = args.images or (40 if quick else 1600)
    args.unique = args.unique or (6 if quick else 32)
    args.scene_px = args.scene_px or (256 if quick else 1024)
    args.seconds = args.seconds if args.seconds is not None else (2.0 if quick else 15.0)
    try:
        args.encoder_batches = [int(b) for b in args.encoder_batches.split(",")]
    except ValueError:
        p.error(f"--encoder-batches: comma-separated integers, got {args.encoder_batches!r}")
    bad = [m for m in args.models if m not in ("vit_b", "vit_l", "vit_h", "tiny")]
    if bad:
        p.error(f"--models: choose from vit_b, vit_l, vit_h, tiny; got {bad}")
    if args.images < 2 * DEFAULT_SHARD_SIZE or args.unique < 1:
        p.error(f"--images must be >= {2 * DEFAULT_SHARD_SIZE} (a warm-up shard and a timed one), --unique >= 1")
    if args.write and (quick or not args.device.startswith("cuda") or not torch.cuda.is_available()):
        p.error("--write records GPU numbers in BENCHMARKS.md: it needs a CUDA device (--device cuda) and no "
                "--quick; this run would only print (drop --write, or run `bash bench/gpu.sh` on a GPU machine)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if not args.device.startswith("cuda"):
        torch.set_num_threads(min(2, usable_cores()) if args.quick else usable_cores())
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="omnilabel-gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        weak = build_dataset(work, args)
        print(f"dataset: {args.images} images ({args.unique} distinct, {args.scene_px} px) in "
              f"{time.perf_counter() - t:.1f} s", flush=True)
        machine = describe_machine(args.device)
        print("\n".join(machine), flush=True)
        data = load_coco(weak, images_dir=work / "images")
        tasks = plan_tasks(data, work / "images", plan_weak(data, "boxes", has_detector=False).images,
                           allow_outside_images=False)
        shards = shards_of(tasks, DEFAULT_SHARD_SIZE)
        runs: list[Run] = []
        attention: dict[str, dict[str, Any]] = {}
        agree: dict[str, tuple[int, int, float]] = {}
        notes: list[str] = []
        configs = [Throughput(encoder_batch=b, prefetch=d) for b in args.encoder_batches for d in (args.prefetch, 0)]
        for model in args.models:
            t = time.perf_counter()
            ckpt = make_checkpoint(model, work, args.seed)
            spec = TeacherSpec(sam=str(ckpt), detector="none", device=args.device)
            worker = PseudomaskWorker(spec, {"sam": ckpt}, category_names(data), PipelineConfig(weak="boxes"))
            print(f"{model}: checkpoint and worker in {time.perf_counter() - t:.1f} s", flush=True)
            attention[model] = compare_attention(worker, [task.path for task in tasks[:ATTENTION_BATCH]],
                                                 device=args.device, reps=2 if args.quick else 3)
            print(f"{model}: encoder alone {attention[model]}", flush=True)
            model_runs = []
            for throughput in configs:
                left = args.budget_s - (time.perf_counter() - t_start)
                if left < args.seconds * 2:
                    notes.append(f"{model} encoder batch {throughput.encoder_batch} prefetch "
                                 f"{throughput.prefetch}: skipped, {left:.0f} s of --budget-s left")
                    print(notes[-1], flush=True)
                    continue
                run = time_configuration(worker, shards, Run(model, throughput), seconds=args.seconds,
                                         device=args.device)
                model_runs.append(run)
                print(f"{model} encoder batch {throughput.encoder_batch} prefetch {throughput.prefetch}: "
                      f"{run.images} images in {run.wall_s:.1f} s = {run.images / run.wall_s:.1f} img/s "
                      f"({run.passes} encoder passes)", flush=True)
            runs += model_runs
            base = next((r for r in model_runs if r.throughput == configs[0]), None)
            other = next((r for r in model_runs if r.throughput.encoder_batch != configs[0].encoder_batch
                          and r.throughput.prefetch == configs[0].prefetch), None)
            if base is not None and other is not None:
                agree[f"{model} batch {other.throughput.encoder_batch}"] = agreement(base, other)
            del worker
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            ckpt.unlink(missing_ok=True)
        notes.append(f"total run time of the script {time.perf_counter() - t_start:.0f} s")
        section = report(runs, attention, agree, machine, notes, args)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(section)
    if args.write:
        print(f"wrote {write_section(SECTION, section)}")


if __name__ == "__main__":
    sys.exit(main())
