"""The ``entities`` job: E-SAM's class-agnostic, non-overlapping entity masks for every image, resumably.

Each image is encoded by SAM once and segmented by ``omnilabel.teachers.entity.EntitySegmenter`` (MMG → EMR →
USR, every grid decoded from that one embedding). Images are planned into shards that run in this process or
on a Ray actor pool (each actor loads SAM once), each finished shard written to the job directory, so a killed
job resumes where it stopped; an unreadable image is recorded in ``errors.jsonl`` and the job goes on.

The output is a COCO file: the input's ``images`` (ids kept from a COCO file; from a folder, ids 1..N by file
name, as ``predict`` assigns them), one category ``entity`` (id 1), and per entity an annotation with a
compressed RLE ``segmentation``, ``area``, ``bbox``, ``iscrowd: 0``, ``score`` (SAM's predicted IoU of the mask
the entity came from) and ``omnilabel: {"source": "entity", "entity_id": k}``. Annotation ids are 1, 2, … in
image order. With ``maps``, each image also gets ``MAPS/<image id>.png``, a 16-bit greyscale PNG at image size
whose pixel value is the ``entity_id`` of the entity covering it (0: none), so map and COCO join without
guessing; ``info.omnilabel.entities.maps`` names the folder (relative to the output's folder when inside it).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from omnilabel import __version__
from omnilabel.data.coco import load_coco, resolve_image_path
from omnilabel.errors import InputError
from omnilabel.events import OnEvent
from omnilabel.io import atomic_path, file_sha256, text_sha256
from omnilabel.jobs.jobdir import JobDir
from omnilabel.jobs.merge import merge_shards
from omnilabel.jobs.options import JobOptions
from omnilabel.jobs.runner import Executor, check_images_exist, executor_for, per_image, run_unfinished_shards
from omnilabel.models.registry import WeightRef
from omnilabel.teachers.entity import EntityConfig
from omnilabel.teachers.loading import TeacherSpec, model_id, model_refs, model_source, resolve_refs

#: Images per shard (``--batch-size``).
DEFAULT_SHARD_SIZE = 8
#: The one category of an entities file.
ENTITY_CATEGORY = {"id": 1, "name": "entity", "supercategory": "entity"}
#: Largest entity id a 16-bit map holds.
MAX_ENTITIES = 65535


@dataclass(frozen=True)
class EntitiesInputs:
    """What ``entities`` reads: a COCO file naming the images (ids kept), or a folder of images (ids assigned).

    Attributes:
        coco: a COCO file, or None. images: the image folder (default: ``coco``'s folder).
        allow_outside_images: accept ``file_name``s outside ``images``.
    """

    coco: Path | None = None
    images: Path | None = None
    allow_outside_images: bool = False


@dataclass(frozen=True)
class EntityTask:
    """One image to segment; plain data. ``map_path``: where its id map goes, or None."""

    image_id: int
    path: str
    map_path: str | None = None


def task_from_dict(d: dict[str, Any]) -> EntityTask:
    return EntityTask(int(d["image_id"]), str(d["path"]), d.get("map_path"))


class EntityWorker:
    """Loads SAM (or a teacher) once, then segments the entities of image tasks.

    Args:
        spec: the SAM / teacher to load (no detector).
        models: role → ``WeightRef`` (``model_refs``) or a local ``Path``.
        config: E-SAM's settings.
    """

    def __init__(self, spec: TeacherSpec, models: dict[str, WeightRef | Path], config: EntityConfig) -> None:
        from omnilabel.teachers.entity import EntitySegmenter
        from omnilabel.teachers.loading import load_teachers

        self.segmenter = EntitySegmenter(load_teachers(spec, resolve_refs(models)).sam, config)

    def __call__(self, tasks: list[EntityTask]) -> list[dict[str, Any]]:
        """One record per task: ``image_id``, ``annotations``, ``counts``, ``seconds``; or ``error``."""
        return per_image(tasks, self._segment)

    def _segment(self, image: np.ndarray, task: EntityTask) -> dict[str, Any]:
        from omnilabel.ops.masks import masks_to_rle, rle_area, rle_to_bbox_xywh

        result = self.segmenter.segment(image)
        if len(result.masks) > MAX_ENTITIES:
            raise InputError(f"{len(result.masks)} entities do not fit a 16-bit map (at most {MAX_ENTITIES})")
        anns = []
        for k, (rle, score) in enumerate(zip(masks_to_rle(result.masks), result.scores, strict=True), start=1):
            anns.append({"category_id": ENTITY_CATEGORY["id"], "segmentation": rle, "area": rle_area(rle),
                         "bbox": rle_to_bbox_xywh(rle), "iscrowd": 0, "score": round(float(score), 6),
                         "omnilabel": {"source": "entity", "entity_id": k}})
        if task.map_path is not None:
            write_id_map(result.id_map, task.map_path)
        s = result.stats
        counts = {"entities": len(anns), "encoder_calls": s.encoder_calls, "decoder_calls": s.decoder_calls,
                  "pixels": int(result.id_map.size), "covered_px": int((result.id_map > 0).sum()),
                  "covered_px_before_usr": int(round(s.covered_frac_emr * result.id_map.size))}
        return {"image_id": task.image_id, "annotations": anns, "counts": counts, "seconds": dict(s.seconds)}


def write_id_map(id_map: np.ndarray, path: str | Path) -> None:
    """Save an (H, W) uint16 entity-id map as a 16-bit greyscale PNG, atomically."""
    from PIL import Image

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        Image.fromarray(np.ascontiguousarray(id_map, dtype=np.uint16)).save(f, format="PNG")


def read_id_map(path: str | Path) -> np.ndarray:
    """(H, W) uint16 entity ids of a map written by ``write_id_map``.

    Raises:
        InputError: the file is missing or not a 16-bit greyscale PNG.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            mode, arr = img.mode, np.asarray(img)
    except (OSError, UnidentifiedImageError) as e:
        raise InputError(f"{path}: cannot read the entity map: {e}") from None
    if mode not in ("I;16", "I;16L", "I;16B", "I;16N", "I") or arr.ndim != 2:
        raise InputError(f"{path}: expected a 16-bit greyscale PNG entity map, got image mode {mode!r}")
    return arr.astype(np.uint16)


def _images(inputs: EntitiesInputs) -> tuple[list[dict[str, Any]], Path, str]:
    """The images to segment (COCO entries), their folder, and how the source is named in messages."""
    from omnilabel.students.predict import list_images

    if inputs.coco is not None:
        images_dir = (Path(inputs.images) if inputs.images is not None else Path(inputs.coco).parent).resolve()
        data = load_coco(inputs.coco, images_dir=images_dir, allow_outside_images=inputs.allow_outside_images)
        return [{k: im[k] for k in ("id", "file_name", "height", "width") if k in im} for im in data["images"]], \
            images_dir, str(inputs.coco)
    if inputs.images is None:
        raise InputError("entities: give a COCO file naming the images, or --images DIR (a folder of images)")
    images_dir = Path(inputs.images).resolve()
    return list_images(images_dir), images_dir, f"--images {images_dir}"


def _maps_ref(maps: Path, output: Path) -> str:
    """How the output names the maps folder: relative to its folder when inside it, else absolute."""
    rel = os.path.relpath(maps, output.absolute().parent)
    return str(maps) if rel.startswith("..") else rel


def run_entities(inputs: EntitiesInputs, output: str | Path, teachers: TeacherSpec | None = None,
                 config: EntityConfig | None = None, job: JobOptions | None = None, *,
                 maps: str | Path | None = None, on_event: OnEvent | None = None,
                 executor: Executor | None = None) -> dict[str, Any]:
    """Segment every image's entities and write the entities COCO file (see the module docstring).

    Args:
        inputs: the images.
        output: the COCO file to write.
        teachers: the SAM (``sam``) or a fine-tuned teacher (``teacher``); the detector is ignored.
        config: E-SAM's settings (default ``EntityConfig()``).
        job: workers, device, images per shard (``batch_size``, default 8), job directory (default ``OUTPUT``
            without ``.json`` + ``.job``), overwrite.
        maps: a folder for the 16-bit entity-id maps, or None.
        on_event: ``progress`` after every shard; ``warning`` for missing images.
        executor: runs the shards instead of the one ``job`` asks for (tests, benchmarks).

    Returns:
        ``images``, ``errors``, ``entities``, ``covered`` (share of all pixels in some entity),
        ``covered_before_usr``, ``encoder_calls`` and ``decoder_calls`` (per image), ``seconds`` (per image,
        by stage), ``skipped_shards``, ``wall_s``, ``output``, ``maps``, ``job_dir``, ``errors_path``.

    Raises:
        InputError: bad input, or no image exists. CheckpointError: the SAM or teacher cannot be had.
        JobError: the job directory holds a different job, or every image failed.
    """
    t0 = time.perf_counter()
    job = job or JobOptions()
    config = config or EntityConfig()
    output = Path(output)
    spec = TeacherSpec(**{**asdict(teachers or TeacherSpec()), "detector": "none", "device": job.device,
                          "refiner": None}).with_base()
    images, images_dir, source = _images(inputs)
    maps_dir = None if maps is None else Path(maps).absolute()
    if maps_dir is not None and maps_dir.is_file():
        raise InputError(f"--maps {maps}: is a file; give a folder")
    tasks = [EntityTask(int(im["id"]), str(resolve_image_path(images_dir, im["file_name"],
                                                              allow_outside_images=inputs.allow_outside_images)),
                        None if maps_dir is None else str(maps_dir / f"{int(im['id'])}.png")) for im in images]
    check_images_exist([t.path for t in tasks], images_dir=images_dir, source=source, on_event=on_event)
    refs = model_refs(spec, load_detector=False)
    shard_size = job.unit(DEFAULT_SHARD_SIZE)
    shards = [tasks[i:i + shard_size] for i in range(0, len(tasks), shard_size)]
    jobdir = JobDir(job.job_dir_for(output))
    plan = "\n".join(f"{t.image_id}\t{t.path}" for t in tasks)
    manifest = {"omnilabel": __version__, "command": "entities", "images_sha256": text_sha256(plan),
                "input_sha256": None if inputs.coco is None else file_sha256(inputs.coco),
                "n_images": len(tasks), "shard_size": shard_size, "config": asdict(config),
                "models": {role: [ref.source, ref.sha256] for role, ref in sorted(refs.items())},
                "maps": None if maps_dir is None else str(maps_dir)}
    jobdir.open(manifest, overwrite=job.overwrite)

    def worker_args() -> tuple:
        models = resolve_refs(refs, on_event=on_event) if job.address is None else refs
        return (spec, models, config)

    skipped = run_unfinished_shards(jobdir, shards, worker_args=worker_args,
                                    executor=executor or executor_for(job, EntityWorker, task_from_dict, on_event),
                                    on_event=on_event)
    recorded = {role: model_source(str(getattr(spec, role))) for role in ("sam", "teacher")
                if getattr(spec, role) is not None}
    info = {"omnilabel": {"version": __version__, "entities": {
        **recorded, "config": asdict(config), "source": model_id(source.removeprefix("--images ")),
        "maps": None if maps_dir is None else _maps_ref(maps_dir, output)}}}
    errors_path = jobdir.path / "errors.jsonl"
    merged = merge_shards(jobdir, len(shards), header={"info": info, "images": images,
                                                       "categories": [ENTITY_CATEGORY]},
                          output=output, errors_path=errors_path)
    counts, done = merged["counts"], max(merged["images"] - merged["errors"], 1)
    return {"images": merged["images"], "errors": merged["errors"], "entities": merged["annotations"],
            "covered": counts["covered_px"] / max(counts["pixels"], 1),
            "covered_before_usr": counts["covered_px_before_usr"] / max(counts["pixels"], 1),
            "encoder_calls": counts["encoder_calls"] / done, "decoder_calls": counts["decoder_calls"] / done,
            "seconds": {k: v / done for k, v in merged["seconds"].items()}, "skipped_shards": skipped,
            "wall_s": time.perf_counter() - t0, "output": str(output),
            "maps": None if maps_dir is None else str(maps_dir), "job_dir": str(jobdir.path),
            "errors_path": str(errors_path)}
