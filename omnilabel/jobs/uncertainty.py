"""The ``uncertainty`` job: add SUM uncertainty maps to an existing pseudomask file.

SUM's ``u = |σ(s) − σ(r)|`` needs the logits ``s`` that made each pseudomask, which a COCO file does not
hold. So each image is encoded again (once) and every pseudomask decoded again from the prompts it records
(``omnilabel.prompt``, written at full precision) with the SAMs the file records (``info.omnilabel.teachers``;
a teacher file that is not the one the file was made with, by sha256, is refused). The decoded mask must be
the stored one — up to ``MISMATCH_PIXELS`` pixels or ``MISMATCH_FRACTION`` of the masks' union, for float
rounding on other hardware — else the image fails with a message that names the annotation: the file was
made by other models. The refiner then scores each pseudomask (``omnilabel.teachers.uncertainty``).

Which SAM decodes what, as in ``pseudomask``: boxes and detections (``weak`` ``boxes``, ``tags``, ``none``)
with box-SAM from ``prompt.bbox``; points with BP-SAM from ``prompt.point`` + ``prompt.bbox``, or with P-SAM
from ``prompt.point`` alone (``--no-refine`` files). GT annotations are copied untouched and get no map.

The output is the input file with ``omnilabel.uncertainty`` (a 16-bit PNG under ``OUTPUT.uncertainty/``,
``omnilabel.data.maps``) and ``omnilabel.uncertainty_mean`` on every pseudomask of the images that did not
fail; annotation ids are kept. The job is resumable and runs in-process or on Ray like ``pseudomask``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from omnilabel import __version__
from omnilabel.data.coco import category_names, load_coco, resolve_image_path
from omnilabel.data.maps import MapFolder
from omnilabel.data.weak import WeakType
from omnilabel.errors import CheckpointError, InputError
from omnilabel.events import OnEvent, emit
from omnilabel.io import file_sha256, write_json_atomic
from omnilabel.jobs.jobdir import JobDir
from omnilabel.jobs.merge import finished_records, write_errors
from omnilabel.jobs.options import Dataset, JobOptions
from omnilabel.jobs.runner import (
    Executor,
    check_images_exist,
    check_not_all_failed,
    executor_for,
    per_image,
    run_unfinished_shards,
)
from omnilabel.models.registry import WeightRef
from omnilabel.ops.masks import segmentation_to_rle
from omnilabel.teachers.loading import (
    ROLES,
    TeacherSpec,
    load_teachers,
    model_id,
    model_refs,
    refiner_mismatch,
    resolve_refs,
)
from omnilabel.teachers.uncertainty import UncertaintyScorer, prompt_points

#: Images per shard (``--batch-size``).
DEFAULT_SHARD_SIZE = 16
#: A mask decoded again may differ from the stored one at this many pixels ...
MISMATCH_PIXELS = 2
#: ... or at this fraction of the two masks' union, whichever is larger (float rounding, never a model change).
MISMATCH_FRACTION = 0.002
_BOX_WEAK = (WeakType.BOX.value, WeakType.TAG.value, WeakType.NONE.value)


@dataclass(frozen=True)
class ScoreTask:
    """One image whose pseudomasks to score; plain data.

    Attributes:
        image_id: COCO image id. path: the image file.
        annotations: its pseudomasks (``id``, ``category_id``, ``segmentation``, ``omnilabel``).
    """

    image_id: int
    path: str
    annotations: list[dict[str, Any]]


def task_from_dict(d: dict[str, Any]) -> ScoreTask:
    return ScoreTask(int(d["image_id"]), str(d["path"]), list(d["annotations"]))


def _prompt(ann: Mapping[str, Any], source: str) -> tuple[str, np.ndarray, np.ndarray]:
    """``(role, point xy or NaN, box xyxy or NaN)`` of a pseudomask, from its ``omnilabel`` record.

    Raises:
        InputError: naming the file, the annotation and the field.
    """
    meta = ann.get("omnilabel") or {}
    prompt = meta.get("prompt")
    where = f"{source}: annotation id={ann.get('id')}"
    weak = meta.get("weak")
    if not isinstance(prompt, dict):
        raise InputError(f"{where}: omnilabel.prompt: a pseudomask needs the prompt that made it, got {prompt!r}")
    if "entity_id" in prompt:
        raise InputError(f"{where}: omnilabel.prompt: an entity proposal (pseudomask --proposals) has no SAM prompt "
                         "to decode again, so the refiner cannot score it; uncertainty scores files made without "
                         "--proposals")
    point, box = np.full(2, np.nan), np.full(4, np.nan)
    try:
        if "point" in prompt:
            point = np.asarray(prompt["point"], dtype=np.float64).reshape(2)
        if "bbox" in prompt:
            x, y, w, h = (float(v) for v in prompt["bbox"])
            box = np.array([x, y, x + w, y + h])
    except (TypeError, ValueError):
        raise InputError(f"{where}: omnilabel.prompt: expected point [x, y] and/or bbox [x, y, w, h], "
                         f"got {prompt!r}") from None
    if weak == WeakType.POINT.value and np.isfinite(point).all():
        return ("teacher_refine" if np.isfinite(box).all() else "teacher_point"), point, box
    if weak in _BOX_WEAK and np.isfinite(box).all():
        return "teacher_box", point, box
    raise InputError(f"{where}: omnilabel.prompt {prompt!r} does not fit omnilabel.weak {weak!r} (points need "
                     "prompt.point, boxes and detections prompt.bbox)")


class UncertaintyWorker:
    """Loads the file's SAMs and the refiner once, then scores the pseudomasks of image tasks.

    Args:
        spec: the recorded SAMs, with ``refiner``.
        models: role → ``WeightRef`` (``model_refs``) or a local ``Path``.
        categories: category id → name (class-aware teachers).
        maps: where the maps go.
        source: the input file's name, for messages.
    """

    def __init__(self, spec: TeacherSpec, models: Mapping[str, WeightRef | Path], categories: dict[int, str],
                 maps: MapFolder, source: str) -> None:
        self.teachers = load_teachers(spec, resolve_refs(models), categories=categories)
        if self.teachers.refiner is None:
            raise InputError("the uncertainty job needs a refiner")
        self.scorer = UncertaintyScorer(self.teachers.refiner)
        self.maps, self.source = maps, source

    def __call__(self, tasks: Sequence[ScoreTask]) -> list[dict[str, Any]]:
        """One record per task: ``image_id`` and ``annotations`` ([{``id``, ``uncertainty``,
        ``uncertainty_mean``}]), or ``error`` for an image that is missing, unreadable or does not decode to
        its stored masks."""
        return per_image(tasks, lambda image, task: {"image_id": task.image_id,
                                                     "annotations": self._score(image, task)})

    def _sam(self, role: str) -> Any:
        t = self.teachers
        own = {"teacher_box": t.box_sam, "teacher_point": t.point_sam, "teacher_refine": t.refine_sam}[role]
        return own or t.sam

    def _score(self, image: np.ndarray, task: ScoreTask) -> list[dict[str, Any]]:
        anns = task.annotations
        prompts = [_prompt(a, self.source) for a in anns]
        emb = self.teachers.sam.encode(image)
        n = len(anns)
        g = self.teachers.sam.sam.prompt_encoder.mask_input_size
        logits = np.zeros((n, *g), dtype=np.float32)
        h, w = emb.original_size
        for role in sorted({r for r, _, _ in prompts}):
            rows = [i for i, (r, _, _) in enumerate(prompts) if r == role]
            pts = np.stack([prompts[i][1] for i in rows])
            bxs = np.stack([prompts[i][2] for i in rows])
            out = self._sam(role).predict(emb, points_xy=None if role == "teacher_box" else pts,
                                          boxes_xyxy=None if role == "teacher_point" else bxs,
                                          prompt_data={"category_ids": np.array([int(anns[i]["category_id"])
                                                                                 for i in rows])})
            for j, i in enumerate(rows):
                self._check_same(anns[i], out.masks[j], h, w)
                logits[i] = out.low_res_logits[j]
        points = prompt_points(np.stack([p for _, p, _ in prompts]), np.stack([b for _, _, b in prompts]))
        scored = []
        for ann, (u, mean) in zip(anns, self.scorer.score(emb, logits, points), strict=True):
            scored.append({"id": int(ann["id"]), "uncertainty": self.maps.write(task.image_id, int(ann["id"]), u),
                           "uncertainty_mean": round(mean, 6)})
        return scored

    def _check_same(self, ann: Mapping[str, Any], mask: np.ndarray, h: int, w: int) -> None:
        from pycocotools import mask as mask_utils

        stored = mask_utils.decode(segmentation_to_rle(ann["segmentation"], h, w)).astype(bool)
        diff = int((stored != mask).sum())
        union = int((stored | mask).sum())
        if diff > max(MISMATCH_PIXELS, MISMATCH_FRACTION * union):
            raise InputError(f"annotation id={ann['id']}: decoding its omnilabel.prompt again gives a mask that "
                             f"differs from the stored one at {diff} of {union} pixels; the file was made with "
                             f"other models than those it records ({ann['omnilabel'].get('teacher')}) or edited")


@dataclass(frozen=True)
class UncertaintyConfig:
    """What the ``uncertainty`` job uses.

    Attributes:
        refiner: the refiner file (``finetune-teacher --prompts refine``).
        sam: the base SAM instead of the one the file records (a moved checkpoint; the masks are still
            checked), or None.
    """

    refiner: str
    sam: str | None = None


def recorded_spec(data: Mapping[str, Any], config: UncertaintyConfig, *, device: str, source: str) -> TeacherSpec:
    """The SAMs a pseudomask file records (``info.omnilabel.teachers``), with the refiner.

    Raises:
        InputError: the file records none (not a pseudomask file of this version).
    """
    info = (data.get("info") or {}).get("omnilabel") or {}
    rec = info.get("teachers")
    if not isinstance(rec, dict) or not rec.get("sam"):
        raise InputError(f"{source}: info.omnilabel.teachers: the file does not record the SAMs that made it; "
                         "it must come from `omnilabel pseudomask` (or rerun pseudomask with --refiner)")
    roles = {role: str(rec[role]) for role in ROLES if role != "refiner" and rec.get(role)}
    return TeacherSpec(sam=config.sam or str(rec["sam"]), detector="none", device=device,
                       multimask_single_point=bool(rec.get("multimask_single_point", True)),
                       clip=rec.get("clip"), refiner=config.refiner, **roles)


def _check_same_teachers(refs: Mapping[str, WeightRef], data: Mapping[str, Any], source: str) -> None:
    models = ((data.get("info") or {}).get("omnilabel") or {}).get("models") or {}
    for role, ref in refs.items():
        recorded = models.get(f"{role}_sha256")
        if role.startswith("teacher") and recorded and recorded != ref.sha256:
            raise CheckpointError(f"{source} was made with --{role.replace('_', '-')} {models.get(role)} (sha256 "
                                  f"{recorded[:12]}…), but {ref.source} has sha256 {str(ref.sha256)[:12]}…; "
                                  "the uncertainty of a pseudomask is computed with the teacher that made it")


def run_uncertainty(inputs: Dataset, output: str | Path, config: UncertaintyConfig, job: JobOptions | None = None,
                    *, on_event: OnEvent | None = None, executor: Executor | None = None) -> dict[str, Any]:
    """Add uncertainty maps to every pseudomask of a pseudomask file and write the result.

    Args:
        inputs: the pseudomask file and its image folder.
        output: the COCO file to write (its maps go to ``OUTPUT.uncertainty/``).
        config: the refiner (and a base SAM override).
        job: workers, device, shard size (``batch_size``, default 16), job directory (default ``OUTPUT``
            without ``.json`` + ``.job``), overwrite.
        on_event: ``progress`` after every shard; ``warning`` for missing images.
        executor: runs the shards instead of the one ``job`` asks for (tests).

    Returns:
        ``images``, ``errors``, ``scored`` (pseudomasks with a map), ``mean_uncertainty`` (their mean
        ``uncertainty_mean``), ``skipped_shards``, ``wall_s``, ``output``, ``maps``, ``job_dir``, ``errors_path``.

    Raises:
        InputError: bad input (no pseudomask, a pseudomask without its prompt) or no image exists.
        CheckpointError: a recorded teacher is not the file that made the pseudomasks, or the refiner is not a
            refiner. JobError: the job directory holds another job, or every image failed.
    """
    t0 = time.perf_counter()
    job = job or JobOptions()
    output, images_dir, source = Path(output), inputs.images_dir, str(inputs.coco)
    data = load_coco(inputs.coco, images_dir=images_dir, allow_outside_images=inputs.allow_outside_images)
    spec = recorded_spec(data, config, device=job.device, source=source).with_base()
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in data["annotations"]:
        if (ann.get("omnilabel") or {}).get("source") == "pseudo":
            _prompt(ann, source)
            by_image.setdefault(int(ann["image_id"]), []).append(ann)
    if not by_image:
        raise InputError(f"{source}: no annotation has omnilabel.source 'pseudo'; uncertainty scores the "
                         "pseudomasks of an `omnilabel pseudomask` output")
    refs = model_refs(spec, load_detector=False)
    _check_same_teachers(refs, data, source)
    if (mismatch := refiner_mismatch(spec, refs)) is not None:
        emit(on_event, "warning", message=mismatch)
    tasks = [ScoreTask(int(im["id"]), str(resolve_image_path(images_dir, im["file_name"],
                                                             allow_outside_images=inputs.allow_outside_images)),
                       by_image[int(im["id"])]) for im in data["images"] if int(im["id"]) in by_image]
    check_images_exist([t.path for t in tasks], images_dir=images_dir, source=source, on_event=on_event)
    shard_size = job.unit(DEFAULT_SHARD_SIZE)
    shards = [tasks[i:i + shard_size] for i in range(0, len(tasks), shard_size)]
    maps = MapFolder.beside(output)
    jobdir = JobDir(job.job_dir_for(output))
    manifest = {"omnilabel": __version__, "command": "uncertainty", "input_sha256": file_sha256(inputs.coco),
                "images_dir": str(images_dir), "n_images": len(tasks), "shard_size": shard_size,
                "teacher": {**asdict(spec), "device": None}, "refiner_sha256": refs["refiner"].sha256,
                "maps": maps.root}
    jobdir.open(manifest, overwrite=job.overwrite)

    def worker_args() -> tuple:
        models = resolve_refs(refs, on_event=on_event) if job.address is None else refs
        return (spec, models, category_names(data), maps, source)

    skipped = run_unfinished_shards(jobdir, shards, worker_args=worker_args,
                                    executor=executor or executor_for(job, UncertaintyWorker, task_from_dict,
                                                                      on_event),
                                    on_event=on_event)
    errors_path = jobdir.path / "errors.jsonl"
    summary = _merge(jobdir, len(shards), data, output=output, errors_path=errors_path,
                     refiner={"refiner": model_id(config.refiner), "refiner_sha256": refs["refiner"].sha256})
    summary.update(skipped_shards=skipped, wall_s=time.perf_counter() - t0, output=str(output), maps=maps.root,
                   job_dir=str(jobdir.path), errors_path=str(errors_path))
    return summary


def _merge(jobdir: JobDir, n_shards: int, data: dict[str, Any], *, output: Path, errors_path: Path,
           refiner: dict[str, Any]) -> dict[str, Any]:
    """Write the input with the shards' scores (``omnilabel.uncertainty``, ``uncertainty_mean``) added; a
    pseudomask of a failed image loses any older score, so every map in the output is this refiner's."""

    scores: dict[int, dict[str, Any]] = {}
    errors: list[str] = []
    n_images = 0
    for rec in finished_records(jobdir, n_shards, errors):
        n_images += 1
        for s in rec["annotations"]:
            scores[int(s["id"])] = s
    n_images += len(errors)
    write_errors(errors, errors_path)
    check_not_all_failed(n_images, len(errors), errors_path=errors_path)
    annotations = []
    for ann in data["annotations"]:
        meta = dict(ann.get("omnilabel") or {})
        if meta.get("source") == "pseudo":
            meta.pop("uncertainty", None)
            meta.pop("uncertainty_mean", None)
            s = scores.get(int(ann["id"]))
            if s is not None:
                meta.update(uncertainty=s["uncertainty"], uncertainty_mean=s["uncertainty_mean"])
            ann = {**ann, "omnilabel": meta}
        annotations.append(ann)
    info = dict(data.get("info") or {})
    info["omnilabel"] = {**(info.get("omnilabel") or {}), "uncertainty": {**refiner, "version": __version__}}
    write_json_atomic({**data, "info": info, "annotations": annotations}, output)
    means = [s["uncertainty_mean"] for s in scores.values()]
    return {"images": n_images, "errors": len(errors), "scored": len(scores),
            "mean_uncertainty": float(np.mean(means)) if means else float("nan")}
