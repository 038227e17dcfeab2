"""The ``pseudomask`` job: validate, plan shards, run the teacher on every unfinished shard, merge.

Images are read one at a time and results are written shard by shard into the job directory, so memory
does not grow with the dataset and a killed job resumes where it stopped. A missing or undecodable image
is recorded (``errors.jsonl`` in the job directory) and the job goes on.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omnilabel import __version__
from omnilabel.data.coco import annotations_by_image, category_names, load_coco, resolve_image_path
from omnilabel.data.weak import WeakType
from omnilabel.errors import InputError
from omnilabel.io import file_sha256
from omnilabel.jobs.jobdir import JobDir
from omnilabel.jobs.merge import merge_shards
from omnilabel.jobs.runner import Executor, OnProgress, default_job_dir, run_shards_in_process, run_unfinished_shards
from omnilabel.teachers.loading import TeacherSpec, load_teachers, model_id, resolve_paths
from omnilabel.teachers.pipeline import (
    PipelineConfig,
    PseudomaskPipeline,
    check_mode,
    effective_weak_type,
    images_needing_detector,
)
from omnilabel.teachers.teacher_ckpt import read_teacher

#: Images per shard: the unit of resume (and, on Ray, of scheduling).
DEFAULT_SHARD_SIZE = 16


@dataclass(frozen=True)
class ImageTask:
    """One image to label; plain data, so it pickles to any worker.

    Attributes:
        image_id: COCO image id.
        path: the image file.
        annotations: the image's input annotations.
    """

    image_id: int
    path: str
    annotations: list[dict[str, Any]]


class PseudomaskWorker:
    """Loads the models once, then labels image tasks. The unit a job runs in-process or on a worker.

    Args:
        spec: which models to load.
        paths: their local paths (``resolve_paths``).
        categories: category id → name of the dataset.
        config: the pipeline setting.
    """

    def __init__(self, spec: TeacherSpec, paths: dict[str, Path], categories: dict[int, str],
                 config: PipelineConfig) -> None:
        self.pipeline = PseudomaskPipeline(load_teachers(spec, paths, categories=categories), categories,
                                           config=config)

    def __call__(self, tasks: Sequence[ImageTask]) -> list[dict[str, Any]]:
        """One record per task: ``annotations``, ``counts``, ``seconds``, or ``error`` for a bad image."""
        from omnilabel.data.images import read_image_rgb

        records = []
        for task in tasks:
            rec: dict[str, Any] = {"image_id": task.image_id}
            try:
                t0 = time.perf_counter()
                image = read_image_rgb(task.path)
                read_s = time.perf_counter() - t0
            except InputError as exc:
                rec.update(file_name=task.path, error=str(exc))
                records.append(rec)
                continue
            try:
                result = self._label_with_oom_retry(image, task.annotations)
            except MemoryError as exc:
                rec.update(file_name=task.path, error=f"out of memory: {exc}")
                records.append(rec)
                continue
            seconds = dict(result.seconds)
            seconds["read"] = read_s
            rec.update(annotations=result.annotations, counts=dict(result.counts), seconds=seconds)
            records.append(rec)
        return records

    def _label_with_oom_retry(self, image: Any, annotations: list[dict[str, Any]]) -> Any:
        """Label one image. Out-of-memory in SAM's decoder is handled there (the prompt batch is halved and
        retried, down to one prompt); out-of-memory anywhere else (the encoder on a huge image, the
        detector) fails this image only.

        Raises:
            MemoryError: the image cannot be labelled in the memory available.
        """
        import torch

        try:
            return self.pipeline.label_image(image, annotations)
        except torch.OutOfMemoryError as exc:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise MemoryError(str(exc)) from exc

    @property
    def encoder_calls(self) -> int:
        return self.pipeline.teachers.sam.encoder_calls


def task_from_dict(d: dict[str, Any]) -> ImageTask:
    """Inverse of ``dataclasses.asdict`` for a task (how tasks travel to Ray workers)."""
    return ImageTask(int(d["image_id"]), str(d["path"]), list(d["annotations"]))


def ray_shards(options: Any) -> Executor:
    """The Ray executor for this job (``options``: ``omnilabel.jobs.ray_runner.RayOptions``)."""
    from omnilabel.jobs.ray_runner import ray_executor

    return ray_executor(options, PseudomaskWorker, task_from_dict)


def plan_tasks(data: dict[str, Any], images_dir: Path, *, allow_outside_images: bool) -> list[ImageTask]:
    """One task per image, in file order."""
    by_image = annotations_by_image(data)
    return [ImageTask(int(im["id"]), str(resolve_image_path(images_dir, im["file_name"],
                                                            allow_outside_images=allow_outside_images)),
                      by_image[im["id"]]) for im in data["images"]]


def shards_of(tasks: Sequence[ImageTask], shard_size: int) -> list[list[ImageTask]]:
    return [list(tasks[i:i + shard_size]) for i in range(0, len(tasks), shard_size)]


def _needs_detector(data: dict[str, Any], mode: str) -> bool:
    if mode in ("tags", "none"):
        return True
    if mode == "boxes":
        return False
    kinds = {effective_weak_type(a, mode) for a in data["annotations"]}  # type: ignore[arg-type]
    unlabelled = len({a["image_id"] for a in data["annotations"]}) < len(data["images"])
    return WeakType.POINT in kinds or WeakType.TAG in kinds or (mode == "auto" and unlabelled)


def run_pseudomask(input_path: str | Path, *, output: str | Path, images_dir: str | Path | None = None,
                   spec: TeacherSpec | None = None, config: PipelineConfig | None = None,
                   job_dir: str | Path | None = None, overwrite: bool = False, shard_size: int = DEFAULT_SHARD_SIZE,
                   allow_outside_images: bool = False,
                   on_progress: OnProgress | None = None, run_shards: Executor | None = None,
                   ) -> dict[str, Any]:
    """Run the teacher over a dataset and write the pseudomask COCO file.

    Args:
        input_path: weak COCO JSON.
        output: the pseudomask COCO JSON to write.
        images_dir: folder of the images (default: the input's folder).
        spec: models to use. config: the setting and thresholds.
        job_dir: resumable state (default: ``OUTPUT`` without ``.json`` + ``.job``).
        overwrite: restart a job directory that holds a different job.
        shard_size: images per shard.
        allow_outside_images: accept absolute ``file_name``s or ones that climb out of ``images_dir``.
        on_progress: called with (images done, images total) as shards finish.
        run_shards: executor ``(worker_args, shards: dict[index, tasks]) → iterable of (index, records)``
            (``omnilabel.jobs.runner``); default: in-process, one worker.

    Returns:
        Summary: ``counts`` per weak type (+ gt, empty), ``seconds`` per stage, ``images``, ``errors``,
        ``annotations``, ``skipped_shards``, ``wall_s``, ``output``, ``job_dir``, ``errors_path``,
        ``left_out`` (images that need a detector when there is none; not in the output).

    Raises:
        InputError: bad input or flags (nothing is written). CheckpointError: a model cannot be had.
        JobError: the job directory holds a different job.
    """
    t_start = time.perf_counter()
    input_path, output = Path(input_path), Path(output)
    spec, config = spec or TeacherSpec(), config or PipelineConfig()
    # Absolute: Ray workers do not run in the driver's working directory.
    images_dir = (Path(images_dir) if images_dir is not None else input_path.parent).resolve()
    if shard_size < 1:
        raise InputError(f"--shard-size must be ≥ 1, got {shard_size}")
    data = load_coco(input_path, images_dir=images_dir, allow_outside_images=allow_outside_images)
    check_mode(data, config.weak, source=str(input_path), has_detector=spec.has_detector)
    left_out = set() if spec.has_detector else images_needing_detector(data, config.weak)
    if left_out:
        data = {**data, "images": [im for im in data["images"] if int(im["id"]) not in left_out],
                "annotations": [a for a in data["annotations"] if int(a["image_id"]) not in left_out]}
    tasks = plan_tasks(data, images_dir, allow_outside_images=allow_outside_images)
    shards = shards_of(tasks, shard_size)
    load_detector = spec.has_detector and _needs_detector(data, config.weak)
    job = JobDir(job_dir if job_dir is not None else default_job_dir(output))
    manifest = {"omnilabel": __version__, "command": "pseudomask", "input_sha256": file_sha256(input_path),
                "images_dir": str(images_dir.resolve()), "n_images": len(tasks), "shard_size": shard_size,
                "pipeline": asdict(config), "teacher": {**asdict(spec), "device": None},
                "models": {"sam": model_id(spec.sam), "detector": model_id(spec.detector) if load_detector else None}}
    teacher_files = {k: v for k, v in (("teacher", spec.teacher), ("teacher_refine", spec.teacher_refine)) if v}
    for key, path in teacher_files.items():
        read_teacher(path)  # a missing or foreign file fails here, before the job directory is written
        manifest["models"][key] = model_id(path)
        manifest["models"][key + "_sha256"] = file_sha256(path)
    job.open(manifest, overwrite=overwrite)

    def worker_args() -> tuple:
        return spec, resolve_paths(spec, load_detector=load_detector), category_names(data), config

    skipped = run_unfinished_shards(job, shards, worker_args=worker_args, executor=run_shards or run_in_process,
                                    on_progress=on_progress)
    header = {k: v for k, v in data.items() if k != "annotations"}
    header["info"] = {**(data.get("info") or {}), "omnilabel": {"command": "pseudomask", "weak": config.weak,
                                                                 "models": manifest["models"], "version": __version__}}
    summary = merge_shards(job, len(shards), header=header, output=output, errors_path=job.path / "errors.jsonl")
    summary.update(skipped_shards=skipped, wall_s=time.perf_counter() - t_start, output=str(output),
                   job_dir=str(job.path), errors_path=str(job.path / "errors.jsonl"), left_out=len(left_out))
    return summary


def run_in_process(worker_args: tuple, shards: dict[int, list[ImageTask]]) -> Iterable[tuple[int, list[dict]]]:
    """The reference executor (``omnilabel.jobs.runner``): one ``PseudomaskWorker`` here, shards in order."""
    return run_shards_in_process(PseudomaskWorker, worker_args, shards)
