"""The ``predict`` job: run a trained student over images and write COCO results, resumably.

Like ``pseudomask``, images are planned into shards (``shard_size`` images each) that run in this process or
on a Ray actor pool (``omnilabel.jobs.ray_runner.run_on_ray``; each actor loads the student once), each
finished shard written to the job directory, so a killed job resumes where it stopped; an unreadable image
is recorded in ``errors.jsonl`` and the job goes on.

The output is a COCO *results list* ``[{"image_id", "category_id", "segmentation", "score", "bbox"}]``
(compressed RLE with ``counts`` a str, ``bbox`` ``[x, y, w, h]`` of the mask), in image order, which
``COCO.loadRes`` and ``omnilabel evaluate`` take. Image ids come from ``coco`` (a COCO file naming the images,
e.g. the validation GT) or, without one, from the image files in ``images_dir`` sorted by name (ids 1..N);
then ``OUTPUT.images.json`` (a COCO file with ``images`` and ``categories``) records which id is which file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omnilabel import __version__
from omnilabel.data.coco import atomic_path, load_coco, resolve_image_path, write_json_atomic
from omnilabel.errors import InputError
from omnilabel.jobs.jobdir import JobDir, file_sha256
from omnilabel.students.inference import PredictConfig, coco_results, predict_images
from omnilabel.students.run import find_checkpoint, read_student

#: File extensions listed as images when no COCO file names them.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

Executor = Callable[[tuple, dict[int, list[Any]]], Iterable[tuple[int, list[dict[str, Any]]]]]


@dataclass(frozen=True)
class PredictTask:
    """One image to predict; plain data, so it pickles to any worker."""

    image_id: int
    path: str


def task_from_dict(d: dict[str, Any]) -> PredictTask:
    """Inverse of ``dataclasses.asdict`` for a task (how tasks travel to Ray workers)."""
    return PredictTask(int(d["image_id"]), str(d["path"]))


class PredictWorker:
    """Loads the student once, then predicts image tasks. The unit a job runs in-process or on an actor.

    Args:
        run_dir: the training run directory. checkpoint: ``best``, ``last``, a path, or None (best, else last).
        config: score threshold, top-k, batch size. device: ``cpu``, ``cuda``, ``cuda:1`` …
    """

    def __init__(self, run_dir: str, checkpoint: str | None, config: PredictConfig, device: str) -> None:
        import torch

        from omnilabel.students.run import load_student

        self.device = torch.device(device)
        self.model, student = load_student(run_dir, checkpoint=checkpoint)
        self.model.to(self.device)
        self.category_ids = student["category_ids"]
        self.image_size = int(student["config"]["image_size"])
        self.config = config

    def __call__(self, tasks: Sequence[PredictTask]) -> list[dict[str, Any]]:
        """One record per task: ``results`` and ``seconds``, or ``error`` for an unreadable image."""
        from omnilabel.data.images import read_image_rgb

        records: list[dict[str, Any]] = []
        good: list[tuple[int, PredictTask, Any]] = []
        for task in tasks:
            try:
                good.append((len(records), task, read_image_rgb(task.path)))
                records.append({"image_id": task.image_id})
            except InputError as exc:
                records.append({"image_id": task.image_id, "file_name": task.path, "error": str(exc)})
        t0 = time.perf_counter()
        preds = predict_images(self.model, [image for _, _, image in good], image_size=self.image_size,
                               config=self.config, device=self.device)
        seconds = (time.perf_counter() - t0) / max(len(good), 1)
        for (index, task, _), (masks, scores, labels) in zip(good, preds, strict=True):
            records[index].update(results=coco_results(task.image_id, masks, scores, labels,
                                                       category_ids=self.category_ids),
                                  seconds={"predict": seconds})
        return records


def list_images(images_dir: Path) -> list[dict[str, Any]]:
    """COCO ``images`` entries (ids 1..N, ``file_name``, ``height``, ``width``) of the image files directly in
    ``images_dir``, sorted by name (an unreadable file gets no size; predicting it records an error).

    Raises:
        InputError: the folder is missing or holds no image file.
    """
    from omnilabel.data.images import image_size

    if not images_dir.is_dir():
        raise InputError(f"--images {images_dir}: not a folder")
    files = sorted(p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise InputError(f"--images {images_dir}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    entries: list[dict[str, Any]] = []
    for i, path in enumerate(files):
        entry: dict[str, Any] = {"id": i + 1, "file_name": path.name}
        try:
            entry["height"], entry["width"] = image_size(path)
        except InputError:
            pass  # predicted as an error record; the job goes on
        entries.append(entry)
    return entries


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
                on_progress: Callable[[int, int], None] | None = None, run_shards: Executor | None = None
                ) -> dict[str, Any]:
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
        run_shards: executor ``(worker_args, shards) -> (index, records)``; default in-process.

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
    job = JobDir(job_dir if job_dir is not None else output.with_name(output.name.removesuffix(".json") + ".job"))
    plan = json.dumps([asdict(t) for t in tasks], separators=(",", ":"))
    manifest = {"omnilabel": __version__, "command": "predict", "run_dir": str(Path(run_dir).resolve()),
                "checkpoint": str(ckpt.resolve()), "checkpoint_sha256": file_sha256(ckpt),
                "images_sha256": _sha256_text(plan), "n_images": len(tasks), "shard_size": shard_size,
                "config": asdict(config)}
    job.open(manifest, overwrite=overwrite)
    done = job.finished(len(shards))
    todo = {i: shards[i] for i in range(len(shards)) if i not in done}
    n_done = sum(len(shards[i]) for i in done)
    if on_progress:
        on_progress(n_done, len(tasks))
    if todo:
        worker_args = (str(Path(run_dir).resolve()), str(ckpt.resolve()), config, device)
        for index, records in (run_shards or run_in_process)(worker_args, todo):
            job.write_shard(index, records)
            n_done += len(records)
            if on_progress:
                on_progress(n_done, len(tasks))
    errors_path = job.path / "errors.jsonl"
    summary: dict[str, Any] = merge_results(job, len(shards), output=output, errors_path=errors_path)
    summary.update(skipped_shards=len(done), wall_s=time.perf_counter() - t0, output=str(output),
                   job_dir=str(job.path), errors_path=str(errors_path), checkpoint=str(ckpt))
    if images_json is not None:
        summary["images_json"] = str(images_json)
    return summary


def _sha256_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def run_in_process(worker_args: tuple, shards: dict[int, list[PredictTask]]) -> Iterable[tuple[int, list[dict]]]:
    """The reference executor: one worker in this process, shards in order."""
    worker = PredictWorker(*worker_args)
    for index in sorted(shards):
        yield index, worker(shards[index])


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
