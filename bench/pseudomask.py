"""Benchmark the pseudomask teacher against the naive per-instance loop of the popular demo scripts.

What it measures, per weak setting (``points``, ``boxes``, ``none``), on the same models and the same images:

- omnilabel: ``omnilabel.jobs.pseudomask.PseudomaskWorker`` (what ``run_pseudomask`` runs on each shard),
  timed on each image task from ``plan_tasks``. Model loading is timed apart and excluded from s/image.
- naive: ``segment_anything.SamPredictor`` as the demos use it. Points: ``set_image``, one ``predict``
  per instance (multimask, best score), GDino once per class present, Algorithm 1
  (``omnilabel.ops.refine.refine_prompts``), ``set_image`` again, one ``predict`` per instance with the
  merged box and the point. Boxes: ``set_image`` once, one ``predict`` per box. None (unlabelled images, the
  dataset's 80 COCO class names): GDino once per class with the prompt ``"name."``, then ``set_image`` and
  one ``predict`` per detected box; omnilabel packs the names into as few prompts as GDino's 256-token cap
  allows (``GDinoTeacher.detect``, ``chunk_class_names``) and decodes the boxes in batched calls. Masks are
  written as COCO RLE like omnilabel's, so both do the same work end to end.

Methods alternate image by image, so background load on the machine hits both alike. Forward hooks on the
SAM image encoder, the SAM mask decoder and GDino count the passes each method really makes.

GDino is the tiny random model of the tests (``--gdino-size tiny``, the default for points) or a random-weight
model of ``grounding-dino-tiny``'s architecture with its processor (``swin-t``: Swin-T backbone, BERT-base
text encoder, 800-px shortest edge; the default for none, where the cost of a GDino pass is what is compared).

``--write`` replaces, in the ``pseudomask`` section of BENCHMARKS.md, the block of the settings it ran (and any
block sharing a setting with them) and keeps the other blocks, so each block is reproduced by its own command.

Usage::

    python bench/pseudomask.py --sam-size tiny                 # quick check
    python bench/pseudomask.py --images 3 --sam-size vit_b --write
    python bench/pseudomask.py --settings none --images 1 --write
"""

from __future__ import annotations

import argparse
import math
import os
import re
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
from _common import BENCHMARKS_MD, command_line, machine_line, markdown_table, peak_rss_mib, today, write_section

from omnilabel.data.coco import category_names, load_coco, write_coco
from omnilabel.data.images import read_image_rgb
from omnilabel.data.synthetic import make_dataset
from omnilabel.data.weak import WeakType, plan_weak, split_coco
from omnilabel.instances import Instances
from omnilabel.jobs.pseudomask import ImageTask, PseudomaskWorker, plan_tasks
from omnilabel.ops.boxes import box_iou, box_xywh_to_xyxy, masks_to_boxes_xyxy
from omnilabel.ops.masks import mask_iou, rle_to_masks
from omnilabel.ops.refine import refine_prompts
from omnilabel.teachers.loading import TeacherSpec, resolve_paths
from omnilabel.teachers.pipeline import PipelineConfig

SECTION = "pseudomask"
SETTINGS = ("points", "boxes", "none")
STAGES = ("read", "detect", "encode", "decode", "refine", "encode_rle")
FORWARD_STAGES = ("detect", "encode", "decode")
GDINO_SIZES = ("tiny", "swin-t")
#: The 80 COCO category names, in COCO's order; the categories of the ``none`` setting (ids 1..80).
COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)
#: GDino confidence kept in the none setting, per GDino size. Random weights give random scores: these were
#: chosen on the first synthetic scene (seed 0) so that both methods prompt SAM with a comparable, non-zero
#: number of boxes. The random ``swin-t`` model's logits reach about 40 on it (tiny: about 10), hence thresholds
#: near 1; float64 resolves the sigmoid up to a logit of about 36.
NONE_BOX_THRESHOLD = {"tiny": 0.9999, "swin-t": 1 - 1e-12}
_RUN_MARK = "pseudomask-run"
_RUN_RE = re.compile(rf"<!-- {_RUN_MARK}:([a-z,]+) -->\n.*?\n<!-- /{_RUN_MARK}:\1 -->", re.DOTALL)


