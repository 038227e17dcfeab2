"""The ``finetune-teacher`` job: check the input, prepare the run, train in-process or on Ray Train, write the file.

``num_workers = 0`` (the default) trains in this process, without Ray: on one GPU or the CPU, the reference
result. ``num_workers = N`` >= 1 runs N DDP workers under ``ray.train.torch.TorchTrainer`` (NCCL with one GPU
each under ``--device cuda``, gloo on CPU), on a local Ray or the cluster at ``address``. ``batch_size`` is
the global batch, split evenly over the workers; the data each step sees does not depend on N
(``omnilabel.teachers.finetune_data``). On a cluster the run directory must be on storage every node sees:
the workers share its embedding cache and checkpoints, and Ray Train's own files go to ``RUN_DIR/ray``.

A worker group that fails is restarted up to twice and continues from the last checkpoint; ``--resume``
does the same after the whole job was stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from omnilabel import __version__
from omnilabel.data.coco import category_names, load_coco
from omnilabel.errors import InputError, JobError
from omnilabel.io import atomic_path, file_sha256, write_json_atomic
from omnilabel.teachers.finetune import FinetuneConfig
from omnilabel.teachers.finetune_data import collect_training_set
from omnilabel.teachers.finetune_run import FinetuneSetup, RunPaths, train_worker

#: CPUs each Ray Train worker reserves on a CPU-only run: a fraction, so that N workers fit on N cores
#: beside Ray's own processes.
WORKER_CPUS = 0.5
#: Times a failed worker group is restarted (it continues from the last checkpoint).
MAX_FAILURES = 2


def _source(name_or_path: str) -> str:
    """A registry name as is; a path made absolute (recorded in the teacher file)."""
    p = Path(name_or_path).expanduser()
    return str(p.resolve()) if p.exists() else name_or_path


def _clip_record(clip: str, clip_arch: str | None, device: str, names: list[str]) -> tuple[Any, dict[str, Any]]:
    """CLIP text embeddings of the class names, and what the teacher file records about that CLIP."""
    from omnilabel.models.registry import REGISTRY
    from omnilabel.teachers.clip_text import ClipTextEncoder
    from omnilabel.teachers.loading import model_id
    from omnilabel.teachers.teacher_ckpt import state_dict_sha256

    spec = REGISTRY.get(clip)
    model_name = clip_arch or (spec.architecture if spec is not None and spec.kind == "clip" else "ViT-B-32")
    encoder = ClipTextEncoder.from_pretrained(clip, model_name=model_name, device=device)
    table = encoder.encode(names)
    record = {"id": model_id(clip), "source": _source(clip), "model_name": model_name, "width": int(encoder.width),
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
                           "starts again (the embedding cache is kept), or choose another --run-dir")
        if not resume:
            for stale in (paths.state, paths.log, paths.teacher):
                stale.unlink(missing_ok=True)
    paths.root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(manifest, paths.manifest)
    return resume and paths.state.is_file()


def run_finetune_teacher(
    coco: str | Path,
    *,
    output: str | Path,
    config: FinetuneConfig,
    images_dir: str | Path | None = None,
    sam: str = "vit_h",
    clip: str = "clip-vit-b-32",
    clip_arch: str | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    num_workers: int = 0,
    address: str | None = None,
    device: str = "cpu",
    allow_outside_images: bool = False,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune a SAM teacher on the fully annotated images of a COCO file and write the teacher file.

    Args:
        coco: COCO JSON; annotations with a ``segmentation`` are trained on, the rest ignored.
        output: the teacher file to write (``.pt``).
        config: the recipe.
        images_dir: folder of the images (default: the JSON's folder).
        sam: base SAM, a registry name or a checkpoint path.
        clip: CLIP for the class module (class-aware runs only), a registry name or a checkpoint path.
        clip_arch: its ``open_clip`` architecture (default: the registry's, else ``ViT-B-32``).
        run_dir: checkpoints, embedding cache and log (default: ``OUTPUT`` without ``.pt`` + ``.run``).
        resume: continue the run in ``run_dir``. overwrite: start it again.
        num_workers: 0 in this process; N >= 1 DDP workers on Ray Train.
        address: Ray cluster to join (default: a local Ray).
        device: ``cpu`` or ``cuda`` (with Ray, each worker takes one GPU).
        allow_outside_images: accept ``file_name``s outside ``images_dir``.
        on_log: called with each loss report (see ``train_worker``).

    Returns:
        Summary: ``output``, ``run_dir``, ``size_mb``, ``images``, ``instances``, ``steps``, ``start_step``,
        ``last`` (the last loss report), ``wall_s``.

    Raises:
        InputError: bad input or flags (before any model loads). CheckpointError: a model cannot be had.
        JobError: the run directory holds another run, or Ray Train failed.
    """
    t0 = time.perf_counter()
    coco, output = Path(coco), Path(output)
    images_dir = Path(images_dir) if images_dir is not None else coco.parent
    if num_workers < 0:
        raise InputError(f"--num-workers must be >= 0, got {num_workers}")
    if num_workers == 0 and address is not None:
        raise InputError("--num-workers 0 trains in this process; it cannot be combined with --address")
    if config.batch_size % max(num_workers, 1):
        raise InputError(f"--batch-size {config.batch_size} is the global batch: it must be a multiple of "
                         f"--num-workers {num_workers}")
    if device.startswith("cuda") and num_workers == 0:
        import torch

        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: no CUDA device is available here; use --device cpu")
    data = load_coco(coco, images_dir=images_dir, allow_outside_images=allow_outside_images)
    images, instances = collect_training_set(data, images_dir, allow_outside_images=allow_outside_images,
                                             source=str(coco))

    from omnilabel.models.registry import resolve
    from omnilabel.models.sam_loader import load_sam
    from omnilabel.teachers.loading import model_id
    from omnilabel.teachers.teacher_ckpt import file_size_mb, state_dict_sha256

    base_path = resolve(sam, kind="sam")
    encoder_sha = state_dict_sha256(load_sam(base_path).image_encoder.state_dict())
    class_ids: tuple[int, ...] = ()
    class_text, clip_rec = None, None
    if config.class_aware:
        names = category_names(data)
        class_ids = tuple(sorted(names))
        class_text, clip_rec = _clip_record(clip, clip_arch, "cpu", [names[c] for c in class_ids])

    paths = RunPaths(run_dir if run_dir is not None else output.with_name(output.name.removesuffix(".pt") + ".run"))
    manifest = {"omnilabel": __version__, "command": "finetune-teacher", "input_sha256": file_sha256(coco),
                "images_dir": str(images_dir.resolve()), "base_encoder_sha256": encoder_sha,
                "clip_sha256": clip_rec["sha256"] if clip_rec else None, "config": config.to_dict()}
    _open_run(paths, manifest, resume=resume, overwrite=overwrite)
    setup = FinetuneSetup(config=config, base_path=str(base_path), base_id=model_id(sam), base_source=_source(sam),
                          base_encoder_sha256=encoder_sha, images=tuple(images), instances=tuple(instances),
                          run_dir=str(paths.root.resolve()), class_ids=class_ids, class_text=class_text, clip=clip_rec)
    if num_workers == 0:
        result = train_worker(setup, device=device, on_log=on_log)
    else:
        result = _fit_on_ray(setup, num_workers=num_workers, address=address, device=device, on_log=on_log)
    _copy_atomic(paths.teacher, output)
    return {"output": str(output), "run_dir": str(paths.root), "size_mb": file_size_mb(output), "images": len(images),
            "instances": len(instances), "wall_s": time.perf_counter() - t0, **result}


