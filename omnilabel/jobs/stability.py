"""The ``stability`` job: Stable-SAM's evaluation protocol (``specs/stable-sam.md`` §5) on a COCO file.

For every GT instance with a full mask (``segmentation``; crowd regions are skipped) and every prompt type,
``k`` random prompts (paper: B = 20) are drawn from the instance and decoded by every model: plain SAM and each
teacher given. Per model and prompt type the job reports

- mIoU: mask IoU of each prompt's mask with the GT mask, averaged over all prompts of all instances;
- mBIoU: the same with boundary IoU (``omnilabel.eval.miou.boundary_iou``, band 0.02 x the image diagonal);
- mSF: Stable-SAM's stability score (Eq. 1, ``omnilabel.ops.stability.stability_score``) of each instance's k
  masks, averaged over instances; None for the GT box, a deterministic prompt (the paper's "-").

All three are percentages (x 100), as the paper prints them.

Prompt types (``PromptType``): ``box``, the GT mask's tight box in SAM's convention (the box the teachers are
trained with; one prompt); ``noisy-box``, that box with DN-DETR / HQ-SAM noise at scale ``noise`` (paper: 0.4),
redrawn until its IoU with the GT box is >= ``min_box_iou`` (0.5, the paper's *training* filter: the paper does
not say whether it applies at test; ``min_box_iou = 0`` turns it off); ``N-point(s)``, N positive clicks uniform
over the mask (pixel centres). Decoding follows the project's SAM conventions: one output for boxes and for
several clicks; for a lone click, SAM's best of its 3 outputs by predicted IoU (``SamTeacherConfig.
multimask_single_point``, which SAM itself uses; the paper does not say which output it scores).

Same prompts everywhere: the prompts of an instance and type come from ``instance_rng(seed, image id,
annotation id, prompt type)``, drawn once per image before any model decodes, so every model sees exactly the
same prompts, and a resumed, Ray or ``--prompts``-subset run draws what an in-process run draws.

One encoding: each image is encoded once per image encoder, and every model decodes from it. Plain SAM and the
teachers that hold only a decoder (the usual case, Stable-SAM's plugins included) share the base SAM's encoder;
a teacher trained with ``--train-encoder`` holds its own, so it is encoded with that one (its numbers then
measure its encoder as well). A decoder-only teacher of another base is refused (``CheckpointError``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from omnilabel import __version__
from omnilabel.data.coco import category_names, load_coco, resolve_image_path
from omnilabel.errors import InputError
from omnilabel.events import OnEvent
from omnilabel.io import file_sha256, text_sha256, write_json_atomic
from omnilabel.jobs.jobdir import JobDir
from omnilabel.jobs.merge import finished_records, write_errors
from omnilabel.jobs.options import Dataset, JobOptions
from omnilabel.jobs.runner import (
    Executor,
    check_images_exist,
    check_not_all_failed,
    checked_size,
    executor_for,
    per_image,
    run_unfinished_shards,
)
from omnilabel.models.registry import WeightRef
from omnilabel.ops.stability import (
    DEFAULT_MIN_BOX_IOU,
    DEFAULT_NOISE_SCALE,
    PromptType,
    draw_prompts,
    instance_rng,
)
from omnilabel.teachers.loading import TeacherSpec, model_id, model_refs, resolve_refs
from omnilabel.teachers.teacher_ckpt import read_teacher

#: Images per shard (``--batch-size``).
DEFAULT_SHARD_SIZE = 8
#: Stable-SAM §5: 20 random prompts per object and prompt type.
DEFAULT_K = 20
#: Most bytes of masks one decoder pass keeps at image size (instances x k x H x W); more instances are split.
MAX_MASK_BYTES = 2**30
#: The key of plain SAM in the results.
PLAIN_SAM = "sam"


#: Stable-SAM Table 1's prompt types but 10 points (the issue's defaults).
DEFAULT_PROMPTS = (PromptType.BOX, PromptType.NOISY_BOX, PromptType.POINT_1, PromptType.POINTS_3,
                   PromptType.POINTS_5)


def parse_prompt_types(text: str) -> tuple[PromptType, ...]:
    """``--prompts`` (comma-separated names, e.g. ``noisy-box,1-point``) as prompt types, in the order given.

    Raises:
        InputError: an unknown or repeated name, or none.
    """
    names = [t.strip() for t in text.split(",") if t.strip()]
    valid = ", ".join(p.value for p in PromptType)
    bad = [n for n in names if n not in {p.value for p in PromptType}]
    if bad or not names:
        raise InputError(f"--prompts {text!r}: unknown prompt type {bad[0]!r}; choose from {valid}" if bad
                         else f"--prompts: give at least one of {valid}")
    if len(set(names)) != len(names):
        raise InputError(f"--prompts {text!r}: a prompt type is named twice")
    return tuple(PromptType(n) for n in names)


@dataclass(frozen=True)
class StabilityConfig:
    """The protocol's settings (validated on construction).

    Attributes:
        prompts: prompt types to evaluate, in table order (default: the paper's Table 1 without 10 points).
        k: random prompts per instance and prompt type, >= 1 (Stable-SAM §5: 20); mSF needs k >= 2.
        noise: noisy-box noise scale λ, >= 0 (Stable-SAM §5: 0.4).
        min_box_iou: keep noisy boxes with IoU >= this with the GT box, in [0, 1) (Stable-SAM §4, training: 0.5).
        seed: seed of every prompt (see ``instance_rng``).
        dilation_ratio: boundary IoU band as a fraction of the image diagonal (HQ-SAM: 0.02).

    Raises:
        InputError: a value out of range, naming its flag.
    """

    prompts: tuple[PromptType, ...] = DEFAULT_PROMPTS
    k: int = DEFAULT_K
    noise: float = DEFAULT_NOISE_SCALE
    min_box_iou: float = DEFAULT_MIN_BOX_IOU
    seed: int = 0
    dilation_ratio: float = 0.02

    def __post_init__(self) -> None:
        problems = []
        if not self.prompts:
            problems.append("--prompts: give at least one prompt type")
        if self.k < 1:
            problems.append(f"--k must be >= 1, got {self.k}")
        if not self.noise >= 0:
            problems.append(f"--noise must be >= 0, got {self.noise}")
        if not 0 <= self.min_box_iou < 1:
            problems.append(f"--min-box-iou must be in [0, 1), got {self.min_box_iou}")
        if self.seed < 0:
            problems.append(f"--seed must be >= 0, got {self.seed}")
        if not self.dilation_ratio > 0:
            problems.append(f"dilation_ratio must be > 0, got {self.dilation_ratio}")
        if problems:
            raise InputError(problems[0] if len(problems) == 1 else "bad stability settings",
                             problems if len(problems) > 1 else None)

    def prompts_per_instance(self, ptype: PromptType) -> int:
        """k, or 1 for the GT box (deterministic)."""
        return 1 if ptype is PromptType.BOX else self.k

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "prompts": [p.value for p in self.prompts]}


def score_instance(pred_masks: np.ndarray, gt_mask: np.ndarray, *, radius_px: int,
                   with_sf: bool) -> tuple[float, float, float | None]:
    """Sums of mask IoU and boundary IoU of k predictions with one GT mask, and their stability score.

    Computed on the bounding box of the union of all masks: boundary IoU's erosion sees everything outside it
    as background, which it is, so the bands, and every number, equal those of the full image.

    Args:
        pred_masks: (k, H, W) bool. gt_mask: (H, W) bool.
        radius_px: boundary band width of the full image (``boundary_width_px``).
        with_sf: compute the stability score (else None).

    Returns:
        ``(Σ IoU, Σ boundary IoU, stability score or None)``, IoUs in [0, 1].
    """
    from omnilabel.eval.miou import boundary_iou
    from omnilabel.ops.masks import mask_iou
    from omnilabel.ops.stability import stability_score

    union = gt_mask | pred_masks.any(axis=0)
    rows, cols = np.flatnonzero(union.any(axis=1)), np.flatnonzero(union.any(axis=0))
    if rows.size == 0:
        return float(len(pred_masks)), float(len(pred_masks)), (1.0 if with_sf else None)
    crop = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    preds, gt = pred_masks[:, crop[0], crop[1]], gt_mask[crop]
    ious = mask_iou(preds, np.broadcast_to(gt, preds.shape))
    # boundary_iou derives its band from the array's diagonal: give it the ratio that yields the full image's.
    ratio = radius_px / float(np.hypot(*gt.shape))
    bious = [boundary_iou(p, gt, dilation_ratio=ratio) for p in preds]
    return float(ious.sum()), float(np.sum(bious)), (stability_score(preds) if with_sf else None)


@dataclass(frozen=True)
class StabilityTask:
    """One image and its GT instances; plain data.

    Attributes:
        image_id: COCO image id. path: the image file. height, width: its size in the COCO file.
        annotations: its instances (``id``, ``category_id``, ``segmentation``).
    """

    image_id: int
    path: str
    height: int
    width: int
    annotations: list[dict[str, Any]]


def task_from_dict(d: dict[str, Any]) -> StabilityTask:
    return StabilityTask(int(d["image_id"]), str(d["path"]), int(d["height"]), int(d["width"]),
                         list(d["annotations"]))


@dataclass(frozen=True)
class ModelEntry:
    """One evaluated model, as the workers load it (picklable).

    Attributes:
        name: its key in the results (``sam`` for plain SAM, else the teacher's file name).
        spec: what ``load_teachers`` loads (the teacher as ``teacher``). refs: ``model_refs(spec)``.
        encoder: which image encoder it decodes from: ``base``, or the encoder sha256 of a teacher that holds
            its own (or is stacked on one that does).
    """

    name: str
    spec: TeacherSpec
    refs: Mapping[str, WeightRef | Path] = field(default_factory=dict)
    encoder: str = "base"


def _decode(sam: Any, emb: Any, prompts: np.ndarray, category_ids: np.ndarray) -> np.ndarray:
    """(n, H, W) bool masks of n prompts of one type: boxes (n, 4) or clicks (n, N, 2), through
    ``SamTeacher.predict`` (a lone click: the best of SAM's 3 by predicted IoU; several: SAM's single output)."""
    data = {"category_ids": category_ids}
    if prompts.ndim == 2:
        return sam.predict(emb, boxes_xyxy=prompts, prompt_data=data).masks
    return sam.predict(emb, points_xy=prompts[:, 0] if prompts.shape[1] == 1 else prompts, prompt_data=data).masks


class StabilityWorker:
    """Loads every model once, then scores the instances of image tasks.

    Args:
        models: the models, plain SAM first. config: the protocol. categories: category id → name (class-aware
            teachers embed the names).
    """

    def __init__(self, models: Sequence[ModelEntry], config: StabilityConfig, categories: dict[int, str]) -> None:
        from omnilabel.teachers.loading import load_teachers

        self.config = config
        self.models = {m.name: load_teachers(m.spec, resolve_refs(m.refs), categories=categories).sam
                       for m in models}
        self.groups: dict[str, list[str]] = {}
        for m in models:
            self.groups.setdefault(m.encoder, []).append(m.name)
        for names in self.groups.values():
            # One load per model gave each its own copy of the shared encoder (checked equal when the teacher was
            # attached); keep one, since only the group's first model encodes.
            for name in names[1:]:
                self.models[name].sam.image_encoder = self.models[names[0]].sam.image_encoder

    def __call__(self, tasks: Sequence[StabilityTask]) -> list[dict[str, Any]]:
        """One record per task: ``image_id``, ``instances`` ([{``id``, ``scores``: model → type →
        [Σ IoU, Σ boundary IoU, stability score or None, prompts]}]), ``counts``, ``seconds``; or ``error``."""
        return per_image(tasks, self._score)

    def _score(self, image: np.ndarray, task: StabilityTask) -> dict[str, Any]:
        from omnilabel.eval.miou import boundary_width_px
        from omnilabel.ops.masks import rle_to_masks, segmentation_to_rle

        h, w = checked_size(image, task)
        seconds = {"prompts": 0.0, "encode": 0.0, "decode": 0.0, "score": 0.0}
        t0 = time.perf_counter()
        gts = rle_to_masks([segmentation_to_rle(a["segmentation"], h, w) for a in task.annotations], h, w)
        keep = [i for i in range(len(gts)) if gts[i].any()]
        anns, gts = [task.annotations[i] for i in keep], gts[keep]
        cfg = self.config
        prompts = {p: [draw_prompts(gt, p, instance_rng(cfg.seed, task.image_id, int(a["id"]), p), k=cfg.k,
                                    noise=cfg.noise, min_iou=cfg.min_box_iou or None)
                       for a, gt in zip(anns, gts, strict=True)] for p in cfg.prompts}
        seconds["prompts"] += time.perf_counter() - t0
        radius = boundary_width_px(h, w, dilation_ratio=cfg.dilation_ratio)
        scores: list[dict[str, dict[str, list]]] = [{} for _ in anns]
        encoder_calls = 0
        for names in (self.groups.values() if anns else []):
            t0 = time.perf_counter()
            emb = self.models[names[0]].encode(image)
            encoder_calls += 1
            seconds["encode"] += time.perf_counter() - t0
            for name in names:
                for ptype in cfg.prompts:
                    self._score_type(name, emb, ptype, prompts[ptype], anns, gts, radius, scores, seconds)
        return {"image_id": task.image_id,
                "instances": [{"id": int(a["id"]), "scores": s} for a, s in zip(anns, scores, strict=True)],
                "counts": {"instances": len(anns), "empty_masks": len(task.annotations) - len(anns),
                           "encoder_calls": encoder_calls},
                "seconds": seconds}

    def _score_type(self, name: str, emb: Any, ptype: PromptType, prompts: list[np.ndarray], anns: list[dict],
                    gts: np.ndarray, radius: int, scores: list[dict], seconds: dict[str, float]) -> None:
        """Decode one model's prompts of one type for all instances (split only to bound memory) and score them."""
        k = self.config.prompts_per_instance(ptype)
        h, w = gts.shape[1:]
        per_call = max(1, MAX_MASK_BYTES // (k * h * w))
        for start in range(0, len(anns), per_call):
            rows = range(start, min(start + per_call, len(anns)))
            t0 = time.perf_counter()
            masks = _decode(self.models[name], emb, np.concatenate([prompts[i] for i in rows]),
                            np.repeat([int(anns[i]["category_id"]) for i in rows], k))
            t1 = time.perf_counter()
            for j, i in enumerate(rows):
                iou, biou, sf = score_instance(masks[j * k:(j + 1) * k], gts[i], radius_px=radius,
                                               with_sf=ptype is not PromptType.BOX and k > 1)
                scores[i].setdefault(name, {})[ptype.value] = [iou, biou, sf, k]
            seconds["decode"] += t1 - t0
            seconds["score"] += time.perf_counter() - t1


@dataclass(frozen=True)
class StabilityModels:
    """Which models to compare.

    Attributes:
        sam: the base SAM (name or path); None: the teachers' base, else ``vit_h``.
        teachers: teacher files, each evaluated beside plain SAM.
        plain: evaluate plain SAM too; False compares the teachers alone (then a teacher that holds its own
            encoder needs no base SAM at all).
    """

    sam: str | None = None
    teachers: tuple[str, ...] = ()
    plain: bool = True


def model_entries(models: StabilityModels, *, device: str) -> list[ModelEntry]:
    """Plain SAM, then each teacher, as the workers load them (teacher files are read here).

    Raises:
        InputError: a teacher given twice. CheckpointError: a model cannot be found or read.
    """
    if len(set(map(str, models.teachers))) != len(models.teachers):
        raise InputError("--teacher: a teacher file is given twice")
    if not models.plain and not models.teachers:
        raise InputError("--no-plain-sam leaves no model to evaluate: give --teacher")
    base = TeacherSpec(sam=models.sam, detector="none", device=device,
                       teacher=models.teachers[0] if models.teachers else None).with_base()
    plain = TeacherSpec(sam=base.sam, detector="none", device=device)
    entries = [ModelEntry(PLAIN_SAM, plain, model_refs(plain, load_detector=False))] if models.plain else []
    for path in models.teachers:
        spec = TeacherSpec(sam=base.sam if models.plain or models.sam else None, detector="none", device=device,
                           teacher=str(path)).with_base()
        refs = model_refs(spec, load_detector=False)
        name = model_id(str(path))
        if name in {e.name for e in entries}:
            name = str(path)
        # model_refs names no base SAM exactly when the teacher decodes from an encoder of its own (or of the
        # teacher it is stacked on); teachers with the same such encoder share one encoding
        encoder = "base" if "sam" in refs else read_teacher(path).encoder_sha256
        entries.append(ModelEntry(name, spec, refs, encoder=encoder))
    return entries


def run_stability(inputs: Dataset, output: str | Path, models: StabilityModels | None = None,
                  config: StabilityConfig | None = None, job: JobOptions | None = None, *,
                  on_event: OnEvent | None = None, executor: Executor | None = None) -> dict[str, Any]:
    """Evaluate plain SAM and each teacher under Stable-SAM's random prompts; write the results as JSON.

    Args:
        inputs: a COCO file with full masks, and its image folder.
        output: the JSON file to write (see ``_results`` for its shape).
        models: plain SAM's base and the teachers (default: ``vit_h`` alone).
        config: the protocol (default ``StabilityConfig()``).
        job: workers, device, images per shard (``batch_size``, default 8), job directory (default ``OUTPUT``
            without ``.json`` + ``.job``), overwrite.
        on_event: ``progress`` after every shard; ``warning`` for missing images.
        executor: runs the shards instead of the one ``job`` asks for (tests).

    Returns:
        The output's contents plus ``encoder_calls`` (per image), ``seconds`` (per image, by stage),
        ``skipped_shards``, ``wall_s``, ``output``, ``job_dir``, ``errors_path``.

    Raises:
        InputError: bad input (no instance with a full mask), or no image exists. CheckpointError: a model
            cannot be had, or a teacher does not fit the base SAM. JobError: the job directory holds another
            job, or every image failed.
    """
    t0 = time.perf_counter()
    job, config, models = job or JobOptions(), config or StabilityConfig(), models or StabilityModels()
    output, images_dir, source = Path(output), inputs.images_dir, str(inputs.coco)
    data = load_coco(inputs.coco, images_dir=images_dir, allow_outside_images=inputs.allow_outside_images)
    by_image: dict[int, list[dict[str, Any]]] = {}
    for a in data["annotations"]:
        if a.get("segmentation") not in (None, [], {}) and not a.get("iscrowd"):
            by_image.setdefault(int(a["image_id"]), []).append(
                {"id": int(a["id"]), "category_id": int(a["category_id"]), "segmentation": a["segmentation"]})
    if not by_image:
        raise InputError(f"{source}: no annotation has a `segmentation` (a full mask; crowd regions do not "
                         "count): stability compares predicted masks with GT masks")
    entries = model_entries(models, device=job.device)
    tasks = [StabilityTask(int(im["id"]), str(resolve_image_path(images_dir, im["file_name"],
                                                                 allow_outside_images=inputs.allow_outside_images)),
                           int(im["height"]), int(im["width"]), by_image[int(im["id"])])
             for im in data["images"] if int(im["id"]) in by_image]
    check_images_exist([t.path for t in tasks], images_dir=images_dir, source=source, on_event=on_event)
    shard_size = job.unit(DEFAULT_SHARD_SIZE)
    shards = [tasks[i:i + shard_size] for i in range(0, len(tasks), shard_size)]
    jobdir = JobDir(job.job_dir_for(output))
    plan = "\n".join(f"{t.image_id}\t{t.path}" for t in tasks)
    manifest = {"omnilabel": __version__, "command": "stability", "input_sha256": file_sha256(inputs.coco),
                "images_sha256": text_sha256(plan), "n_images": len(tasks), "shard_size": shard_size,
                "config": config.to_dict(),
                "models": {e.name: {role: [ref.source, ref.sha256] for role, ref in sorted(e.refs.items())}
                           for e in entries}}
    jobdir.open(manifest, overwrite=job.overwrite)

    def worker_args() -> tuple:
        if job.address is None:
            resolved = [ModelEntry(e.name, e.spec, resolve_refs(e.refs, on_event=on_event), e.encoder)
                        for e in entries]
        else:
            resolved = entries
        return (resolved, config, category_names(data))

    skipped = run_unfinished_shards(jobdir, shards, worker_args=worker_args,
                                    executor=executor or executor_for(job, StabilityWorker, task_from_dict,
                                                                      on_event),
                                    on_event=on_event)
    errors_path = jobdir.path / "errors.jsonl"
    results, totals = _merge(jobdir, len(shards), entries, config, errors_path=errors_path)
    results["input"] = {"coco": str(Path(inputs.coco).resolve()), "images_dir": str(images_dir)}
    write_json_atomic(results, output)
    done = max(results["images"] - results["errors"], 1)
    return {**results, "encoder_calls": totals["encoder_calls"] / done,
            "seconds": {k: v / done for k, v in totals["seconds"].items()}, "skipped_shards": skipped,
            "wall_s": time.perf_counter() - t0, "output": str(output), "job_dir": str(jobdir.path),
            "errors_path": str(errors_path)}


def _merge(jobdir: JobDir, n_shards: int, entries: Sequence[ModelEntry], config: StabilityConfig, *,
           errors_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The output (``results``: model → prompt type → ``miou``, ``mbiou``, ``msf`` in percent, ``instances``,
    ``prompts``) from the shards' per-instance sums, and the per-stage totals."""
    sums = {e.name: {p.value: np.zeros(5) for p in config.prompts} for e in entries}  # Σiou Σbiou Σsf n_sf n
    errors: list[str] = []
    n_images = n_instances = n_empty = encoder_calls = 0
    seconds: dict[str, float] = {}
    for rec in finished_records(jobdir, n_shards, errors):
        n_images += 1
        n_instances += rec["counts"]["instances"]
        n_empty += rec["counts"]["empty_masks"]
        encoder_calls += rec["counts"]["encoder_calls"]
        for k, v in rec["seconds"].items():
            seconds[k] = seconds.get(k, 0.0) + v
        for inst in rec["instances"]:
            for name, by_type in inst["scores"].items():
                for ptype, (iou, biou, sf, n) in by_type.items():
                    sums[name][ptype] += [iou, biou, sf or 0.0, sf is not None, n]
    n_images += len(errors)
    write_errors(errors, errors_path)
    check_not_all_failed(n_images, len(errors), errors_path=errors_path)

    def pct(x: float, n: float) -> float | None:
        return round(100.0 * float(x) / float(n), 4) if n else None

    results = {name: {ptype: {"miou": pct(s[0], s[4]), "mbiou": pct(s[1], s[4]), "msf": pct(s[2], s[3]),
                              "instances": n_instances, "prompts": int(s[4])}
                      for ptype, s in by_type.items()} for name, by_type in sums.items()}
    models = []
    for e in entries:
        teacher = e.refs.get("teacher")
        source = str(e.spec.teacher if teacher is not None else e.spec.sam)
        models.append({"name": e.name, "kind": "sam" if teacher is None else "teacher", "id": model_id(source),
                       "source": source, "sha256": None if teacher is None else getattr(teacher, "sha256", None),
                       "encoder": e.encoder})
    out = {"omnilabel": __version__, "metric": "Stable-SAM (specs/stable-sam.md §5)",
           "units": "percent: mIoU, mBIoU and mSF x 100, as the paper reports them",
           "settings": {**config.to_dict(), "multimask_single_point": True},
           "images": n_images, "errors": len(errors), "instances": n_instances, "empty_masks": n_empty,
           "models": models, "results": results}
    return out, {"encoder_calls": encoder_calls, "seconds": seconds}