class ForwardHooks:
    """Counts and times the forward passes of named modules (pre- and post-forward hooks).

    Args:
        modules: label → module.
        device: on CUDA, each hook synchronises so that the time covers the kernels.

    Attributes:
        calls: label → passes. seconds: label → total seconds. pass_s: label → the seconds of each pass.
    """

    def __init__(self, modules: dict[str, torch.nn.Module], *, device: str) -> None:
        self.calls: Counter = Counter()
        self.seconds: Counter = Counter()
        self.pass_s: dict[str, list[float]] = {label: [] for label in modules}
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
            self.pass_s[label].append(dt)
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@dataclass
class Tally:
    """Totals of one method in one setting, over the timed images.

    ``boxes`` counts the detections that prompted SAM (none setting); ``masks`` holds the output masks by input
    annotation id (points, boxes), ``det_boxes`` the prompt boxes (N, 4) xyxy and their classes (N,) by image
    (none), ``prompt_tokens`` the length of each GDino prompt omnilabel makes of the class names (none).
    """

    images: int = 0
    instances: int = 0
    boxes: int = 0
    wall_s: float = 0.0
    stages: Counter = field(default_factory=Counter)
    hooks: Counter = field(default_factory=Counter)
    hook_s: float = 0.0
    pass_s: dict[str, list[float]] = field(default_factory=dict)
    load_s: float = 0.0
    masks: dict[int, np.ndarray] = field(default_factory=dict)
    prompt_tokens: list[int] = field(default_factory=list)
    det_boxes: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

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

    def __call__(self, task: ImageTask, *, class_ids: list[int] | None = None
                 ) -> tuple[list[dict[str, Any]], Counter, int]:
        """Label one image: ``(annotations, seconds per stage, detections that prompted SAM)``.

        ``class_ids`` limits the classes looked for on an unlabelled image (default: every class).
        """
        sec: Counter = Counter()
        t = time.perf_counter()
        image = read_image_rgb(task.path)
        sec["read"] += time.perf_counter() - t
        if task.plan.detect is WeakType.NONE:
            classes = sorted(self.categories) if class_ids is None else class_ids
            inst, boxes_xyxy, n_prompts = self._unlabelled(image, sec, classes)
            t = time.perf_counter()
            extra = [{"omnilabel": {"weak": WeakType.NONE.value, "prompt": {"bbox": _xywh(b)}}}
                     for b in boxes_xyxy]
            result = inst.to_coco(image_id=task.image_id, extra=extra)
            sec["encode_rle"] += time.perf_counter() - t
            return result, sec, n_prompts
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
        return result, sec, 0

    def _unlabelled(self, image: np.ndarray, sec: Counter,
                    class_ids: list[int]) -> tuple[Instances, np.ndarray, int]:
        """GDino once per class (prompt ``"name."``), then ``set_image`` and one ``predict`` per detected box.

        Returns:
            The kept pseudomasks (score = SAM's IoU × GDino's confidence, as omnilabel's), their (N, 4) xyxy
            prompt boxes, and the number of detections that prompted SAM (empty masks included).
        """
        h, w = image.shape[:2]
        t = time.perf_counter()
        det = Instances.cat([self.detector.detect(image, [self.categories[c]], category_ids=[c],
                                                  box_threshold=self.config.box_threshold) for c in class_ids])
        sec["detect"] += time.perf_counter() - t
        if not len(det):  # like omnilabel, no SAM work on an image without detections
            return Instances.empty((h, w)), np.zeros((0, 4)), 0
        t = time.perf_counter()
        self.predictor.set_image(image)
        sec["encode"] += time.perf_counter() - t
        t = time.perf_counter()
        out = [self._predict(box=b, multimask_output=False) for b in det.boxes_xyxy]
        sec["decode"] += time.perf_counter() - t
        t = time.perf_counter()
        masks = np.stack([m for m, _ in out])
        keep = masks.reshape(len(det), -1).sum(axis=1) >= self.config.min_mask_area_px
        scores = np.clip([s for _, s in out], 0, 1) * det.scores
        inst = Instances((h, w), masks=masks, scores=scores, category_ids=det.category_ids)[keep]
        sec["encode_rle"] += time.perf_counter() - t
        return inst, det.boxes_xyxy[keep], len(det)