def _copy_atomic(src: Path, dst: Path) -> None:
    if not src.is_file():
        raise JobError(f"the run ended without writing {src}")
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _ray_train_loop(loop_config: dict[str, Any]) -> None:
    """Body of each Ray Train worker: one rank of ``train_worker`` (the process group is set up by Ray)."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    device = str(ray.train.torch.get_device()) if loop_config["use_gpu"] else "cpu"
    train_worker(loop_config["setup"], rank=ctx.get_world_rank(), world_size=ctx.get_world_size(), device=device)


def _fit_on_ray(setup: FinetuneSetup, *, num_workers: int, address: str | None, device: str,
                on_log: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from omnilabel.jobs.ray_runner import RayOptions, init_ray

    use_gpu = device.startswith("cuda")
    init_ray(RayOptions(address=address, num_workers=num_workers, device=device))
    threads = 0 if use_gpu else max((os.cpu_count() or 1) // num_workers, 1)
    setup = dataclasses.replace(setup, threads=threads)
    paths = RunPaths(setup.run_dir)
    start = _last_step(paths)
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config={"setup": setup, "use_gpu": use_gpu},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": WORKER_CPUS}),
        run_config=RunConfig(name="finetune-teacher", storage_path=str((paths.root / "ray").resolve()),
                             failure_config=FailureConfig(max_failures=MAX_FAILURES)),
    )
    with _tail_log(paths.log, on_log):
        try:
            trainer.fit()
        except Exception as exc:  # Ray wraps worker errors in several of its own types
            raise JobError(f"fine-tuning on Ray Train failed: {exc}") from exc
    last = {}
    if paths.log.is_file():
        lines = [ln for ln in paths.log.read_text().splitlines() if ln.strip()]
        last = json.loads(lines[-1]) if lines else {}
    return {"steps": setup.config.steps, "start_step": start, "last": last}


def _last_step(paths: RunPaths) -> int:
    if not paths.state.is_file():
        return 0
    import torch

    return int(torch.load(paths.state, map_location="cpu", weights_only=True)["step"])


@contextlib.contextmanager
def _tail_log(path: Path, on_log: Callable[[dict[str, Any]], None] | None) -> Iterator[None]:
    """Call ``on_log`` with each line rank 0 appends to the log while the block runs (Ray runs only)."""
    if on_log is None:
        yield
        return
    offset = path.stat().st_size if path.is_file() else 0
    stop = threading.Event()

    def poll() -> None:
        nonlocal offset
        while True:
            finished = stop.wait(0.5)
            if path.is_file():
                with open(path) as f:
                    f.seek(offset)
                    chunk = f.read()
                complete = chunk[:chunk.rfind("\n") + 1]
                offset += len(complete.encode())
                for line in complete.splitlines():
                    if line.strip():
                        on_log(json.loads(line))
            if finished:
                return

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def training_progress(console: Console, *, label: str = "finetune-teacher") -> Iterator[Callable[[dict], None]]:
    """A rich bar (step / total, loss, lr, elapsed, ETA); yields the ``on_log`` callback that drives it."""
    progress = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                        TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)
    task = progress.add_task(label, total=None, loss="-", lr="-")

    def on_log(rec: dict[str, Any]) -> None:
        progress.update(task, completed=rec["step"], total=rec["steps"], loss=f"{rec['loss']:.4f}",
                        lr=f"{rec['lr']:.1e}")

    with progress:
        yield on_log
