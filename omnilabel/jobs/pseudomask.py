"""The ``pseudomask`` job: validate, plan shards, run the teacher on every unfinished shard, merge.

A worker reads its shard's images a few ahead on a background thread (``Throughput.prefetch``), encodes them
``Throughput.encoder_batch`` at a time, and results are written shard by shard into the job directory, so
memory does not grow with the dataset and a killed job resumes where it stopped. A missing or undecodable
image is recorded (``errors.jsonl`` in the job directory) and the job goes on. Workers get the models as
names and paths (``model_refs``) and find them on their own node.

With entity proposals (``PseudomaskConfig.proposals``, ``--proposals``) the entities file is read and checked
once, on the driver (``teachers.proposals.read_proposals``); each task carries its own image's entity masks
(RLE), so no worker reads the file. An image that needs them (tags, no labels) and is not in the file is left
out of the output, as an image that needs a detector is without one: kept with its tags unlabelled, it would
teach a student that its tagged objects are background. A warning counts them.

With a UOIS-SAM prompter (``TeacherSpec.prompter``, ``--prompter``) the tags/none images take the prompter's masks
instead (``teachers.prompted``), with or without a detector. With ``--clip`` each mask is classified; without,
every one takes a category the output adds for them, ``{"id": max(ids) + 1, "name": "object"}``, recorded as
the prompter's in ``info.omnilabel.prompter.category_id``. The manifest holds the prompter file's sha256 and
whether its masks are classified, so another prompter (or ``--clip``) is another job.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from omnilabel import __version__
from omnilabel.data.coco import annotations_by_image, category_names, load_coco, resolve_image_path
from omnilabel.data.maps import MapFolder
from omnilabel.data.weak import ImagePlan, WeakPlan, WeakType, plan_weak
from omnilabel.errors import InputError
from omnilabel.events import OnEvent, emit
from omnilabel.io import file_sha256
from omnilabel.jobs.jobdir import JobDir
from omnilabel.jobs.merge import merge_shards
from omnilabel.jobs.options import Dataset, JobOptions
from omnilabel.jobs.runner import Executor, check_images_exist, executor_for, run_unfinished_shards
from omnilabel.models.registry import WeightRef
from omnilabel.teachers.loading import (
    DEFAULT_CLIP,
    TeacherSpec,
    load_teachers,
    model_id,
    model_refs,
    model_source,
    refiner_mismatch,
    resolve_refs,
)
from omnilabel.teachers.pipeline import PipelineConfig, PseudomaskPipeline
from omnilabel.teachers.prompted import check_prompter
from omnilabel.teachers.proposals import ProposalConfig, ProposalIndex, read_proposals

#: Images per shard (``--batch-size``): the unit of resume (and, on Ray, of scheduling).
DEFAULT_SHARD_SIZE = 16


@dataclass(frozen=True)
class Throughput:
    """How fast a worker labels its images; the output does not depend on it.

    Not part of the job manifest, so a job may be resumed with other values. Plain data: it travels to
    Ray workers pickled inside the worker arguments.

    Attributes:
        encoder_batch: images per SAM encoder forward pass (``--encoder-batch``). 1 (the default) suits a
            CPU; a GPU encodes several images per pass faster, memory permitting (an out-of-memory pass is
            retried one image at a time).
        prefetch: images read and decoded ahead on a background thread (``--prefetch``), overlapping the
            reads with the models; 0 reads in the worker's own thread. 2 keeps a GPU fed at little memory.
    """

    encoder_batch: int = 1
    prefetch: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.encoder_batch, bool) or not isinstance(self.encoder_batch, int) or self.encoder_batch < 1:
            raise InputError(f"--encoder-batch must be an integer >= 1, got {self.encoder_batch!r}")
        if isinstance(self.prefetch, bool) or not isinstance(self.prefetch, int) or self.prefetch < 0:
            raise InputError(f"--prefetch must be an integer >= 0 (0: no read-ahead), got {self.prefetch!r}")


@dataclass(frozen=True)
class PseudomaskConfig:
    """What a pseudomask job computes (the models, the setting with its thresholds), and how fast.

    ``proposals``: an entities file (``omnilabel entities``) whose masks label the tags/none images instead of
    the detector; ``pipeline.proposals`` then holds its setting (default ``ProposalConfig()``).
    """

    teachers: TeacherSpec = field(default_factory=TeacherSpec)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    throughput: Throughput = field(default_factory=Throughput)
    proposals: str | Path | None = None


@dataclass(frozen=True)
class ImageTask:
    """One image to label; plain data, so it pickles to any worker.

    Attributes:
        image_id: COCO image id.
        path: the image file.
        annotations: the image's input annotations.
        plan: what to do with them (``omnilabel.data.weak.plan_weak``, made once on the driver).
        proposals: with ``--proposals``, for an image whose plan detects, its entities
            (``{"entity_id", "segmentation"}``, ``read_proposals``); else None.
    """

    image_id: int
    path: str
    annotations: list[dict[str, Any]]
    plan: ImagePlan
    proposals: list[dict[str, Any]] | None = None


class PseudomaskWorker:
    """Loads the models once, then labels image tasks. The unit a job runs in-process or on a worker.

    Args:
        spec: which models to load.
        models: role → ``WeightRef`` from the driver (``model_refs``), found on this worker's node (downloaded
            into its cache where allowed), or an already local ``Path``.
        categories: category id → name of the dataset.
        config: the pipeline setting.
        throughput: encoder batch and read-ahead (``Throughput``; default ``Throughput()``).
        maps: where the uncertainty maps go when ``spec`` has a refiner (required then).
    """

    def __init__(self, spec: TeacherSpec, models: Mapping[str, WeightRef | Path], categories: dict[int, str],
                 config: PipelineConfig, throughput: Throughput | None = None, maps: MapFolder | None = None) -> None:
        if spec.refiner is not None and maps is None:
            raise InputError("a pseudomask worker with a refiner needs a folder for the uncertainty maps")
        self.maps = maps
        self.throughput = throughput if throughput is not None else Throughput()
        paths = resolve_refs(models)
        self.pipeline = PseudomaskPipeline(load_teachers(spec, paths, categories=categories), categories,
                                           config=config)

    def __call__(self, tasks: Sequence[ImageTask]) -> list[dict[str, Any]]:
        """One record per task, in task order: ``annotations``, ``counts``, ``seconds``, or ``error``.

        Images are read ahead on a background thread (``Throughput.prefetch``) and labelled in chunks of
        ``Throughput.encoder_batch`` (``PseudomaskPipeline.label_images``). A missing or undecodable image,
        or one that cannot be labelled in the memory available, gets an ``error`` record; the others go on.
        ``seconds["read"]`` is the time spent reading that image, on whichever thread read it.
        """
        from omnilabel.data.prefetch import prefetch_images

        records: list[dict[str, Any] | None] = [None] * len(tasks)
        chunk: list[tuple[int, Any, float]] = []
        reads = prefetch_images([task.path for task in tasks], depth=self.throughput.prefetch, read=_timed_read)
        with contextlib.closing(reads):
            for i, got in reads:
                if isinstance(got, InputError):
                    records[i] = {"image_id": tasks[i].image_id, "file_name": tasks[i].path, "error": str(got)}
                    continue
                chunk.append((i, *got))
                if len(chunk) == self.throughput.encoder_batch:
                    self._label_chunk(chunk, tasks, records)
                    chunk = []
            if chunk:
                self._label_chunk(chunk, tasks, records)
        return records  # type: ignore[return-value]

    def _label_chunk(self, chunk: list[tuple[int, Any, float]], tasks: Sequence[ImageTask],
                     records: list[dict[str, Any] | None]) -> None:
        """Label ``(task index, image, read seconds)`` items together and fill in their records.

        Out of memory is handled per image by the pipeline: a batched encode is retried one image at a
        time, a decoder call by halves of its prompt batch (``SamTeacher.predict``); only an image that does
        not fit even so fails, with an ``error`` record.
        """
        items = [(image, tasks[i].annotations, tasks[i].plan) for i, image, _ in chunk]
        results = self.pipeline.label_images(items, encoder_batch=self.throughput.encoder_batch,
                                             proposals=[tasks[i].proposals for i, _, _ in chunk])
        for (i, _, read_s), result in zip(chunk, results, strict=True):
            task = tasks[i]
            rec: dict[str, Any] = {"image_id": task.image_id}
            if isinstance(result, MemoryError):
                rec.update(file_name=task.path, error=f"out of memory: {result}")
            else:
                seconds = dict(result.seconds)
                seconds["read"] = read_s
                for pos, u in result.maps.items():
                    assert self.maps is not None
                    result.annotations[pos]["omnilabel"]["uncertainty"] = self.maps.write(task.image_id, pos, u)
                rec.update(annotations=result.annotations, counts=dict(result.counts), seconds=seconds)
            records[i] = rec

    @property
    def encoder_calls(self) -> int:
        return self.pipeline.teachers.sam.encoder_calls


def _timed_read(path: str | Path) -> tuple[Any, float]:
    """``read_image_rgb`` and the seconds it took (its ``InputError`` propagates)."""
    from omnilabel.data.images import read_image_rgb

    t0 = time.perf_counter()
    image = read_image_rgb(path)
    return image, time.perf_counter() - t0


def task_from_dict(d: dict[str, Any]) -> ImageTask:
    """Inverse of ``dataclasses.asdict`` for a task (how tasks travel to Ray workers)."""
    return ImageTask(int(d["image_id"]), str(d["path"]), list(d["annotations"]), ImagePlan.from_dict(d["plan"]),
                     d.get("proposals"))


def plan_tasks(data: dict[str, Any], images_dir: Path, plans: Sequence[ImagePlan], *,
               allow_outside_images: bool, proposals: ProposalIndex | None = None) -> list[ImageTask]:
    """One task per planned image that is not left out, in file order; with ``proposals``, an image whose plan
    detects carries its entities."""
    by_image = annotations_by_image(data)
    paths = {int(im["id"]): im["file_name"] for im in data["images"]}
    return [ImageTask(p.image_id, str(resolve_image_path(images_dir, paths[p.image_id],
                                                         allow_outside_images=allow_outside_images)),
                      by_image[p.image_id], p,
                      proposals.entities[p.image_id] if proposals is not None and p.detect is not None else None)
            for p in plans if p.left_out is None]


def _proposal_setting(config: PseudomaskConfig) -> tuple[PipelineConfig, Path | None]:
    """The pipeline setting with its ``proposals`` filled in when a file is given, and the file.

    Raises:
        InputError: a proposals setting without a file, or a file with a refiner.
    """
    pipeline = config.pipeline
    if config.proposals is None:
        if pipeline.proposals is not None:
            raise InputError("the pipeline has a proposals setting but no entities file was given (--proposals)")
        return pipeline, None
    if config.teachers.refiner is not None:
        raise InputError("--refiner cannot score entity proposals (--proposals): their masks come from the entities "
                         "file with no SAM logits for the refiner to refine; run without --refiner, or run "
                         "`omnilabel uncertainty` on a file made without --proposals")
    if pipeline.proposals is None:
        pipeline = replace(pipeline, proposals=ProposalConfig())
    return pipeline, Path(config.proposals)


#: The name of the category of class-agnostic prompter masks (``--prompter`` without ``--clip``).
PROMPTER_CATEGORY = "object"


def _prompter_setting(pipeline: PipelineConfig, spec: TeacherSpec,
                      data: dict[str, Any]) -> tuple[PipelineConfig, dict[str, Any] | None]:
    """The pipeline setting with its prompter fields filled in, and the category the output adds (or None).

    With ``--clip`` the masks are classified (``prompter_clip``, by default ``ProposalConfig()``); without, they
    take a new category id, one above the dataset's largest.

    Raises:
        InputError: a prompter with proposals or ``--refiner`` (``teachers.prompted.check_prompter``), or
            prompter settings without a prompter.
    """
    if spec.prompter is None:
        if pipeline.prompter_category is not None or pipeline.prompter_clip is not None:
            raise InputError("the pipeline has prompter settings but no prompter file was given (--prompter)")
        return pipeline, None
    category = None
    if spec.clip is not None:
        pipeline = replace(pipeline, prompter_category=None, prompter_clip=pipeline.prompter_clip or ProposalConfig())
    else:
        category = {"id": max((int(c["id"]) for c in data["categories"]), default=0) + 1,
                    "name": PROMPTER_CATEGORY, "supercategory": PROMPTER_CATEGORY}
        pipeline = replace(pipeline, prompter_category=category["id"], prompter_clip=None)
    check_prompter(pipeline, categories=category_names(data), has_refiner=spec.refiner is not None,
                   has_classifier=spec.clip is not None)
    return pipeline, category


def _join_proposals(plan: WeakPlan, data: dict[str, Any], path: Path, *, source: str,
                    on_event: OnEvent | None) -> tuple[WeakPlan, ProposalIndex]:
    """Read the entities of the images that need them; leave out the images the file does not have.

    Raises:
        InputError: a bad entities file (``read_proposals``), or none of the images that need it is in it.
    """
    need = [p.image_id for p in plan.kept if p.detect is not None]
    index = read_proposals(path, data["images"], need=need, source=source)
    if index.missing:
        missing = set(index.missing)
        plan = replace(plan, images=tuple(replace(p, left_out=f"not in the proposals file {path}")
                                          if p.image_id in missing else p for p in plan.images))
        emit(on_event, "warning", message=f"{len(missing)} of the {len(need)} image(s) with image-level tags or no "
                                          f"labels are not in {path} and are left out of the output (was it made "
                                          f"from {source}?)")
    if not plan.kept:
        raise InputError(f"{path}: none of the {len(need)} images of {source} that need proposals is in it; make it "
                         f"with `omnilabel entities {source}`")
    return plan, index


def recorded_teachers(spec: TeacherSpec) -> dict[str, Any]:
    """What a pseudomask file records of the SAMs that made it, for ``omnilabel uncertainty`` to load them
    again: the base SAM (a name, or an absolute path), each teacher file (absolute), CLIP, and the multimask
    rule. Their sha256s are in ``info.omnilabel.models``."""
    def recorded(name: str | None) -> str | None:
        return None if name is None else model_source(name)

    roles = {role: recorded(path) for role, path in spec.teacher_files().items() if role != "refiner"}
    return {"sam": recorded(spec.sam), **roles, "clip": recorded(spec.clip),
            "multimask_single_point": spec.multimask_single_point}


def shards_of(tasks: Sequence[ImageTask], shard_size: int) -> list[list[ImageTask]]:
    return [list(tasks[i:i + shard_size]) for i in range(0, len(tasks), shard_size)]


def run_pseudomask(inputs: Dataset, output: str | Path, job: JobOptions | None = None,
                   config: PseudomaskConfig | None = None, *, on_event: OnEvent | None = None,
                   executor: Executor | None = None) -> dict[str, Any]:
    """Run the teacher over a dataset and write the pseudomask COCO file.

    Args:
        inputs: the weak COCO file and its image folder.
        output: the pseudomask COCO JSON to write.
        job: workers, device, shard size (``batch_size``, default 16), job directory (default: ``OUTPUT``
            without ``.json`` + ``.job``), overwrite.
        config: models and setting.
        on_event: ``progress`` after every shard, ``warning`` for images left out or missing.
        executor: runs the shards instead of the one ``job`` asks for (tests, benchmarks).

    Returns:
        Summary: ``counts`` per weak type (+ gt, empty, duplicate), ``seconds`` per stage, ``images``,
        ``errors``, ``annotations``, ``skipped_shards``, ``wall_s``, ``output``, ``job_dir``, ``errors_path``,
        ``left_out`` (images that need a detector when there is none; not in the output), ``missing_proposals``
        (with proposals: images that need them and are not in the file; not in the output), ``missing``.

    Raises:
        InputError: bad input or flags, a bad entities file (``read_proposals``), ``--refiner`` with proposals
            or a prompter, a prompter with proposals, or no image exists (nothing is written). CheckpointError: a
            model cannot be had, or the prompter was trained against another SAM than the job's (when the
            models load, before any image). JobError: the job directory holds a different job, or every image
            failed (the output is not written).
    """
    t_start = time.perf_counter()
    job, config = job or JobOptions(), config or PseudomaskConfig()
    output, images_dir = Path(output), inputs.images_dir
    spec = replace(config.teachers, device=job.device).with_base()
    source = str(inputs.coco)
    pipeline, proposals_path = _proposal_setting(config)
    data = load_coco(inputs.coco, images_dir=images_dir, allow_outside_images=inputs.allow_outside_images)
    pipeline, prompter_category = _prompter_setting(pipeline, spec, data)
    prompted = spec.prompter is not None
    plan = plan_weak(data, pipeline.weak, has_detector=spec.has_detector or proposals_path is not None or prompted,
                     source=source)
    plan.raise_problems(source)
    index = None
    if proposals_path is not None:
        plan, index = _join_proposals(plan, data, proposals_path, source=source, on_event=on_event)
    tasks = plan_tasks(data, images_dir, plan.images, allow_outside_images=inputs.allow_outside_images,
                       proposals=index)
    missing = check_images_exist([t.path for t in tasks], images_dir=images_dir, source=source, on_event=on_event)
    if plan.left_out and index is None:
        emit(on_event, "warning", message=f"{len(plan.left_out)} image(s) with image-level tags or no labels need "
                                          "a detector and are left out of the output (drop `--detector none` to "
                                          "label them)")
    shard_size = job.unit(DEFAULT_SHARD_SIZE)
    shards = shards_of(tasks, shard_size)
    if index is None and not prompted:
        load_detector = plan.uses_detector(refine_points=pipeline.refine)
    else:  # proposals or the prompter label the tags/none images; a detector is left only the points to refine
        load_detector = spec.has_detector and pipeline.refine and any(p.has(WeakType.POINT) for p in plan.kept)
    jobdir = JobDir(job.job_dir_for(output))
    manifest = {"omnilabel": __version__, "command": "pseudomask", "input_sha256": file_sha256(inputs.coco),
                "images_dir": str(images_dir), "n_images": len(tasks), "shard_size": shard_size,
                "pipeline": asdict(pipeline), "teacher": {**asdict(spec), "device": None},
                "models": {"sam": model_id(str(spec.sam)),
                           "detector": model_id(spec.detector) if load_detector else None}}
    proposals_record: dict[str, Any] | None = None
    if proposals_path is not None:
        assert pipeline.proposals is not None
        manifest["models"]["classifier"] = model_id(spec.clip or DEFAULT_CLIP)
        proposals_record = {"file": str(proposals_path.resolve()), "sha256": file_sha256(proposals_path),
                            "threshold": pipeline.proposals.threshold, "classifier": manifest["models"]["classifier"]}
        manifest["proposals"] = {"sha256": proposals_record["sha256"]}
    classify_prompted = prompted and pipeline.prompter_clip is not None
    # Teacher files are read (a missing or foreign one fails here, before the job directory is written) and
    # hashed once; workers get names and paths and find them on their own nodes.
    refs = model_refs(spec, load_detector=load_detector,
                      load_classifier=proposals_path is not None or classify_prompted)
    prompter_record: dict[str, Any] | None = None
    if prompted:
        assert spec.prompter is not None
        manifest["models"]["prompter"] = model_id(spec.prompter)
        if classify_prompted:
            manifest["models"]["classifier"] = model_id(spec.clip or DEFAULT_CLIP)
        manifest["prompter"] = {"sha256": refs["prompter"].sha256, "classify": classify_prompted}
        prompter_record = {"file": refs["prompter"].source, "sha256": refs["prompter"].sha256,
                           "backbone": refs["prompter_backbone"].source,
                           "classifier": manifest["models"].get("classifier") if classify_prompted else None,
                           "threshold": pipeline.prompter_clip.threshold if pipeline.prompter_clip else None,
                           "category_id": None if prompter_category is None else prompter_category["id"]}
    if (mismatch := refiner_mismatch(spec, refs)) is not None:
        emit(on_event, "warning", message=mismatch)
    for role, path in spec.teacher_files().items():
        manifest["models"][role] = model_id(path)
        manifest["models"][role + "_sha256"] = refs[role].sha256
    jobdir.open(manifest, overwrite=job.overwrite)
    maps = MapFolder.beside(output) if spec.refiner is not None else None
    kept = {p.image_id for p in plan.kept}
    data = {**data, "images": [im for im in data["images"] if int(im["id"]) in kept]}

    def worker_args() -> tuple:
        # Every worker runs on this machine without --address: find (or download, with progress) the models
        # here once and hand over their paths; on a cluster each worker finds them on its own node.
        models = resolve_refs(refs, on_event=on_event) if job.address is None else refs
        return (spec, models, category_names(data), pipeline, config.throughput, maps)

    skipped = run_unfinished_shards(jobdir, shards, worker_args=worker_args,
                                    executor=executor or executor_for(job, PseudomaskWorker, task_from_dict, on_event),
                                    on_event=on_event)
    header = {k: v for k, v in data.items() if k != "annotations"}
    header["info"] = {**(data.get("info") or {}), "omnilabel": {"command": "pseudomask",
                                                                 "weak": pipeline.weak.value,
                                                                 "models": manifest["models"],
                                                                 "teachers": recorded_teachers(spec),
                                                                 "version": __version__}}
    if spec.refiner is not None:
        header["info"]["omnilabel"]["uncertainty"] = {"refiner": manifest["models"]["refiner"],
                                                      "refiner_sha256": manifest["models"]["refiner_sha256"],
                                                      "version": __version__}
    if proposals_record is not None:
        header["info"]["omnilabel"]["proposals"] = proposals_record
    if prompter_record is not None:
        header["info"]["omnilabel"]["prompter"] = prompter_record
    if prompter_category is not None:  # the category of the class-agnostic prompter masks
        header["categories"] = [*header.get("categories", []), prompter_category]
    errors_path = jobdir.path / "errors.jsonl"
    summary = merge_shards(jobdir, len(shards), header=header, output=output, errors_path=errors_path)
    summary.update(skipped_shards=skipped, wall_s=time.perf_counter() - t_start, output=str(output),
                   job_dir=str(jobdir.path), errors_path=str(errors_path),
                   left_out=len(plan.left_out) if index is None else 0,
                   missing_proposals=0 if index is None else len(index.missing), missing=missing)
    return summary