def _xywh(box_xyxy: np.ndarray) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    return [round(v, 2) for v in (x0, y0, x1 - x0, y1 - y0)]


def sam_modules(sam: Any) -> dict[str, torch.nn.Module]:
    return {"encoder": sam.image_encoder, "decoder": sam.mask_decoder}


def gdino_size_of(setting: str, args: argparse.Namespace) -> str | None:
    """The GDino a setting runs: None for boxes, else ``--gdino-size`` or the setting's default."""
    if setting == "boxes":
        return None
    return args.gdino_size or ("swin-t" if setting == "none" else "tiny")


def none_box_threshold(args: argparse.Namespace) -> float:
    """GDino confidence kept in the none setting: ``--box-threshold`` or ``NONE_BOX_THRESHOLD``."""
    return args.box_threshold if args.box_threshold is not None else NONE_BOX_THRESHOLD[gdino_size_of("none", args)]


def run_setting(setting: str, inputs: dict[str, Any], args: argparse.Namespace, *,
                warmup: bool) -> dict[str, Tally]:
    """Time both methods on every image of one setting, image by image in alternation."""
    data = load_coco(inputs[setting], images_dir=inputs["images"])
    tasks = plan_tasks(data, inputs["images"], plan_weak(data, setting, has_detector=True).images,
                       allow_outside_images=False)
    categories = category_names(data)
    gdino = gdino_size_of(setting, args)
    thresholds = {"box_threshold": none_box_threshold(args)} if setting == "none" else {}
    config = PipelineConfig(weak=setting, **thresholds)
    spec = TeacherSpec(sam=str(inputs["sam"]), detector=str(inputs[f"gdino_{gdino}"]) if gdino else "none",
                       device=args.device, **thresholds)
    tallies = {"omnilabel": Tally(), "naive": Tally()}

    t = time.perf_counter()
    worker = PseudomaskWorker(spec, resolve_paths(spec, load_detector=gdino is not None), categories, config)
    tallies["omnilabel"].load_s = time.perf_counter() - t
    t = time.perf_counter()
    naive = NaiveLoop(inputs["sam"], inputs[f"gdino_{gdino}"] if gdino else None, categories=categories,
                      config=config, spec=spec, device=args.device)
    tallies["naive"].load_s = time.perf_counter() - t

    teachers = worker.pipeline.teachers
    hooked = {"omnilabel": sam_modules(teachers.sam.sam), "naive": sam_modules(naive.predictor.model)}
    if gdino:
        hooked["omnilabel"]["gdino"] = teachers.detector.model
        hooked["naive"]["gdino"] = naive.detector.model
    if setting == "none":
        tallies["omnilabel"].prompt_tokens = prompt_tokens(teachers.detector, list(categories.values()))
    if warmup:  # one untimed image per method: first-call costs (allocator, kernel selection)
        worker(tasks[:1])
        # Unlabelled: the naive loop's warm-up looks for one class; its 80 per-class passes dwarf a first call.
        naive(tasks[0], class_ids=sorted(categories)[:1] if setting == "none" else None)

    def omni(task: ImageTask) -> tuple[list[dict[str, Any]], Counter, int]:
        (rec,) = worker([task])
        if "error" in rec:
            raise RuntimeError(f"image {task.image_id}: {rec['error']}")
        counts = rec["counts"]
        return rec["annotations"], Counter(rec["seconds"]), counts.get("none", 0) + counts.get("empty", 0)

    encoder_calls_before = worker.encoder_calls

    for task in tasks:
        for name, method in (("omnilabel", omni), ("naive", naive)):
            hooks = ForwardHooks(hooked[name], device=args.device)
            t = time.perf_counter()
            anns, seconds, n_boxes = method(task)
            wall = time.perf_counter() - t
            hooks.remove()
            tally = tallies[name]
            tally.images += 1
            tally.instances += len(task.annotations)
            tally.boxes += n_boxes
            tally.wall_s += wall
            tally.stages.update(seconds)
            tally.hooks.update(hooks.calls)
            tally.hook_s += sum(hooks.seconds.values())
            for label, passes in hooks.pass_s.items():
                tally.pass_s.setdefault(label, []).extend(passes)
            if setting == "none":
                boxes_xywh = np.array([a["omnilabel"]["prompt"]["bbox"] for a in anns], dtype=np.float64)
                tally.det_boxes[task.image_id] = (box_xywh_to_xyxy(boxes_xywh.reshape(-1, 4)),
                                                  np.array([a["category_id"] for a in anns], dtype=np.int64))
                continue
            h, w = data["images"][0]["height"], data["images"][0]["width"]
            for a in anns:
                tally.masks[a["omnilabel"]["weak_id"]] = rle_to_masks([a["segmentation"]], h, w)[0]
    if worker.encoder_calls - encoder_calls_before != tallies["omnilabel"].hooks["encoder"]:
        raise RuntimeError("PseudomaskWorker.encoder_calls disagrees with the encoder's forward hook")
    return tallies


