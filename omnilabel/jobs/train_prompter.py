"""The ``train-prompter`` job: UOIS-SAM's prompt generator (HPG) and discriminator (HDNet) from GT masks.

Two stages, both resumable in the job directory:

1. **Samples** (per image, the heavy part; a per-image job like ``pseudomask``: in this process, or on a Ray actor
   pool with ``--num-workers``): each image of the training (and validation) file gives the frozen DINOv2's
   tokens with its HPG targets, and SAM's tokens on its sampled prompts with their IoU targets
   (``omnilabel.teachers.uois_train``), written to ``JOB_DIR/samples/<split>-<image id>.npz``. Every image is
   encoded once by each frozen model, whatever the number of epochs. Samples depend only on the image, the
   models and the seed, so Ray and in-process write the same files. On a cluster the job directory must be on
   storage every node sees.
2. **Epochs** (light: the head and the MLP, in this process on ``--device``): ``PrompterTrainer``; after every
   epoch its state is written to ``JOB_DIR/train_state.pt``, so a killed run continues from its last finished
   epoch with ``--resume`` and ends with the same weights as an uninterrupted one. With validation data each
   model keeps the weights of its lowest validation loss (spec §3.5); without, the last epoch's.

The output file (``omnilabel.teachers.uois.save_prompter``) records the SAM (checksums of its encoder and of its
prompt encoder + decoder, from the workers that used it) and the backbone (name or path, sha256 of its weights).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from omnilabel import __version__
from omnilabel.data.coco import load_coco, resolve_image_path
from omnilabel.errors import InputError, JobError
from omnilabel.events import OnEvent, emit
from omnilabel.io import atomic_path, file_sha256, save_torch_atomic
from omnilabel.jobs.jobdir import JobDir
from omnilabel.jobs.merge import finished_records, write_errors
from omnilabel.jobs.options import Dataset, JobOptions
from omnilabel.jobs.runner import (
    Executor,
    check_images_exist,
    checked_size,
    executor_for,
    per_image,
    run_unfinished_shards,
)
from omnilabel.models.registry import WeightRef
from omnilabel.teachers.loading import TeacherSpec, model_id, model_refs, model_source, resolve_refs
from omnilabel.teachers.uois import HpgConfig, UoisConfig
from omnilabel.teachers.uois_train import PrompterTrainConfig, config_dict

#: Images per shard of the sample stage (``--batch-size`` sets the HPG batch instead: see ``run_train_prompter``).
SHARD_SIZE = 16
#: The backbone when none is named (the paper's DINOv2 ViT-S/14).
DEFAULT_BACKBONE = "dinov2-small"
TRAIN_STATE = "train_state.pt"


@dataclass(frozen=True)
class SampleTask:
    """One image to turn into training samples; plain data.

    Attributes:
        image_id, path, split (``train`` / ``val``), height, width; segmentations: its visible GT masks as COCO
        segmentations (crowd regions left out); sample: the ``.npz`` file to write.
    """

    image_id: int
    path: str
    split: str
    height: int
    width: int
    segmentations: list[Any]
    sample: str


def task_from_dict(d: dict[str, Any]) -> SampleTask:
    return SampleTask(int(d["image_id"]), str(d["path"]), str(d["split"]), int(d["height"]), int(d["width"]),
                      list(d["segmentations"]), str(d["sample"]))


class SampleWorker:
    """Loads SAM (or a teacher) and the backbone once, then writes the samples of image tasks.

    Args:
        spec: the SAM / teacher. models: role → ``WeightRef`` or local ``Path`` (``backbone`` among them).
        hpg: the generator's settings. train: the recipe (prompts per image, seed).
    """

    def __init__(self, spec: TeacherSpec, models: dict[str, WeightRef | Path], hpg: HpgConfig,
                 train: PrompterTrainConfig) -> None:
        from omnilabel.models.dinov2 import load_dinov2
        from omnilabel.teachers.loading import load_teachers
        from omnilabel.teachers.uois import Hpg, sam_checksums

        paths = resolve_refs(models)
        self.sam = load_teachers(spec, {k: v for k, v in paths.items() if k != "backbone"}).sam
        self.hpg = Hpg(load_dinov2(paths["backbone"], device=spec.device), hpg).to(spec.device)
        self.train = train
        self.checksums = sam_checksums(self.sam.sam)

    def __call__(self, tasks: list[SampleTask]) -> list[dict[str, Any]]:
        """One record per task: ``image_id``, ``split``, ``sample``, ``instances``, ``sam``; or ``error``."""
        return per_image(tasks, self._sample)

    def _sample(self, image: np.ndarray, task: SampleTask) -> dict[str, Any]:
        from omnilabel.ops.masks import rle_to_masks, segmentation_to_rle
        from omnilabel.teachers.uois_train import hdnet_sample, hpg_sample

        h, w = checked_size(image, task)
        masks = rle_to_masks([segmentation_to_rle(s, h, w) for s in task.segmentations], h, w)
        arrays = hpg_sample(self.hpg, image, masks)
        rng = np.random.default_rng([self.train.seed, task.image_id])
        arrays.update(hdnet_sample(self.sam, self.sam.encode(image), masks, self.train, rng))
        Path(task.sample).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(task.sample) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
        return {"image_id": task.image_id, "split": task.split, "sample": task.sample, "instances": len(masks),
                "sam": self.checksums}


def _tasks(dataset: Dataset, split: str, samples_dir: Path) -> list[SampleTask]:
    images_dir = dataset.images_dir
    data = load_coco(dataset.coco, images_dir=images_dir, allow_outside_images=dataset.allow_outside_images)
    segs: dict[int, list[Any]] = {}
    for ann in data["annotations"]:
        if ann.get("segmentation") and not int(ann.get("iscrowd") or 0):
            segs.setdefault(int(ann["image_id"]), []).append(ann["segmentation"])
    if not segs:
        raise InputError(f"{dataset.coco}: no annotation has a `segmentation`: the prompter learns from full masks "
                         "(GT, or `omnilabel split --fully 1`)")
    return [SampleTask(int(im["id"]), str(resolve_image_path(images_dir, im["file_name"],
                                                             allow_outside_images=dataset.allow_outside_images)),
                       split, int(im["height"]), int(im["width"]), segs.get(int(im["id"]), []),
                       str(samples_dir / f"{split}-{int(im['id'])}.npz"))
            for im in data["images"]]


def run_train_prompter(train: Dataset, output: str | Path, *, val: Dataset | None = None,
                       teachers: TeacherSpec | None = None, backbone: str = DEFAULT_BACKBONE,
                       hpg: HpgConfig | None = None, uois: UoisConfig | None = None,
                       recipe: PrompterTrainConfig | None = None, job: JobOptions | None = None,
                       on_event: OnEvent | None = None, executor: Executor | None = None) -> dict[str, Any]:
    """Train HPG and HDNet and write the prompter file (see the module docstring).

    Args:
        train: GT COCO with full masks and its images. output: the prompter file to write.
        val: validation GT (each model keeps its lowest-validation-loss weights), or None.
        teachers: the SAM (``sam``) or a fine-tuned teacher (``teacher``) the prompter works with.
        backbone: DINOv2 registry name or local ``transformers`` folder.
        hpg: the generator's settings. uois: the thresholds the file carries for inference.
        recipe: epochs and optimiser; ``job.batch_size``, when given, replaces its ``hpg_batch``.
        job: workers of the sample stage, device, job directory, ``overwrite``, ``resume``.
        on_event: ``progress`` (images of the sample stage, then epochs), ``warning``, ``losses`` (after each
            epoch: ``epoch``, ``train`` and ``val`` losses of ``hpg`` and ``hdnet``).
        executor: runs the sample shards instead of the one ``job`` asks for (tests).

    Returns:
        ``output``, ``images`` (train / val), ``errors``, ``instances``, ``epochs``, ``start_epoch``, ``best``
        (epoch and validation loss of each model, or None), ``history`` (per epoch losses), ``job_dir``, ``wall_s``.

    Raises:
        InputError: bad input or flags. CheckpointError: a model cannot be had. JobError: the job directory holds
            another run (``--overwrite``) or a finished stage is missing (``--resume`` of nothing), or every image
            failed.
    """
    t0 = time.perf_counter()
    job, hpg, uois = job or JobOptions(), hpg or HpgConfig(), uois or UoisConfig()
    recipe = recipe or PrompterTrainConfig()
    if job.batch_size is not None:
        recipe = dataclasses.replace(recipe, hpg_batch=job.batch_size)
    output = Path(output)
    spec = TeacherSpec(**{**dataclasses.asdict(teachers or TeacherSpec()), "detector": "none",
                          "device": job.device, "refiner": None}).with_base()
    jobdir = JobDir(job.job_dir_for(output))
    samples_dir = (jobdir.path / "samples").absolute()
    tasks = _tasks(train, "train", samples_dir) + ([] if val is None else _tasks(val, "val", samples_dir))
    check_images_exist([t.path for t in tasks], images_dir=train.images_dir, source=str(train.coco),
                       on_event=on_event)
    from omnilabel.models.registry import weight_ref

    refs = {**model_refs(spec, load_detector=False), "backbone": weight_ref(backbone, kind="dinov2")}
    shards = [tasks[i:i + SHARD_SIZE] for i in range(0, len(tasks), SHARD_SIZE)]
    manifest = {"omnilabel": __version__, "command": "train-prompter", "train_sha256": file_sha256(train.coco),
                "val_sha256": None if val is None else file_sha256(val.coco), "n_images": len(tasks),
                "hpg": config_dict(hpg), "recipe": config_dict(recipe),
                "models": {role: [ref.source, ref.sha256] for role, ref in sorted(refs.items())}}
    state_path = jobdir.path / TRAIN_STATE
    if job.resume and not (jobdir.path / "manifest.json").exists():
        raise JobError(f"--resume: no run in {jobdir.path} to continue")
    if not job.resume and state_path.exists() and not job.overwrite:
        raise JobError(f"{jobdir.path} holds an earlier run: pass --resume to continue it, --overwrite to start again")
    if job.overwrite:
        state_path.unlink(missing_ok=True)
    jobdir.open(manifest, overwrite=job.overwrite)

    def worker_args() -> tuple:
        models = resolve_refs(refs, on_event=on_event) if job.address is None else refs
        return (spec, models, hpg, recipe)

    run_unfinished_shards(jobdir, shards, worker_args=worker_args,
                          executor=executor or executor_for(job, SampleWorker, task_from_dict, on_event),
                          on_event=on_event)
    errors: list[str] = []
    good = list(finished_records(jobdir, len(shards), errors))
    errors_path = jobdir.path / "errors.jsonl"
    write_errors(errors, errors_path)
    train_files = [Path(r["sample"]) for r in good if r["split"] == "train"]
    val_files = [Path(r["sample"]) for r in good if r["split"] == "val"]
    if not train_files:
        raise JobError(f"all {sum(t.split == 'train' for t in tasks)} training images failed (see {errors_path})")
    if errors:
        emit(on_event, "warning", message=f"{len(errors)} images failed and are left out (listed in {errors_path})")
    result = _train(train_files, val_files, state_path, spec, refs, hpg, recipe, job, on_event)
    from omnilabel.teachers.uois import save_prompter

    sam_record = {"id": model_id(str(spec.teacher or spec.sam)), "source": model_source(str(spec.teacher or spec.sam)),
                  **good[0]["sam"]}
    training = {"omnilabel": __version__, "train": model_source(str(train.coco)),
                "val": None if val is None else model_source(str(val.coco)), "images": len(train_files),
                "val_images": len(val_files), "recipe": config_dict(recipe), "best": result["best"],
                "history": result["history"]}
    save_prompter(output, hpg=result["hpg"], hdnet=result["hdnet"], uois=uois, backbone=result["backbone"],
                  sam=sam_record, training=training)
    return {"output": str(output), "images": {"train": len(train_files), "val": len(val_files)},
            "errors": len(errors), "instances": sum(int(r["instances"]) for r in good if r["split"] == "train"),
            "epochs": recipe.epochs, "start_epoch": result["start_epoch"], "best": result["best"],
            "history": result["history"], "job_dir": str(jobdir.path), "wall_s": time.perf_counter() - t0}


def _train(train_files: list[Path], val_files: list[Path], state_path: Path, spec: TeacherSpec,
           refs: dict[str, WeightRef], hpg_config: HpgConfig, recipe: PrompterTrainConfig, job: JobOptions,
           on_event: OnEvent | None) -> dict[str, Any]:
    """The epochs, resumable from ``state_path``; the best (or last) weights of each model."""
    import copy

    import torch

    from omnilabel.models.dinov2 import load_dinov2
    from omnilabel.teachers.teacher_ckpt import state_dict_sha256
    from omnilabel.teachers.uois import HDNet, Hpg
    from omnilabel.teachers.uois_train import PrompterTrainer

    backbone_path = resolve_refs({"backbone": refs["backbone"]}, on_event=on_event)["backbone"]
    backbone = load_dinov2(backbone_path, device=spec.device)
    backbone_record = {"id": model_id(refs["backbone"].source), "source": refs["backbone"].source,
                       "sha256": state_dict_sha256(backbone.state_dict()),
                       "hidden_size": int(backbone.config.hidden_size), "patch_size": int(backbone.config.patch_size)}
    dim = int(np.load(train_files[0])["iou_token"].shape[1])
    with torch.random.fork_rng(devices=[]):  # seeded initialisation, the caller's generator left as it was
        torch.manual_seed(recipe.seed)
        hpg, hdnet = Hpg(backbone, hpg_config), HDNet(dim)
    trainer = PrompterTrainer(hpg, hdnet, recipe, device=spec.device)
    start, history = 0, []
    best: dict[str, Any] = {"hpg": None, "hdnet": None}
    best_state: dict[str, Any] = {}
    if state_path.exists():
        state = torch.load(state_path, map_location=spec.device, weights_only=True)
        trainer.load_state_dict(state["trainer"])
        start, history, best, best_state = state["epoch"], state["history"], state["best"], state["best_state"]
    emit(on_event, "progress", done=start, total=recipe.epochs, unit="epochs")
    for epoch in range(start, recipe.epochs):
        losses = {"epoch": epoch + 1, "train": trainer.train_epoch(train_files, epoch)}
        if val_files:
            losses["val"] = trainer.validate(val_files)
            for name, module in (("hpg", hpg.head), ("hdnet", hdnet)):
                if best[name] is None or losses["val"][name] < best[name]["val_loss"]:
                    best[name] = {"epoch": epoch + 1, "val_loss": losses["val"][name]}
                    best_state[name] = copy.deepcopy(module.state_dict())
        history.append(losses)
        save_torch_atomic({"epoch": epoch + 1, "trainer": trainer.state_dict(), "history": history, "best": best,
                           "best_state": best_state}, state_path)
        emit(on_event, "losses", **losses)
        emit(on_event, "progress", done=epoch + 1, total=recipe.epochs, unit="epochs")
    if val_files:
        hpg.head.load_state_dict(best_state["hpg"])
        hdnet.load_state_dict(best_state["hdnet"])
    return {"hpg": hpg.cpu(), "hdnet": hdnet.cpu(), "backbone": backbone_record, "start_epoch": start,
            "best": best if val_files else None, "history": history}
