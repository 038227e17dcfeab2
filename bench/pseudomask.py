"""Benchmark the pseudomask teacher against the naive per-instance loop of the popular demo scripts.

What it measures, per weak setting (``points``, ``boxes``), on the same models and the same images:

- omnilabel: ``omnilabel.jobs.pseudomask.PseudomaskWorker`` (what ``run_pseudomask`` runs on each shard),
  timed on each image task from ``plan_tasks``. Model loading is timed apart and excluded from s/image.
- naive: ``segment_anything.SamPredictor`` as the demos use it. Points: ``set_image``, one ``predict``
  per instance (multimask, best score), GDino once per class present, Algorithm 1
  (``omnilabel.ops.refine.refine_prompts``), ``set_image`` again, one ``predict`` per instance with the
  merged box and the point. Boxes: ``set_image`` once, one ``predict`` per box. Masks are written as COCO
  RLE like omnilabel's, so both do the same work end to end.

Methods alternate image by image, so background load on the machine hits both alike. Forward hooks on the
SAM image encoder, the SAM mask decoder and GDino count the passes each method really makes.

Usage::

    python bench/pseudomask.py --sam-size tiny                 # quick check
    python bench/pseudomask.py --images 3 --sam-size vit_b --write
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import command_line, machine_line, markdown_table, peak_rss_mib, today, write_section

from omnilabel.data.coco import category_names, load_coco, write_coco
from omnilabel.data.images import read_image_rgb
from omnilabel.data.synthetic import make_dataset
from omnilabel.data.weak import plan_weak, split_coco
from omnilabel.instances import Instances
from omnilabel.jobs.pseudomask import ImageTask, PseudomaskWorker, plan_tasks
from omnilabel.ops.boxes import masks_to_boxes_xyxy
from omnilabel.ops.masks import mask_iou, rle_to_masks
from omnilabel.ops.refine import refine_prompts
from omnilabel.teachers.loading import TeacherSpec, resolve_paths
from omnilabel.teachers.pipeline import PipelineConfig

SECTION = "pseudomask"
SETTINGS = ("points", "boxes")
STAGES = ("read", "detect", "encode", "decode", "refine", "encode_rle")
FORWARD_STAGES = ("detect", "encode", "decode")


class ForwardHooks:
    """Counts and times the forward passes of named modules (pre- and post-forward hooks).

    Args:
        modules: label → module.
        device: on CUDA, each hook synchronises so that the time covers the kernels.
    """

    def __init__(self, modules: dict[str, torch.nn.Module], *, device: str) -> None:
        self.calls: Counter = Counter()
        self.seconds: Counter = Counter()
        self.encoder_pass_s: list[float] = []
        self._sync = device.startswith("cuda")
        self._start: dict[str, float] = {}
        self._handles = []
        for label, module in modules.items():
            self._handles.append(module.register_forward_pre_hook(self._pre(label)))
            self._handles.append(module.register_forward_hook(self._post(label)))

    def _now(self) -> float:
        if self._sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _pre(self, label: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            self._start[label] = self._now()
        return hook

    def _post(self, label: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            self.calls[label] += 1
            dt = self._now() - self._start.pop(label)
            self.seconds[label] += dt
            if label == "encoder":
                self.encoder_pass_s.append(dt)
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@dataclass
class Tally:
    """Totals of one method in one setting, over the timed images."""

    images: int = 0
    instances: int = 0
    wall_s: float = 0.0
    stages: Counter = field(default_factory=Counter)
    hooks: Counter = field(default_factory=Counter)
    hook_s: float = 0.0
    encoder_pass_s: list[float] = field(default_factory=list)
    load_s: float = 0.0
    masks: dict[int, np.ndarray] = field(default_factory=dict)

    def per_image(self, value: float) -> float:
        return value / max(self.images, 1)

    @property
    def forward_s(self) -> float:
        return sum(self.stages[s] for s in FORWARD_STAGES)


class NaiveLoop:
    """The demo-script way: ``SamPredictor`` prompt by prompt, GDino class by class.

    Args:
        sam_path: SAM checkpoint. gdino_dir: GDino directory, or None (boxes).
        categories: category id → name. config: thresholds (the same as omnilabel's). device: torch device.
    """

    def __init__(self, sam_path: Path, gdino_dir: Path | None, *, categories: dict[int, str],
                 config: PipelineConfig, spec: TeacherSpec, device: str) -> None:
        from segment_anything import SamPredictor

        from omnilabel.models.sam_loader import load_sam
        from omnilabel.teachers.gdino import GDinoConfig, GDinoTeacher

        self.predictor = SamPredictor(load_sam(sam_path, device=device))
        gdino_config = GDinoConfig(box_threshold=spec.box_threshold, nms_iou=spec.nms_iou)
        self.detector = (None if gdino_dir is None
                         else GDinoTeacher(gdino_dir, device=device, config=gdino_config))
        self.categories, self.config = categories, config

    def _predict(self, **prompt: Any) -> tuple[np.ndarray, float]:
        masks, scores, _ = self.predictor.predict(**prompt)
        best = int(np.argmax(scores))
        return masks[best], float(scores[best])

    def __call__(self, task: ImageTask) -> tuple[list[dict[str, Any]], Counter]:
        sec: Counter = Counter()
        t = time.perf_counter()
        image = read_image_rgb(task.path)
        sec["read"] += time.perf_counter() - t
        h, w = image.shape[:2]
        anns = task.annotations
        ids = np.array([a["id"] for a in anns], dtype=np.int64)
        cats = np.array([a["category_id"] for a in anns], dtype=np.int64)
        one = np.array([1])
        t = time.perf_counter()
        self.predictor.set_image(image)
        sec["encode"] += time.perf_counter() - t
        if "point" in anns[0]:
            pts = np.array([a["point"] for a in anns], dtype=np.float64)
            t = time.perf_counter()
            stage1 = np.stack([self._predict(point_coords=p[None], point_labels=one, multimask_output=True)[0]
                               for p in pts])
            sec["decode"] += time.perf_counter() - t
            t = time.perf_counter()
            boxes_sam = masks_to_boxes_xyxy(stage1)
            empty = ~stage1.reshape(len(pts), -1).any(axis=1)
            boxes_sam[empty] = np.concatenate([pts[empty] - 1, pts[empty] + 1], axis=1)
            sec["refine"] += time.perf_counter() - t
            t = time.perf_counter()
            dets = [self.detector.detect(image, [self.categories[c]], category_ids=[c],
                                         box_threshold=min(self.config.tau_c, self.config.box_threshold))
                    for c in sorted(set(cats.tolist()))]
            det = Instances.cat(dets)
            sec["detect"] += time.perf_counter() - t
            t = time.perf_counter()
            merged = refine_prompts(boxes_dino_xyxy=det.boxes_xyxy, scores_dino=det.scores,
                                    labels_dino=det.category_ids, points_gt_xy=pts, boxes_sam_xyxy=boxes_sam,
                                    labels_gt=cats, alpha=self.config.alpha, beta=self.config.beta,
                                    tau_c=self.config.tau_c).boxes_merged_xyxy
            sec["refine"] += time.perf_counter() - t
            t = time.perf_counter()
            self.predictor.set_image(image)  # the demos encode the image again for the second stage
            sec["encode"] += time.perf_counter() - t
            t = time.perf_counter()
            out = [self._predict(point_coords=p[None], point_labels=one, box=b, multimask_output=False)
                   for p, b in zip(pts, merged, strict=True)]
        else:
            boxes = np.array([a["bbox"] for a in anns], dtype=np.float64)
            boxes[:, 2:] += boxes[:, :2]
            t = time.perf_counter()
            out = [self._predict(box=b, multimask_output=False) for b in boxes]
        sec["decode"] += time.perf_counter() - t
        t = time.perf_counter()
        masks = np.stack([m for m, _ in out])
        keep = masks.reshape(len(anns), -1).sum(axis=1) >= self.config.min_mask_area_px
        inst = Instances((h, w), masks=masks, scores=np.clip([s for _, s in out], 0, 1), category_ids=cats,
                         weak_ids=ids)[keep]
        result = inst.to_coco(image_id=task.image_id,
                              extra=[{"omnilabel": {"weak_id": int(i)}} for i in inst.weak_ids])
        sec["encode_rle"] += time.perf_counter() - t
        return result, sec


def sam_modules(sam: Any) -> dict[str, torch.nn.Module]:
    return {"encoder": sam.image_encoder, "decoder": sam.mask_decoder}


def run_setting(setting: str, inputs: dict[str, Any], args: argparse.Namespace, *,
                warmup: bool) -> dict[str, Tally]:
    """Time both methods on every image of one setting, image by image in alternation."""
    data = load_coco(inputs[setting], images_dir=inputs["images"])
    tasks = plan_tasks(data, inputs["images"], plan_weak(data, setting, has_detector=True).images,
                       allow_outside_images=False)
    categories = category_names(data)
    config = PipelineConfig(weak=setting)
    spec = TeacherSpec(sam=str(inputs["sam"]), detector=str(inputs["gdino"]), device=args.device)
    needs_detector = setting == "points"
    tallies = {"omnilabel": Tally(), "naive": Tally()}

    t = time.perf_counter()
    worker = PseudomaskWorker(spec, resolve_paths(spec, load_detector=needs_detector), categories, config)
    tallies["omnilabel"].load_s = time.perf_counter() - t
    t = time.perf_counter()
    naive = NaiveLoop(inputs["sam"], inputs["gdino"] if needs_detector else None, categories=categories,
                      config=config, spec=spec, device=args.device)
    tallies["naive"].load_s = time.perf_counter() - t

    teachers = worker.pipeline.teachers
    hooked = {"omnilabel": sam_modules(teachers.sam.sam), "naive": sam_modules(naive.predictor.model)}
    if needs_detector:
        hooked["omnilabel"]["gdino"] = teachers.detector.model
        hooked["naive"]["gdino"] = naive.detector.model
    if warmup:  # one untimed image per method: first-call costs (allocator, kernel selection)
        worker(tasks[:1])
        naive(tasks[0])

    def omni(task: ImageTask) -> tuple[list[dict[str, Any]], Counter]:
        (rec,) = worker([task])
        if "error" in rec:
            raise RuntimeError(f"image {task.image_id}: {rec['error']}")
        return rec["annotations"], Counter(rec["seconds"])

    encoder_calls_before = worker.encoder_calls

    for task in tasks:
        for name, method in (("omnilabel", omni), ("naive", naive)):
            hooks = ForwardHooks(hooked[name], device=args.device)
            t = time.perf_counter()
            anns, seconds = method(task)
            wall = time.perf_counter() - t
            hooks.remove()
            tally = tallies[name]
            tally.images += 1
            tally.instances += len(task.annotations)
            tally.wall_s += wall
            tally.stages.update(seconds)
            tally.hooks.update(hooks.calls)
            tally.hook_s += sum(hooks.seconds.values())
            tally.encoder_pass_s += hooks.encoder_pass_s
            h, w = data["images"][0]["height"], data["images"][0]["width"]
            for a in anns:
                tally.masks[a["omnilabel"]["weak_id"]] = rle_to_masks([a["segmentation"]], h, w)[0]
    if worker.encoder_calls - encoder_calls_before != tallies["omnilabel"].hooks["encoder"]:
        raise RuntimeError("PseudomaskWorker.encoder_calls disagrees with the encoder's forward hook")
    return tallies


def agreement(tallies: dict[str, Tally], shape_hw: tuple[int, int]) -> float:
    """Mean mask IoU between the two methods' outputs, per input annotation (a dropped mask is empty)."""
    a, b = tallies["omnilabel"].masks, tallies["naive"].masks
    ids = sorted(set(a) | set(b))
    if not ids:
        return 1.0
    empty = np.zeros(shape_hw, dtype=bool)
    ious = mask_iou(np.stack([a.get(i, empty) for i in ids]), np.stack([b.get(i, empty) for i in ids]))
    return float(ious.mean())


def build_inputs(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Synthetic scenes, one weak file per setting, a SAM checkpoint and a tiny GDino, under ``work``."""
    from transformers.utils import logging as hf_logging

    from omnilabel.models.sam_loader import OFFICIAL_SAM_ARCHS, build_sam_from_arch
    from omnilabel.models.tiny import build_tiny_sam, save_sam_checkpoint
    from omnilabel.models.tiny_gdino import build_tiny_gdino

    hf_logging.disable_progress_bar()

    coco_path = make_dataset(work / "data", n_images=args.images, seed=args.seed, size_hw=(256, 256),
                             max_objects=args.max_objects)
    full = load_coco(coco_path)
    inputs: dict[str, Any] = {"images": work / "data" / "images"}
    for setting in args.settings:
        inputs[setting] = work / f"weak_{setting}.json"
        write_coco(split_coco(full, fully=0.0, weak=setting, seed=args.seed), inputs[setting])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        sam = (build_tiny_sam() if args.sam_size == "tiny"
               else build_sam_from_arch(OFFICIAL_SAM_ARCHS[args.sam_size]))
    inputs["sam"] = save_sam_checkpoint(sam, work / f"sam_{args.sam_size}_random.pth")
    inputs["sam_input_px"] = sam.image_encoder.img_size
    del sam
    inputs["gdino"] = build_tiny_gdino(work / "gdino")
    inputs["mean_instances"] = len(full["annotations"]) / max(len(full["images"]), 1)
    return inputs


def report(results: dict[str, dict[str, Tally]], agree: dict[str, float], inputs: dict[str, Any],
           args: argparse.Namespace) -> str:
    """The markdown section: setup, the main table, the per-stage table, notes."""
    rows, stage_rows = [], []
    for setting, tallies in results.items():
        om, nv = tallies["omnilabel"], tallies["naive"]
        for name, t in tallies.items():
            e2e, fwd = t.per_image(t.wall_s), t.per_image(t.forward_s)
            speedup = f"×{nv.wall_s / om.wall_s:.2f}" if name == "omnilabel" else "—"
            rows.append([setting, name, f"{t.per_image(t.instances):.1f}", f"{e2e:.2f}",
                         f"{t.per_image(t.hooks['encoder']):.1f}", f"{t.per_image(t.hooks['decoder']):.1f}",
                         f"{t.per_image(t.hooks['gdino']):.1f}", f"{fwd:.2f}", f"{e2e / fwd:.3f}",
                         f"{t.per_image(t.hook_s):.2f}", speedup])
            other = t.wall_s - sum(t.stages[s] for s in STAGES)
            stage_rows.append([setting, name, *(f"{t.per_image(t.stages[s]):.3f}" for s in STAGES),
                               f"{t.per_image(other):.3f}", f"{t.load_s:.1f}"])
    table = markdown_table(["setting", "method", "inst/img", "s/image", "SAM encoder passes/img",
                            "SAM decoder calls/img", "GDino passes/img", "model-forward s/img",
                            "end-to-end / forward", "nn.Module s/img", "speedup"], rows)
    stages = markdown_table(["setting", "method", *(f"{s} s/img" for s in STAGES), "other s/img",
                             "model load s (once)"], stage_rows)
    sam_desc = (f"a random-weight SAM `{args.sam_size}` ({inputs['sam_input_px']}-px encoder input)"
                if args.sam_size != "tiny" else "the tiny random SAM of the tests (256-px input)")
    agree_txt = ", ".join(f"{s}: {v:.3f}" for s, v in agree.items())
    passes = [x for tallies in results.values() for t in tallies.values() for x in t.encoder_pass_s]
    summary = "; ".join(
        f"{setting}: omnilabel ×{ts['naive'].wall_s / ts['omnilabel'].wall_s:.2f} faster, "
        f"{ts['omnilabel'].per_image(ts['omnilabel'].hooks['encoder']):.0f} vs "
        f"{ts['naive'].per_image(ts['naive'].hooks['encoder']):.0f} encoder passes per image, "
        f"{ts['omnilabel'].per_image(ts['omnilabel'].hooks['gdino']):.0f} vs "
        f"{ts['naive'].per_image(ts['naive'].hooks['gdino']):.0f} GDino passes, overhead ratio "
        f"{ts['omnilabel'].wall_s / ts['omnilabel'].forward_s:.3f}"
        for setting, ts in results.items())
    warm = ", after one untimed warm-up image per method" if args.warmup else ""
    return f"""## Pseudomask teacher vs a naive per-instance loop (`bench/pseudomask.py`)

Run {today()} on {machine_line(threads=args.threads, device=args.device)}.

Command: `{command_line()}`

Setup: {args.images} synthetic 256×256 scenes (up to {args.max_objects} objects, \
{inputs['mean_instances']:.1f} per image), every annotation reduced to a point or a box (`split_coco`, \
fully = 0); {sam_desc}; the tiny random Grounding DINO of the tests. Both methods run the same models on \
the same images, alternating image by image{warm}.

**Result** — {summary}.

{table}

Where the time goes (seconds per image; `other` = end to end minus the named stages):

{stages}

- **omnilabel**: `PseudomaskWorker` (what `run_pseudomask` runs per shard) on each image task of
  `plan_tasks`. **naive**: `segment_anything.SamPredictor` as the demo scripts use it — points:
  `set_image`, one `predict` per point (multimask, best score), GDino once per class, Algorithm 1,
  `set_image` again, one `predict` per point with the merged box; boxes: `set_image`, one `predict` per box.
- s/image: end to end per image (read, detect, encode, decode, refine, RLE); model loading excluded
  (its time is the last column of the second table).
- model-forward = the encode + decode + detect stages (SAM encoder, SAM prompt encoder + decoder with mask
  upsampling, GDino with its pre- and post-processing); end-to-end / forward is the overhead ratio
  (goal ≤ 1.10). nn.Module s/img is the time inside the SAM encoder, SAM decoder and GDino forward passes
  alone, from forward hooks, which also count the passes.
- speedup = naive s/image ÷ omnilabel s/image. Mask agreement between the two (mean IoU per input
  annotation): {agree_txt}. Boxes should agree to float rounding; for points, GDino prompted one
  class at a time scores differently from one prompt with all the image's classes, so refined boxes may
  differ.
- Peak RSS of the benchmark process: {peak_rss_mib():.0f} MiB.
- Timings are noisy: other processes (test suites) shared these cores while this ran. One SAM encoder
  pass took {min(passes):.3g}–{max(passes):.3g} s (median {float(np.median(passes)):.3g} s) over the \
{len(passes)} timed passes of this run; the pass counts, not the seconds, are the stable evidence.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=3, help="synthetic images per setting")
    p.add_argument("--sam-size", choices=("vit_b", "vit_l", "vit_h", "tiny"), default="vit_b")
    p.add_argument("--settings", default="points,boxes", help="comma-separated, from: points, boxes")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-objects", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed first image")
    p.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    p.add_argument("--work-dir", type=Path, help="keep inputs here (default: a temporary folder)")
    args = p.parse_args(argv)
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    bad = [s for s in args.settings if s not in SETTINGS]
    if bad or not args.settings:
        p.error(f"--settings: choose from {', '.join(SETTINGS)}, got {args.settings}")
    if args.images < 1:
        p.error("--images must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="omnilabel-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        inputs = build_inputs(work, args)
        print(f"inputs built in {time.perf_counter() - t:.1f} s under {work}", flush=True)
        results, agree = {}, {}
        for setting in args.settings:
            t = time.perf_counter()
            results[setting] = run_setting(setting, inputs, args, warmup=args.warmup and not results)
            agree[setting] = agreement(results[setting], (256, 256))
            print(f"{setting}: {time.perf_counter() - t:.1f} s", flush=True)
        section = report(results, agree, inputs, args)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(section)
    if args.write:
        print(f"wrote {write_section(SECTION, section)}")


if __name__ == "__main__":
    main()