def prompt_tokens(detector: Any, names: list[str]) -> list[int]:
    """Token counts ([CLS] and [SEP] included) of the prompts ``GDinoTeacher.detect`` makes of ``names``."""
    from omnilabel.teachers.gdino import build_prompt, chunk_class_names

    tokenizer = detector.processor.tokenizer
    chunks = chunk_class_names(tokenizer, names, detector.max_text_tokens)
    return [len(tokenizer(build_prompt([names[i] for i in chunk])[0])["input_ids"]) for chunk in chunks]


def agreement(tallies: dict[str, Tally], shape_hw: tuple[int, int]) -> float:
    """Mean mask IoU between the two methods' outputs, per input annotation (a dropped mask is empty)."""
    a, b = tallies["omnilabel"].masks, tallies["naive"].masks
    ids = sorted(set(a) | set(b))
    if not ids:
        return 1.0
    empty = np.zeros(shape_hw, dtype=bool)
    ious = mask_iou(np.stack([a.get(i, empty) for i in ids]), np.stack([b.get(i, empty) for i in ids]))
    return float(ious.mean())


def box_agreement(tallies: dict[str, Tally], *, iou_thresh: float = 0.5) -> tuple[int, int, int, int]:
    """How many prompt boxes of each method have a box of the same class from the other at IoU >= ``iou_thresh``.

    Returns:
        ``(omnilabel matched, omnilabel boxes, naive matched, naive boxes)`` over all images.
    """
    om, nv = tallies["omnilabel"].det_boxes, tallies["naive"].det_boxes
    counts = [0, 0, 0, 0]
    for image_id in om:
        (ba, ca), (bb, cb) = om[image_id], nv[image_id]
        hit = np.zeros((len(ba), len(bb)), dtype=bool)
        if len(ba) and len(bb):
            hit = (box_iou(ba, bb) >= iou_thresh) & (ca[:, None] == cb[None, :])
        counts = [counts[0] + int(hit.any(axis=1).sum()), counts[1] + len(ba),
                  counts[2] + int(hit.any(axis=0).sum()), counts[3] + len(bb)]
    return counts[0], counts[1], counts[2], counts[3]


