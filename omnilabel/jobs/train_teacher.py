"""The ``finetune-teacher`` job: check the input, prepare the run, train in-process or on Ray Train, write the file.

``num_workers = 0`` (the default) trains in this process, without Ray: on one GPU or the CPU, the reference
result. ``num_workers = N`` >= 1 runs N DDP workers under ``ray.train.torch.TorchTrainer`` (NCCL with one GPU
each under ``--device cuda``, gloo on CPU), on a local Ray or the cluster at ``address``. ``batch_size`` is
the global batch, split evenly over the workers; the data each step sees does not depend on N
(``omnilabel.teachers.finetune_data``). On a cluster the run directory must be on storage every node sees:
the workers share its embedding cache and checkpoints, and Ray Train's own files go to ``RUN_DIR/ray``.

A worker group that fails is restarted up to twice and continues from the last checkpoint
(``omnilabel.jobs.ray_train``); ``--resume`` does the same after the whole job was stopped.

``FinetuneConfig.stable`` trains Stable-SAM's plugins on a frozen SAM (``omnilabel.teachers.stable``) and
writes a plugin-only teacher file; with ``teacher`` the plugins sit on that fine-tuned teacher's decoder, and
the file records it (its sha256 and absolute path) so that loading stacks the two.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omnilabel import __version__
from omnilabel.data.coco import category_names, load_coco
from omnilabel.errors import CheckpointError, JobError
from omnilabel.events import OnEvent
from omnilabel.io import atomic_path, file_sha256, write_json_atomic
from omnilabel.jobs.options import Dataset, JobOptions
from omnilabel.teachers.finetune import FinetuneConfig
from omnilabel.teachers.finetune_data import collect_training_set, collect_unlabeled
from omnilabel.teachers.finetune_run import FinetuneSetup, RunPaths, train_worker


@dataclass(frozen=True)
class TeacherRecipe:
    """What ``finetune-teacher`` trains: the recipe and the models it starts from.

    Attributes:
        finetune: the recipe; its ``batch_size`` is replaced by the job's when given.
        sam: base SAM, a registry name or a checkpoint path; None: the base of ``teacher``, else ``vit_h``
            (the paper's).
        clip: CLIP for the class module (class-aware runs only), a registry name or a checkpoint path.
        clip_arch: its ``open_clip`` architecture (default: the registry's, else ``ViT-B-32``).
        teacher: a fine-tuned teacher file to start from (its prompt encoder and decoder, on its encoder);
            for ``prompts refine``, the teacher whose pseudomasks the refiner will refine.
        unlabeled: SUM training: a pseudomask file with uncertainty maps (``omnilabel uncertainty``), its
            images under the same ``--images``; its pseudomasks are the unlabelled half of every batch.
        epochs: when set, the run's steps are ``ceil(epochs · instances / batch_size)`` instead of the
            recipe's (``finetune-teacher --stable`` without ``--steps``: Stable-SAM's 1 epoch).
    """

    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    sam: str | None = None
    clip: str = "clip-vit-b-32"
    clip_arch: str | None = None
    teacher: str | None = None
    unlabeled: str | None = None
    epochs: float | None = None


def _clip_record(clip: str, clip_arch: str | None, device: str, names: list[str]) -> tuple[Any, dict[str, Any]]:
    """CLIP text embeddings of the class names, and what the teacher file records about that CLIP."""
    from omnilabel.models.registry import REGISTRY
    from omnilabel.teachers.clip_text import ClipTextEncoder
    from omnilabel.teachers.loading import model_id, model_source
    from omnilabel.teachers.teacher_ckpt import state_dict_sha256

    spec = REGISTRY.get(clip)
    model_name = clip_arch or (spec.architecture if spec is not None and spec.kind == "clip" else "ViT-B-32")
    encoder = ClipTextEncoder.from_pretrained(clip, model_name=model_name, device=device)
    table = encoder.encode(names)
    record = {"id": model_id(clip), "source": model_source(clip), "model_name": model_name, "width": int(encoder.width),
              "sha256": state_dict_sha256(encoder.model.state_dict())}
    return table, record


def _open_run(paths: RunPaths, manifest: dict[str, Any], *, resume: bool, overwrite: bool) -> bool:
    """Start or continue a run directory; returns whether a checkpoint is continued.

    Raises:
        JobError: it holds another run (with ``resume``), or any run (without ``resume`` or ``overwrite``).
    """
    manifest = json.loads(json.dumps(manifest))
    if paths.manifest.exists():
        try:
            old = json.loads(paths.manifest.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        if resume and old != manifest:
            changed = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            raise JobError(f"run directory {paths.root} holds another run (differs in: {', '.join(changed)}); "
                           "rerun with its settings, or --overwrite to start again")
        if not resume and not overwrite:
            raise JobError(f"run directory {paths.root} already holds a run: --resume continues it, --overwrite "
                           "starts again (the embedding cache is kept), or choose another --job-dir")
        if not resume:
            for stale in (paths.state, paths.log, paths.teacher):
                stale.unlink(missing_ok=True)
            for pairs in paths.root.glob("embeddings/*/pairs-*"):  # a refiner's pairs are recomputed
                shutil.rmtree(pairs)
    paths.root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(manifest, paths.manifest)
    return resume and paths.state.is_file()


def run_finetune_teacher(inputs: Dataset, output: str | Path, job: JobOptions | None = None,
                         config: TeacherRecipe | None = None, *, on_event: OnEvent | None = None) -> dict[str, Any]:
    """Fine-tune a SAM teacher on the fully annotated images of a COCO file and write the teacher file.

    Args:
        inputs: COCO JSON (annotations with a ``segmentation`` are trained on, the rest ignored) and images.
        output: the teacher file to write (``.pt``).
        job: workers (0: this process; N: Ray Train DDP workers), address, device, global batch (default:
            the recipe's), run directory (``job_dir``, default ``OUTPUT`` without ``.pt`` + ``.run``),
            resume, overwrite.
        config: the recipe and the models it starts from.
        on_event: each loss report (``start``, ``step`` events: step, total, loss, lr).

    Returns:
        Summary: ``output``, ``run_dir``, ``size_mb``, ``images``, ``instances``, ``steps``, ``start_step``,
        ``trainable_parameters``, ``last`` (the last loss report), ``wall_s``.

    Raises:
        InputError: bad input or flags (before any model loads). CheckpointError: a model cannot be had.
        JobError: the run directory holds another run, or Ray Train failed.
    """
    t0 = time.perf_counter()
    job, config = job or JobOptions(), config or TeacherRecipe()
    recipe = config.finetune
    if job.batch_size is not None:
        recipe = dataclasses.replace(recipe, batch_size=job.batch_size)
    if config.unlabeled is not None:
        recipe = dataclasses.replace(recipe, unlabeled=True)
    job.check_global_batch(recipe.batch_size)
    output, images_dir = Path(output), inputs.images_dir
    data = load_coco(inputs.coco, images_dir=images_dir, allow_outside_images=inputs.allow_outside_images)
    images, instances = collect_training_set(data, images_dir, allow_outside_images=inputs.allow_outside_images,
                                             source=str(inputs.coco),
                                             pseudo=not (recipe.unlabeled or recipe.prompts == "refine"))
    unlabeled: list = []
    if config.unlabeled is not None:
        pseudo = load_coco(config.unlabeled, images_dir=images_dir, allow_outside_images=inputs.allow_outside_images)
        unlabeled = collect_unlabeled(pseudo, images_dir, images, map_dir=Path(config.unlabeled).parent,
                                      allow_outside_images=inputs.allow_outside_images, source=str(config.unlabeled))
    if config.epochs is not None:
        recipe = dataclasses.replace(recipe, steps=max(1, math.ceil(config.epochs * len(instances)
                                                                    / recipe.batch_size)))

    from omnilabel.models.registry import resolve
    from omnilabel.models.sam_loader import load_sam
    from omnilabel.teachers.loading import DEFAULT_SAM, model_id, model_source
    from omnilabel.teachers.teacher_ckpt import file_size_mb, state_dict_sha256

    start, start_sha = _start_teacher(config.teacher)
    sam_name = config.sam or (start.base_source if start is not None else DEFAULT_SAM)
    base_path: Path | None = None
    if start is not None and start.encoder_included:
        encoder_sha = start.encoder_sha256
    else:
        base_path = resolve(sam_name, kind="sam", on_event=on_event)
        encoder_sha = state_dict_sha256(load_sam(base_path).image_encoder.state_dict())
        if start is not None and start.encoder_sha256 != encoder_sha:
            raise CheckpointError(f"teacher {start.path} was fine-tuned from SAM {start.meta['base']['id']!r}, "
                                  f"not from {sam_name}; pass --sam {start.base_source}")
    class_ids: tuple[int, ...] = ()
    class_text, clip_rec = None, None
    if recipe.class_aware:
        names = category_names(data)
        class_ids = tuple(sorted(names))
        class_text, clip_rec = _clip_record(config.clip, config.clip_arch, "cpu", [names[c] for c in class_ids])

    paths = RunPaths(job.job_dir_for(output, ".run"))
    manifest = {"omnilabel": __version__, "command": "finetune-teacher", "input_sha256": file_sha256(inputs.coco),
                "images_dir": str(images_dir), "base_encoder_sha256": encoder_sha, "start_teacher_sha256": start_sha,
                "unlabeled_sha256": None if config.unlabeled is None else file_sha256(config.unlabeled),
                "clip_sha256": clip_rec["sha256"] if clip_rec else None, "config": recipe.to_dict()}
    _open_run(paths, manifest, resume=job.resume, overwrite=job.overwrite)
    base_id, base_source = model_id(sam_name), model_source(sam_name)
    if start is not None and config.sam is None:
        base_id, base_source = str(start.meta["base"]["id"]), start.base_source
    setup = FinetuneSetup(config=recipe, base_path=None if base_path is None else str(base_path), base_id=base_id,
                          base_source=base_source, base_encoder_sha256=encoder_sha, images=tuple(images),
                          instances=tuple(instances), run_dir=str(paths.root.resolve()), class_ids=class_ids,
                          class_text=class_text, clip=clip_rec,
                          threads=0 if job.in_process or job.gpu else job.threads_per_worker(),
                          start_teacher=None if start is None else str(start.path.resolve()),
                          start_teacher_sha256=start_sha, unlabeled=tuple(unlabeled),
                          start_encoder_included=start is not None and start.encoder_included)
    if job.in_process:
        result = train_worker(setup, device=job.device, on_event=on_event)
    else:
        from omnilabel.jobs.ray_train import fit_on_ray

        first = _last_step(paths)
        records = fit_on_ray(train_worker, setup, job=job, name="finetune-teacher", run_dir=paths.root,
                             log=paths.log, on_event=on_event)
        losses = [r for r in records if r.get("event") == "step"]
        pairs = [r for r in records if r.get("event") == "pairs"]
        starts = [r for r in records if r.get("event") == "start"]
        result = {"steps": recipe.steps, "start_step": first, "last": losses[-1] if losses else {},
                  "trainable_parameters": starts[-1].get("trainable_parameters") if starts else None,
                  "pairs": {"kept": pairs[-1]["kept"], "dropped": pairs[-1]["dropped"]} if pairs else None}
    _copy_atomic(paths.teacher, output)
    return {"output": str(output), "run_dir": str(paths.root), "size_mb": file_size_mb(output), "images": len(images),
            "instances": len(instances), "unlabeled": len(unlabeled), "wall_s": time.perf_counter() - t0, **result}


def _start_teacher(path: str | None) -> tuple[Any, str | None]:
    """The teacher file a run starts from, read and hashed (``(None, None)`` without one).

    Raises:
        CheckpointError: unreadable, or a kind a run cannot start from (class-aware, a refiner, Stable-SAM
            plugins).
    """
    if path is None:
        return None, None
    from omnilabel.teachers.teacher_ckpt import read_teacher

    tf = read_teacher(path)
    if tf.class_aware:
        raise CheckpointError(f"--teacher {path}: fine-tuning starts from a teacher without a class module; "
                              "this one is class-aware")
    if tf.meta.get("prompts") == "refine":
        raise CheckpointError(f"--teacher {path} is a refiner (finetune-teacher --prompts refine): start from the "
                              "teacher that makes the pseudomasks")
    if tf.is_stable:
        raise CheckpointError(f"--teacher {path} holds Stable-SAM plugins only: fine-tuning (and a refiner) start "
                              "from a teacher with a decoder; to stack plugins on a fine-tuned teacher, pass that "
                              "teacher to `finetune-teacher --stable --teacher`")
    return tf, file_sha256(tf.path)


def _copy_atomic(src: Path, dst: Path) -> None:
    if not src.is_file():
        raise JobError(f"the run ended without writing {src}")
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _last_step(paths: RunPaths) -> int:
    if not paths.state.is_file():
        return 0
    import torch

    return int(torch.load(paths.state, map_location="cpu", weights_only=True)["step"])
