"""The ``predict`` job: run a trained student over images and write COCO results, resumably.

Like ``pseudomask``, images are planned into shards (``shard_size`` images each) that run in this process or
on a Ray actor pool (``omnilabel.jobs.ray_runner.run_on_ray``; each actor loads the student once), each
finished shard written to the job directory (``omnilabel.jobs.runner``), so a killed job resumes where it
stopped; an unreadable image is recorded in ``errors.jsonl`` and the job goes on. What runs on each shard is
``omnilabel.students.predict.PredictWorker``.

The output is a COCO *results list* ``[{"image_id", "category_id", "segmentation", "score", "bbox"}]``
(compressed RLE with ``counts`` a str, ``bbox`` ``[x, y, w, h]`` of the mask), in image order, which
``COCO.loadRes`` and ``omnilabel evaluate`` take. Image ids come from ``coco`` (a COCO file naming the images,
e.g. the validation GT) or, without one, from the image files in ``images_dir`` sorted by name (ids 1..N);
then ``OUTPUT.images.json`` (a COCO file with ``images`` and ``categories``) records which id is which file.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from omnilabel import __version__
from omnilabel.data.coco import load_coco, resolve_image_path
from omnilabel.errors import InputError
from omnilabel.events import OnEvent
from omnilabel.io import atomic_path, file_sha256, text_sha256, write_json_atomic
from omnilabel.jobs.jobdir import JobDir
from omnilabel.jobs.merge import finished_records, write_errors
from omnilabel.jobs.options import JobOptions
from omnilabel.jobs.runner import (
    Executor,
    check_images_exist,
    check_not_all_failed,
    executor_for,
    run_unfinished_shards,
)
from omnilabel.models.registry import WeightRef
from omnilabel.students.inference import PredictConfig
from omnilabel.students.predict import PredictTask, PredictWorker, list_images, task_from_dict
from omnilabel.students.run import find_checkpoint, read_student

#: Images per forward pass and per shard (``--batch-size``).
DEFAULT_BATCH_SIZE = 8


@dataclass(frozen=True)
class PredictInputs:
    """What ``predict`` reads.

    Attributes:
        run_dir: the training run directory. checkpoint: ``best``, ``last`` or a path (None: best, else last).
        coco: a COCO file naming the images and their ids (e.g. the validation GT), or None.
        images: the image folder (default: ``coco``'s folder); without ``coco``, every image file in it.
        allow_outside_images: accept ``file_name``s outside ``images``.
    """

    run_dir: Path
    coco: Path | None = None
    images: Path | None = None
    checkpoint: str | None = None
    allow_outside_images: bool = False


def merge_results(job: JobDir, n_shards: int, *, output: Path, errors_path: Path) -> dict[str, int]:
    """Stream every shard's results into one JSON list at ``output`` (atomically) and the failed images
    into ``errors_path`` (removed when none failed). Returns ``images``, ``errors``, ``predictions``.

    Raises:
        JobError: every image failed; ``output`` is then not written.
    """
    n_images = n_errors = n_preds = 0
    errors: list[str] = []
    with atomic_path(output) as tmp, open(tmp, "w") as f:
        f.write("[")
        for rec in finished_records(job, n_shards, errors):
            n_images += 1
            for result in rec["results"]:
                f.write(("," if n_preds else "") + json.dumps(result, separators=(",", ":")))
                n_preds += 1
        n_errors = len(errors)
        n_images += n_errors
        f.write("]\n")
        write_errors(errors, errors_path)
        check_not_all_failed(n_images, n_errors, errors_path=errors_path)
    return {"images": n_images, "errors": n_errors, "predictions": n_preds}


def run_predict(inputs: PredictInputs, output: str | Path, job: JobOptions | None = None,
                config: PredictConfig | None = None, *, on_event: OnEvent | None = None,
                executor: Executor | None = None) -> dict[str, Any]:
    """Predict every image and write the COCO results list (see the module docstring).

    Args:
        inputs: the run directory, its checkpoint, and the images.
        output: the results JSON to write.
        job: workers, device, images per forward pass and per shard (``batch_size``, default 8), job
            directory (default: ``OUTPUT`` without ``.json`` + ``.job``), overwrite.
        config: score threshold and top-k (its ``batch_size`` is the job's).
        on_event: ``progress`` after every shard; ``warning`` for missing images.
        executor: runs the shards instead of the one ``job`` asks for (tests, benchmarks).

    Returns:
        ``images``, ``errors``, ``predictions``, ``skipped_shards``, ``wall_s``, ``output``, ``job_dir``,
        ``errors_path``, ``checkpoint``, and ``images_json`` when ids were assigned here.

    Raises:
        InputError: bad input or flags, or no image exists. CheckpointError: the run directory has no
        usable checkpoint. JobError: the job directory holds a different job, or every image failed.
    """
    t0 = time.perf_counter()
    job = job or JobOptions()
    output = Path(output)
    batch = job.unit(DEFAULT_BATCH_SIZE)
    config = replace(config or PredictConfig(), batch_size=batch)
    if config.top_k < 1:
        raise InputError(f"--top-k must be >= 1, got {config.top_k}")
    student = read_student(inputs.run_dir)
    ckpt = find_checkpoint(inputs.run_dir, inputs.checkpoint)
    images_json = None
    if inputs.coco is not None:
        images_dir = (Path(inputs.images) if inputs.images is not None else Path(inputs.coco).parent).resolve()
        images = load_coco(inputs.coco, images_dir=images_dir,
                           allow_outside_images=inputs.allow_outside_images)["images"]
        source = str(inputs.coco)
    elif inputs.images is not None:
        images_dir = Path(inputs.images).resolve()
        images = list_images(images_dir)
        source = f"--images {images_dir}"
        images_json = output.with_name(output.name.removesuffix(".json") + ".images.json")
        write_json_atomic({"images": images, "annotations": [], "categories": [
            {"id": i, "name": n} for i, n in zip(student["category_ids"], student["category_names"], strict=True)]},
            images_json)
    else:
        raise InputError("predict: give --images (a folder of images) and/or --coco (a COCO file naming them)")
    tasks = [PredictTask(int(im["id"]), str(resolve_image_path(images_dir, im["file_name"],
                                                                allow_outside_images=inputs.allow_outside_images)))
             for im in images]
    check_images_exist([t.path for t in tasks], images_dir=images_dir, source=source, on_event=on_event)
    shards = [tasks[i:i + batch] for i in range(0, len(tasks), batch)]
    jobdir = JobDir(job.job_dir_for(output))
    run_dir = Path(inputs.run_dir).resolve()
    plan = json.dumps([asdict(t) for t in tasks], separators=(",", ":"))
    manifest = {"omnilabel": __version__, "command": "predict", "run_dir": str(run_dir),
                "checkpoint": str(ckpt.resolve()), "checkpoint_sha256": file_sha256(ckpt),
                "images_sha256": text_sha256(plan), "n_images": len(tasks), "shard_size": batch,
                "config": asdict(config)}
    jobdir.open(manifest, overwrite=job.overwrite)
    ckpt_ref = WeightRef("student checkpoint", str(ckpt.resolve()), sha256=manifest["checkpoint_sha256"])
    worker_args = (str(run_dir), ckpt_ref, config, job.device)
    skipped = run_unfinished_shards(jobdir, shards, worker_args=lambda: worker_args,
                                    executor=executor or executor_for(job, PredictWorker, task_from_dict, on_event),
                                    on_event=on_event)
    errors_path = jobdir.path / "errors.jsonl"
    summary: dict[str, Any] = merge_results(jobdir, len(shards), output=output, errors_path=errors_path)
    summary.update(skipped_shards=skipped, wall_s=time.perf_counter() - t0, output=str(output),
                   job_dir=str(jobdir.path), errors_path=str(errors_path), checkpoint=str(ckpt))
    if images_json is not None:
        summary["images_json"] = str(images_json)
    return summary