def build_swin_t_gdino(out_dir: Path, *, seed: int) -> Path:
    """A random-weight Grounding DINO of ``grounding-dino-tiny``'s architecture, saved like ``build_tiny_gdino``.

    ``GroundingDinoConfig()``'s defaults are that architecture (Swin-T backbone, BERT-base text encoder, 6
    encoder and 6 decoder layers, 900 queries, 4 feature levels, 256 text tokens; 172 M parameters) and
    ``GroundingDinoImageProcessor()``'s are its processor (shortest edge 800, longest 1333). The tokenizer is the
    tests' local vocabulary (``omnilabel.models.tiny_gdino.tiny_vocab``: BERT's delimiter ids and every COCO
    class word); the text embedding keeps BERT's 30,522 rows, so the weights have the released shapes.
    transformers' own initialisation, seeded; the global torch RNG is left untouched.

    Returns:
        ``out_dir`` (config, weights, tokenizer and processor files).
    """
    from transformers import (
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
    )

    from omnilabel.models.tiny_gdino import tiny_vocab

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizer(vocab={tok: i for i, tok in enumerate(tiny_vocab())}, do_lower_case=True)
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(), tokenizer=tokenizer).save_pretrained(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GroundingDinoForObjectDetection(GroundingDinoConfig()).eval()
    model.save_pretrained(out_dir)
    return out_dir


def build_inputs(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Synthetic scenes, one weak file per setting, a SAM checkpoint and the GDinos the settings need, under
    ``work``. The none file keeps the images, drops every annotation and names the 80 COCO classes."""
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
        if setting == "none":
            categories = [{"id": i + 1, "name": name, "supercategory": "coco"} for i, name in enumerate(COCO_CLASSES)]
            write_coco({**full, "categories": categories, "annotations": []}, inputs[setting])
        else:
            write_coco(split_coco(full, fully=0.0, weak=setting, seed=args.seed), inputs[setting])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        sam = (build_tiny_sam() if args.sam_size == "tiny"
               else build_sam_from_arch(OFFICIAL_SAM_ARCHS[args.sam_size]))
    inputs["sam"] = save_sam_checkpoint(sam, work / f"sam_{args.sam_size}_random.pth")
    inputs["sam_input_px"] = sam.image_encoder.img_size
    del sam
    for size in sorted({gdino_size_of(s, args) for s in args.settings} - {None}):
        inputs[f"gdino_{size}"] = (build_tiny_gdino(work / "gdino_tiny") if size == "tiny"
                                   else build_swin_t_gdino(work / "gdino_swin_t", seed=args.seed))
    inputs["mean_instances"] = len(full["annotations"]) / max(len(full["images"]), 1)
    return inputs


def _ratio(num: float, den: float) -> str:
    return f"×{num / den:.2f}" if den > 0 else "—"


def _median(values: list[float]) -> float:
    return float(np.median(values)) if values else float("nan")


def _summary(setting: str, ts: dict[str, Tally]) -> str:
    """One clause of the Result line."""
    om, nv = ts["omnilabel"], ts["naive"]

    def per(t: Tally, label: str) -> str:
        return f"{t.per_image(t.hooks[label]):.0f}"

    if setting != "none":
        return (f"{setting}: omnilabel ×{nv.wall_s / om.wall_s:.2f} faster, {per(om, 'encoder')} vs "
                f"{per(nv, 'encoder')} encoder passes per image, {per(om, 'gdino')} vs {per(nv, 'gdino')} GDino "
                f"passes, overhead ratio {om.wall_s / om.forward_s:.3f}")
    speedup = nv.wall_s / om.wall_s
    return (f"none ({len(COCO_CLASSES)} classes): omnilabel ×{speedup:.1f} faster end to end (goal ≥ ×10: "
            f"{'met' if speedup >= 10 else 'not met'}), ×{nv.stages['detect'] / om.stages['detect']:.1f} in the "
            f"detect stage; {per(om, 'gdino')} vs {per(nv, 'gdino')} GDino passes per image, {per(om, 'encoder')} vs "
            f"{per(nv, 'encoder')} SAM encoder passes, {per(om, 'decoder')} vs {per(nv, 'decoder')} SAM decoder "
            f"calls; {om.per_image(om.boxes):.1f} vs {nv.per_image(nv.boxes):.1f} detected boxes per image")


def report(results: dict[str, dict[str, Tally]], agree: dict[str, float], inputs: dict[str, Any],
           args: argparse.Namespace, *, load_avg: tuple[float, float]) -> str:
    """The markdown block of this run: setup, the main table, the per-stage table, notes.

    ``load_avg`` is the machine's 1-minute load average at the start and at the end of the run.
    """
    rows, stage_rows = [], []
    for setting, tallies in results.items():
        om, nv = tallies["omnilabel"], tallies["naive"]
        for name, t in tallies.items():
            e2e, fwd = t.per_image(t.wall_s), t.per_image(t.forward_s)
            mine = name == "omnilabel"
            rows.append([setting, name, f"{t.per_image(t.instances):.1f}",
                         f"{t.per_image(t.boxes):.1f}" if setting == "none" else "—", f"{e2e:.2f}",
                         f"{t.per_image(t.hooks['encoder']):.1f}", f"{t.per_image(t.hooks['decoder']):.1f}",
                         f"{t.per_image(t.hooks['gdino']):.1f}", f"{t.per_image(t.stages['detect']):.2f}",
                         f"{fwd:.2f}", f"{e2e / fwd:.3f}", f"{t.per_image(t.hook_s):.2f}",
                         _ratio(nv.wall_s, om.wall_s) if mine else "—",
                         _ratio(nv.stages["detect"], om.stages["detect"]) if mine else "—"])
            other = t.wall_s - sum(t.stages[s] for s in STAGES)
            stage_rows.append([setting, name, *(f"{t.per_image(t.stages[s]):.3f}" for s in STAGES),
                               f"{t.per_image(other):.3f}", f"{t.load_s:.1f}"])
    table = markdown_table(["setting", "method", "inst/img", "GDino boxes → SAM/img", "s/image",
                            "SAM encoder passes/img", "SAM decoder calls/img", "GDino passes/img", "detect s/img",
                            "model-forward s/img", "end-to-end / forward", "nn.Module s/img", "speedup",
                            "detect speedup"], rows)
    stages = markdown_table(["setting", "method", *(f"{s} s/img" for s in STAGES), "other s/img",
                             "model load s (once)"], stage_rows)
    sam_desc = (f"a random-weight SAM `{args.sam_size}` ({inputs['sam_input_px']}-px encoder input)"
                if args.sam_size != "tiny" else "the tiny random SAM of the tests (256-px input)")
    gdino_desc = {
        "tiny": "the tiny random Grounding DINO of the tests",
        "swin-t": ("a random-weight Grounding DINO of `grounding-dino-tiny`'s architecture (`GroundingDinoConfig()` "
                   "defaults: Swin-T backbone, BERT-base text encoder, 6 + 6 layers, 900 queries; 172 M "
                   "parameters) with its processor (shortest edge 800: these scenes go in at 800×800)"),
    }
    users = {size: [s for s in results if gdino_size_of(s, args) == size] for size in GDINO_SIZES}
    gdinos = "; ".join(gdino_desc[size] + (f" ({', '.join(users[size])})" if len(results) > 1 else "")
                       for size in GDINO_SIZES if users[size])
    reduced = [s for s in results if s != "none"]
    how = []
    if reduced:
        one = {"points": "point", "boxes": "box"}
        how.append(f"every annotation reduced to a {' or a '.join(one[s] for s in reduced)} (`split_coco`, fully = 0)")
    if "none" in results:
        tau = none_box_threshold(args)
        how.append(f"for none, every annotation dropped and the categories replaced by the {len(COCO_CLASSES)} COCO "
                   f"class names, GDino box threshold {tau:.15g} (logit {math.log(tau / (1 - tau)):.1f}) for both "
                   "methods")
    passes = [x for tallies in results.values() for t in tallies.values() for x in t.pass_s.get("encoder", [])]
    summary = "; ".join(_summary(setting, ts) for setting, ts in results.items())
    warm = ", after one untimed warm-up image per method" if args.warmup else ""
    notes = [
        "- **omnilabel**: `PseudomaskWorker` (what `run_pseudomask` runs per shard) on each image task of\n"
        "  `plan_tasks`. **naive**: `segment_anything.SamPredictor` as the demo scripts use it.",
    ]
    if "points" in results:
        notes.append("- points, naive: `set_image`, one `predict` per point (multimask, best score), GDino once per "
                     "class,\n  Algorithm 1, `set_image` again, one `predict` per point with the merged box.")
    if "boxes" in results:
        notes.append("- boxes, naive: `set_image`, one `predict` per box.")
    if "none" in results:
        om, nv = results["none"]["omnilabel"], results["none"]["naive"]
        tokens = om.prompt_tokens
        matched = box_agreement(results["none"])
        notes += [
            f"- none: omnilabel's `GDinoTeacher.detect` packs the {len(COCO_CLASSES)} names into {len(tokens)} "
            f"prompt(s) of {', '.join(map(str, tokens))} tokens (cap 256, `chunk_class_names`), one GDino pass\n"
            "  per prompt, then box-SAM on every detection in one batched decoder call. naive: one GDino pass per "
            "class with the\n  prompt `\"name.\"` (as the Grounded-SAM demos loop over classes), then `set_image` "
            "and one `predict` per box." + (" The warm-up\n  image of the naive loop looks for one class only." if
                                             args.warmup else ""),
            f"- none, GDino passes: {_median(om.pass_s.get('gdino', [])):.2f} s (median) with omnilabel's prompt "
            f"of {max(tokens, default=0)} tokens, {_median(nv.pass_s.get('gdino', [])):.2f} s with one name;\n"
            "  the detect stage adds the image processor and box decoding to each pass. SAM decode per box: "
            f"{om.stages['decode'] / max(om.boxes, 1):.3f} s\n  (omnilabel, batched), "
            f"{nv.stages['decode'] / max(nv.boxes, 1):.3f} s (naive, one `predict` each).",
            "- none, random weights: the detections are not objects and their scores are random (a random GDino's "
            "logits run\n  into the tens, hence a box threshold near 1). The threshold was chosen so that both "
            "methods prompt SAM with a\n  comparable, non-zero number of boxes (column GDino boxes → SAM). The pass "
            "counts and the times are the evidence,\n  not the masks.",
            f"- none, agreement: mask agreement is not meaningful — a query's score depends on the whole prompt "
            f"(BERT and the\n  image-text fusion layers see 80 names at once, or one), so the two methods keep "
            f"different boxes: {matched[0]} of\n  omnilabel's {matched[1]} boxes have a naive box of the same class "
            f"at IoU ≥ 0.5, {matched[2]} of naive's {matched[3]} an omnilabel one.",
        ]
    notes += [
        "- s/image: end to end per image (read, detect, encode, decode, refine, RLE); model loading excluded\n"
        "  (its time is the last column of the second table).",
        "- model-forward = the encode + decode + detect stages (SAM encoder, SAM prompt encoder + decoder with mask\n"
        "  upsampling, GDino with its pre- and post-processing); end-to-end / forward is the overhead ratio\n"
        "  (goal ≤ 1.10). nn.Module s/img is the time inside the SAM encoder, SAM decoder and GDino forward passes\n"
        "  alone, from forward hooks, which also count the passes.",
        "- speedup = naive s/image ÷ omnilabel s/image; detect speedup = the same for the detect stage.",
    ]
    if agree:
        notes.append("- Mask agreement between the two (mean IoU per input annotation): "
                     + ", ".join(f"{s}: {v:.3f}" for s, v in agree.items())
                     + ". Boxes should agree to float rounding; for\n  points, GDino prompted one class at a time "
                     "scores differently from one prompt with all the image's classes, so refined\n  boxes may "
                     "differ.")
    notes += [
        f"- Peak RSS of the benchmark process: {peak_rss_mib():.0f} MiB.",
        f"- Timings are noisy on these shared cores: the 1-minute load average was {load_avg[0]:.2f} at the start "
        f"and {load_avg[1]:.2f} at the\n  end of this run (its own threads included). One SAM encoder pass took "
        f"{min(passes):.3g}–{max(passes):.3g} s (median {_median(passes):.3g} s)\n  over the {len(passes)} timed "
        "passes of this run; the pass counts, not the seconds, are the stable evidence.",
    ]
    notes_text = "\n".join(notes)
    return f"""### {', '.join(results)}

Run {today()} on {machine_line(threads=args.threads, device=args.device)}.

Command: `{command_line()}`

Setup: {args.images} synthetic 256×256 scene{'s' if args.images > 1 else ''} (up to {args.max_objects} objects, \
{inputs['mean_instances']:.1f} per image), {'; '.join(how)}; {sam_desc}; {gdinos}. Both methods run the same \
models on the same images, alternating image by image{warm}.

**Result** — {summary}.

{table}

Where the time goes (seconds per image; `other` = end to end minus the named stages):

{stages}

{notes_text}
"""


def section_with(block: str, settings: list[str], *, path: Path = BENCHMARKS_MD) -> str:
    """The whole ``pseudomask`` section: this run's block, and the blocks already in ``path`` that share no
    setting with it, in the order of ``SETTINGS``."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    start, end = f"<!-- bench:{SECTION} -->", f"<!-- /bench:{SECTION} -->"
    i, j = text.find(start), text.find(end)
    old = text[i:j] if 0 <= i < j else ""
    key = ",".join(settings)
    blocks = {m.group(1): m.group(0) for m in _RUN_RE.finditer(old) if not set(m.group(1).split(",")) & set(settings)}
    blocks[key] = f"<!-- {_RUN_MARK}:{key} -->\n{block.strip()}\n<!-- /{_RUN_MARK}:{key} -->"

    def rank(k: str) -> int:
        return min(SETTINGS.index(s) if s in SETTINGS else len(SETTINGS) for s in k.split(","))

    return ("## Pseudomask teacher vs a naive per-instance loop (`bench/pseudomask.py`)\n\n"
            "One block per command: `--write` replaces the block of the settings it ran and keeps the others.\n\n"
            + "\n\n".join(blocks[k] for k in sorted(blocks, key=rank)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=3, help="synthetic images per setting")
    p.add_argument("--sam-size", choices=("vit_b", "vit_l", "vit_h", "tiny"), default="vit_b")
    p.add_argument("--gdino-size", choices=GDINO_SIZES,
                   help="tiny: the tests' random GDino; swin-t: grounding-dino-tiny's architecture, random weights "
                        "(default: tiny for points, swin-t for none)")
    p.add_argument("--box-threshold", type=float,
                   help="GDino confidence kept in the none setting, for both methods (default: per GDino size, "
                        f"{NONE_BOX_THRESHOLD})")
    p.add_argument("--settings", default="points,boxes", help=f"comma-separated, from: {', '.join(SETTINGS)}")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-objects", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed first image")
    p.add_argument("--write", action="store_true", help="update this run's block of BENCHMARKS.md")
    p.add_argument("--work-dir", type=Path, help="keep inputs here (default: a temporary folder)")
    args = p.parse_args(argv)
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    bad = [s for s in args.settings if s not in SETTINGS]
    if bad or not args.settings or len(set(args.settings)) != len(args.settings):
        p.error(f"--settings: choose from {', '.join(SETTINGS)}, each once, got {args.settings}")
    if args.images < 1:
        p.error("--images must be >= 1")
    if args.box_threshold is not None and not 0.0 < args.box_threshold < 1.0:
        p.error(f"--box-threshold must be in (0, 1), got {args.box_threshold}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_start = os.getloadavg()[0]
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
            if setting != "none":
                agree[setting] = agreement(results[setting], (256, 256))
            print(f"{setting}: {time.perf_counter() - t:.1f} s", flush=True)
        block = report(results, agree, inputs, args, load_avg=(load_start, os.getloadavg()[0]))
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(block)
    if args.write:
        print(f"wrote {write_section(SECTION, section_with(block, args.settings))}")


if __name__ == "__main__":
    main()
