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
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omnilabel import __version__
from omnilabel.data.coco import load_coco, resolve_image_path
from omnilabel.errors import InputError
from omnilabel.io import atomic_path, file_sha256, text_sha256, write_json_atomic
from omnilabel.jobs.jobdir import JobDir
from omnilabel.jobs.runner import Executor, OnProgress, default_job_dir, run_shards_in_process, run_unfinished_shards
from omnilabel.students.inference import PredictConfig
from omnilabel.students.predict import PredictTask, PredictWorker, list_images, task_from_dict
from omnilabel.students.run import find_checkpoint, read_student


def merge_results(job: JobDir, n_shards: int, *, output: Path, errors_path: Path) -> dict[str, int]:
    """Stream every shard's results into one JSON list at ``output`` (atomically) and the failed images
    into ``errors_path`` (removed when none failed). Returns ``images``, ``errors``, ``predictions``."""
    n_images = n_errors = n_preds = 0
    errors: list[str] = []
    with atomic_path(output) as tmp, open(tmp, "w") as f:
        f.write("[")
        for shard in range(n_shards):
            for rec in job.read_shard(shard):
                n_images += 1
                if rec.get("error"):
                    n_errors += 1
                    errors.append(json.dumps({k: rec.get(k) for k in ("image_id", "file_name", "error")}))
                    continue
                for result in rec["results"]:
                    f.write(("," if n_preds else "") + json.dumps(result, separators=(",", ":")))
                    n_preds += 1
        f.write("]\n")
    if errors:
        errors_path.write_text("\n".join(errors) + "\n")
    else:
        errors_path.unlink(missing_ok=True)
    return {"images": n_images, "errors": n_errors, "predictions": n_preds}


def run_predict(run_dir: str | Path, *, output: str | Path, images_dir: str | Path | None = None,
                coco: str | Path | None = None, checkpoint: str | None = None, config: PredictConfig | None = None,
                device: str = "cpu", job_dir: str | Path | None = None, overwrite: bool = False,
                shard_size: int | None = None, allow_outside_images: bool = False,
                on_progress: OnProgress | None = None, run_shards: Executor | None = None) -> dict[str, Any]:
    """Predict every image and write the COCO results list (see the module docstring).

    Args:
        run_dir: the training run directory.
        output: the results JSON to write.
        images_dir: image folder (default: ``coco``'s folder). coco: COCO file naming the images and ids.
        checkpoint: ``best``, ``last`` or a path (default: best, else last).
        config: score threshold, top-k, batch size.
        device: where each worker runs the student.
        job_dir: resumable state (default: ``OUTPUT`` without ``.json`` + ``.job``).
        overwrite: restart a job directory that holds a different job.
        shard_size: images per shard (default: ``config.batch_size``).
        allow_outside_images: accept ``file_name``s outside ``images_dir``.
        on_progress: called with (images done, images total) as shards finish.
        run_shards: executor ``(worker_args, shards) -> (index, records)`` (``omnilabel.jobs.runner``);
            default in-process.

    Returns:
        ``images``, ``errors``, ``predictions``, ``skipped_shards``, ``wall_s``, ``output``, ``job_dir``,
        ``errors_path``, ``checkpoint``, and ``images_json`` when ids were assigned here.

    Raises:
        InputError: bad input or flags. CheckpointError: the run directory has no usable checkpoint.
        JobError: the job directory holds a different job.
    """
    t0 = time.perf_counter()
    config = config or PredictConfig()
    output = Path(output)
    if config.batch_size < 1 or config.top_k < 1:
        raise InputError(f"--batch-size and --top-k must be >= 1, got {config.batch_size}, {config.top_k}")
    shard_size = shard_size or config.batch_size
    if run_shards is None and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: no CUDA device is available here; use --device cpu")
    student = read_student(run_dir)
    ckpt = find_checkpoint(run_dir, checkpoint)
    images_json = None
    if coco is not None:
        images_dir = (Path(images_dir) if images_dir is not None else Path(coco).parent).resolve()
        images = load_coco(coco, images_dir=images_dir, allow_outside_images=allow_outside_images)["images"]
    elif images_dir is not None:
        images_dir = Path(images_dir).resolve()
        images = list_images(images_dir)
        images_json = output.with_name(output.name.removesuffix(".json") + ".images.json")
        write_json_atomic({"images": images, "annotations": [], "categories": [
            {"id": i, "name": n} for i, n in zip(student["category_ids"], student["category_names"], strict=True)]},
            images_json)
    else:
        raise InputError("predict: give --images (a folder of images) and/or --coco (a COCO file naming them)")
    tasks = [PredictTask(int(im["id"]), str(resolve_image_path(images_dir, im["file_name"],
                                                                allow_outside_images=allow_outside_images)))
             for im in images]
    shards = [tasks[i:i + shard_size] for i in range(0, len(tasks), shard_size)]
    job = JobDir(job_dir if job_dir is not None else default_job_dir(output))
    plan = json.dumps([asdict(t) for t in tasks], separators=(",", ":"))
    manifest = {"omnilabel": __version__, "command": "predict", "run_dir": str(Path(run_dir).resolve()),
                "checkpoint": str(ckpt.resolve()), "checkpoint_sha256": file_sha256(ckpt),
                "images_sha256": text_sha256(plan), "n_images": len(tasks), "shard_size": shard_size,
                "config": asdict(config)}
    job.open(manifest, overwrite=overwrite)
    worker_args = (str(Path(run_dir).resolve()), str(ckpt.resolve()), config, device)
    skipped = run_unfinished_shards(job, shards, worker_args=lambda: worker_args,
                                    executor=run_shards or run_in_process, on_progress=on_progress)
    errors_path = job.path / "errors.jsonl"
    summary: dict[str, Any] = merge_results(job, len(shards), output=output, errors_path=errors_path)
    summary.update(skipped_shards=skipped, wall_s=time.perf_counter() - t0, output=str(output),
                   job_dir=str(job.path), errors_path=str(errors_path), checkpoint=str(ckpt))
    if images_json is not None:
        summary["images_json"] = str(images_json)
    return summary


def run_in_process(worker_args: tuple, shards: dict[int, list[PredictTask]]) -> Iterable[tuple[int, list[dict]]]:
    """The reference executor (``omnilabel.jobs.runner``): one ``PredictWorker`` here, shards in order."""
    return run_shards_in_process(PredictWorker, worker_args, shards)


def predict_executor(num_workers: int | None, *, address: str | None, device: str) -> Executor | None:
    """The executor for ``--num-workers``/``--address``/``--device``: None (in-process) for 0, else a Ray actor
    pool of ``num_workers`` (default: one per GPU with ``cuda``, else 1), each with ``cores / N`` threads.

    Raises:
        InputError: a negative count, or ``--address`` with 0 workers.
    """
    from omnilabel.jobs.ray_runner import ray_executor, ray_options

    options = ray_options(num_workers, address=address, device=device)
    if options is None:
        return None
    return ray_executor(options, PredictWorker, task_from_dict)
