"""One worker of a fine-tuning run: in-process, or one rank of a Ray Train (DDP) job.

The run directory, shared by every worker (on a cluster it must be on storage every node sees)::

    RUN_DIR/
      run.json                   what the run is (input, base, settings); a resume must match it
      embeddings/<sha[:16]>/     one <image_id>.pt per image, keyed by the encoder's sha256
      checkpoints/last.pt        weights, optimizer state and step of the last checkpoint
      log.jsonl                  one line per loss report
      teacher.pt                 the finished teacher file (plugins only for ``--stable``)

Rank r encodes the images ``i % world_size == r`` that the cache lacks, then all ranks wait for each other.
A run that finds ``checkpoints/last.pt`` continues from it: weights, AdamW state and step are restored, and
the learning rate, data order, prompts and point samples are functions of the step, so the continued run
computes what the uninterrupted one would have. Rank 0 writes checkpoints, the log and the teacher file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from omnilabel.errors import InputError, JobError
from omnilabel.events import OnEvent
from omnilabel.io import append_jsonl, save_torch_atomic
from omnilabel.models.precision import autocast_dtype
from omnilabel.teachers.finetune import (
    FinetuneConfig,
    LossMeter,
    SamTrainable,
    TaskPrompt,
    mask_losses,
    point_generator,
    ua_mask_losses,
)
from omnilabel.teachers.finetune_batch import Batcher
from omnilabel.teachers.finetune_data import (
    EmbeddingCache,
    TrainImage,
    TrainInstance,
)
from omnilabel.teachers.teacher_ckpt import STABLE_VERSION, TEACHER_FORMAT, TEACHER_VERSION, state_dict_sha256
from omnilabel.teachers.uncertainty import PairSet, build_refine_pairs, pair_dir_key

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

__all__ = ["FinetuneSetup", "RunPaths", "train_worker"]


@dataclass(frozen=True)
class FinetuneSetup:
    """Everything a worker needs; plain data, so it pickles to Ray workers.

    Attributes:
        config: the recipe.
        base_path: the base SAM checkpoint file (None when ``start_teacher`` holds its encoder). base_id: its
            short name; base_source: the name or absolute path the user gave (recorded, and the default
            ``--sam`` of ``pseudomask --teacher``).
        base_encoder_sha256: ``state_dict_sha256`` of the image encoder the run decodes from.
        start_teacher: a teacher file to start from instead of the base SAM's decoder (``--teacher``), or None.
        start_teacher_sha256: its file's sha256 (each worker checks it reads the same file).
        start_encoder_included: the start teacher holds its image encoder (then so does the new file).
        unlabeled: SUM training's pseudomasks (``uncertainty`` set), their images among ``images``.
        images: the fully annotated images. instances: their GT masks.
        run_dir: the run directory.
        class_ids: category ids, in the row order of ``class_text``.
        class_text: (K, D) float32 CLIP text embeddings of the categories (class-aware runs).
        clip: the CLIP record of the teacher file (class-aware runs).
        threads: torch CPU threads of this worker (0: leave torch's default).
    """

    config: FinetuneConfig
    base_path: str | None
    base_id: str
    base_source: str
    base_encoder_sha256: str
    images: tuple[TrainImage, ...]
    instances: tuple[TrainInstance, ...]
    run_dir: str
    class_ids: tuple[int, ...] = ()
    class_text: np.ndarray | None = None
    clip: dict[str, Any] | None = None
    threads: int = 0
    start_teacher: str | None = None
    start_teacher_sha256: str | None = None
    start_encoder_included: bool = False
    unlabeled: tuple[TrainInstance, ...] = ()


class RunPaths:
    """Where the files of a run directory live (see the module docstring)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.root = Path(run_dir)
        self.manifest = self.root / "run.json"
        self.state = self.root / "checkpoints" / "last.pt"
        self.log = self.root / "log.jsonl"
        self.teacher = self.root / "teacher.pt"

    def embeddings(self, encoder_sha256: str) -> Path:
        return self.root / "embeddings" / encoder_sha256[:16]


def _distributed(world_size: int) -> bool:
    return world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def encode_missing(sam: Sam, cache: EmbeddingCache, images: tuple[TrainImage, ...], *, rank: int, world_size: int,
                   device: str) -> int:
    """Encode this rank's share of the images that the cache lacks; returns how many it encoded.

    Raises:
        InputError: an image cannot be read, or its size differs from its COCO record (masks would not align).
    """
    from omnilabel.data.images import read_image_rgb
    from omnilabel.teachers.sam import SamTeacher

    teacher = SamTeacher(sam, device=device)
    done = 0
    for i, im in enumerate(images):
        if i % world_size != rank or cache.has(im.image_id):
            continue
        rgb = read_image_rgb(im.path)
        if rgb.shape[:2] != (im.height, im.width):
            raise InputError(f"image id={im.image_id} ({im.path}) is {rgb.shape[1]}x{rgb.shape[0]} but its COCO "
                             f"record says {im.width}x{im.height}")
        emb = teacher.encode(rgb)
        cache.save(im.image_id, emb.features, input_size=emb.input_size, original_size=emb.original_size)
        done += 1
    return done


def _build_model(setup: FinetuneSetup, sam: Sam, device: torch.device) -> SamTrainable:
    cfg = setup.config
    class_prompt = None
    if cfg.class_aware:
        from omnilabel.teachers.class_aware import ClassAwarePrompt

        if setup.class_text is None:
            raise InputError("a class-aware run needs the CLIP text embeddings of its categories")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            class_prompt = ClassAwarePrompt(sam.prompt_encoder, text_dim=int(setup.class_text.shape[1]))
    task_prompt = TaskPrompt(int(sam.prompt_encoder.embed_dim)) if cfg.unlabeled else None
    if cfg.stable:  # the plugins go inside SAM's decoder, so both decode paths use them
        from omnilabel.teachers.stable import install_stable

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            install_stable(sam.mask_decoder)
    return SamTrainable(sam, class_prompt=class_prompt, train_encoder=cfg.train_encoder,
                        task_prompt=task_prompt).to(device)


def _teacher_file(setup: FinetuneSetup, model: SamTrainable, sam: Sam, arch: dict[str, Any],
                  step: int) -> dict[str, Any]:
    """The teacher file's contents. It holds the image encoder when it trained it, and when it started from a
    teacher that holds its own (so it loads on its own as its start does); a refiner never does: it always
    decodes beside the teacher it refines. A Stable-SAM file holds the plugins only."""
    cfg = setup.config
    if cfg.stable:
        return _stable_file(setup, model, arch, step)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    with_encoder = cfg.train_encoder or (setup.start_encoder_included and cfg.prompts != "refine")
    if with_encoder and model.image_encoder is None:
        encoder = sam.image_encoder.state_dict()
        state.update({f"image_encoder.{k}": v.detach().cpu().clone() for k, v in encoder.items()})
    encoder_sha = (state_dict_sha256(model.image_encoder.state_dict()) if model.image_encoder is not None
                   else setup.base_encoder_sha256)
    start = None if setup.start_teacher is None else {"id": Path(setup.start_teacher).name,
                                                      "sha256": setup.start_teacher_sha256}
    return {"format": TEACHER_FORMAT, "version": TEACHER_VERSION, "prompts": cfg.prompts,
            "class_aware": cfg.class_aware, "step": step, "start": start,
            "base": {"id": setup.base_id, "source": setup.base_source, "encoder_sha256": setup.base_encoder_sha256},
            "encoder_sha256": encoder_sha, "encoder_included": with_encoder, "arch": arch,
            "clip": setup.clip, "config": cfg.to_dict(), "state": state}


def _stable_file(setup: FinetuneSetup, model: SamTrainable, arch: dict[str, Any], step: int) -> dict[str, Any]:
    """A plugin-only teacher file (``teacher_ckpt``'s module docstring): the plugins, the checksum of the
    decoder they were trained on, and the start teacher they sit on (when there is one)."""
    from omnilabel.teachers.stable import StableConfig, decoder_sha256, plugins_of

    plugins = plugins_of(model.mask_decoder)
    state = {f"stable.{k}": v.detach().cpu().clone() for k, v in plugins.state_dict().items()}
    start = None if setup.start_teacher is None else {"id": Path(setup.start_teacher).name,
                                                      "sha256": setup.start_teacher_sha256,
                                                      "source": setup.start_teacher}
    return {"format": TEACHER_FORMAT, "version": STABLE_VERSION, "prompts": "stable", "class_aware": False,
            "step": step, "start": start,
            "base": {"id": setup.base_id, "source": setup.base_source, "encoder_sha256": setup.base_encoder_sha256},
            "encoder_sha256": setup.base_encoder_sha256, "encoder_included": False, "decoder_included": False,
            "decoder_sha256": decoder_sha256(model.prompt_encoder, model.mask_decoder),
            "stable": {**StableConfig().to_dict(), "parameters": sum(p.numel() for p in plugins.parameters())},
            "arch": arch, "clip": None, "config": setup.config.to_dict(), "state": state}


def train_worker(setup: FinetuneSetup, *, rank: int = 0, world_size: int = 1, device: str = "cpu",
                 on_event: OnEvent | None = None) -> dict[str, Any]:
    """Run (or continue) the fine-tuning as one worker; with ``world_size`` > 1 the process group must exist.

    Args:
        setup: the run.
        rank: this worker's rank. world_size: number of workers (DDP when > 1).
        device: torch device string of this worker.
        on_event: rank 0 calls it with what it appends to the log: ``{"event": "start", "step", "total_steps",
            "trainable_parameters"}`` once, then each loss report ``{"event": "step", "step", "total_steps", "lr",
            "loss", "mask_loss", "iou_loss", "seconds_per_step"}``, after any checkpoint of that step is written.

    Returns:
        ``{"steps", "start_step", "encoded", "trainable_parameters", "last": the last report}``.

    Raises:
        JobError: the checkpoint in the run directory belongs to another run.
        InputError: an unreadable or mis-sized image.
    """
    from omnilabel.models.sam_loader import sam_arch_from_state_dict

    cfg = setup.config
    if setup.threads > 0:
        torch.set_num_threads(setup.threads)
    dev = torch.device(device)
    paths = RunPaths(setup.run_dir)
    sam = _start_sam(setup, device)
    arch = asdict(sam_arch_from_state_dict(sam.state_dict()))
    cache, encoded, pairs = None, 0, None
    if not cfg.train_encoder:
        cache = EmbeddingCache(paths.embeddings(setup.base_encoder_sha256))
        encoded = encode_missing(sam, cache, setup.images, rank=rank, world_size=world_size, device=device)
        if _distributed(world_size):
            torch.distributed.barrier()
    if cfg.prompts == "refine":
        assert cache is not None
        decoder_sha = state_dict_sha256({**{f"p.{k}": v for k, v in sam.prompt_encoder.state_dict().items()},
                                         **{f"m.{k}": v for k, v in sam.mask_decoder.state_dict().items()}})
        pair_dir = cache.root / pair_dir_key(decoder_sha, cfg.seed, setup.instances)
        build_refine_pairs(sam, cache, setup.images, setup.instances, pair_dir=pair_dir, seed=cfg.seed, rank=rank,
                           world_size=world_size, device=device)
        if _distributed(world_size):
            torch.distributed.barrier()
        pairs = PairSet.read(pair_dir, setup.images, min_iou=cfg.min_iou)
    model = _build_model(setup, sam, dev)
    params = model.freeze_for(cfg)
    if cfg.stable:  # Stable-SAM: Adam
        optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    trainable = sum(p.numel() for p in params)
    start = 0
    if paths.state.is_file():
        state = torch.load(paths.state, map_location=dev, weights_only=True)
        if state.get("config") != cfg.to_dict():
            raise JobError(f"{paths.state} was written by a run with other settings; use another run directory")
        model.load_state_dict(state["model"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
    model.train()
    model.amp_dtype = autocast_dtype(dev)
    net: torch.nn.Module = model
    if _distributed(world_size):
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=True)
    batcher = Batcher(setup, sam, cache=cache, rank=rank, world_size=world_size, device=dev)
    batcher.pairs = pairs
    meter, last = LossMeter(), {}

    def log(record: dict[str, Any]) -> None:
        if rank == 0:
            append_jsonl(record, paths.log)
            if on_event is not None:
                on_event(record)

    if pairs is not None:
        log({"event": "pairs", "kept": len(pairs), "dropped": pairs.dropped, "min_iou": cfg.min_iou})
    log({"event": "start", "step": start, "total_steps": cfg.steps, "trainable_parameters": trainable})

    def reduce(t: torch.Tensor) -> torch.Tensor:
        if not _distributed(world_size):
            return t
        t = t.to(dev)
        torch.distributed.all_reduce(t)
        return (t / world_size).cpu()

    for step in range(start, cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(step)
        inputs, gt, b = batcher(step)
        positions = inputs.pop("positions")
        unlabeled, certainty = inputs.pop("unlabeled", None), inputs.pop("certainty", None)
        outputs = net(**inputs)
        mask_sum, iou_sum = torch.zeros((), device=dev), torch.zeros((), device=dev)
        for g, (logits, iou) in zip(inputs["groups"], outputs, strict=True):
            rows = g["index"].tolist()
            gens = [point_generator(cfg.seed, step, int(positions[r]), dev) for r in rows]
            unl = np.zeros(len(rows), dtype=bool) if unlabeled is None else unlabeled[rows]
            for kind in (False, True):
                sel = np.flatnonzero(unl == kind)
                if not len(sel):
                    continue
                at = torch.as_tensor(sel, device=dev)
                these = g["index"][at]
                if kind:  # pseudomasks: SUM's uncertainty-aware losses
                    m, i = ua_mask_losses(logits[at], iou[at], gt[these], certainty[these], config=cfg,
                                          generators=[gens[k] for k in sel])
                else:
                    m, i = mask_losses(logits[at], iou[at], gt[these], config=cfg,
                                       generators=[gens[k] for k in sel])
                mask_sum, iou_sum = mask_sum + m.sum(), iou_sum + i.sum()
        loss = (mask_sum + cfg.iou_weight * iou_sum) / b
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        meter.add(float(loss.detach()), float(mask_sum.detach()) / b, float(iou_sum.detach()) / b)
        done = step + 1
        if rank == 0 and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            save_torch_atomic({"step": done, "config": cfg.to_dict(), "model": model.state_dict(),
                               "optimizer": optimizer.state_dict()}, paths.state)
        if done % cfg.log_every == 0 or done == cfg.steps:
            last = {"event": "step", "step": done, "total_steps": cfg.steps, "lr": cfg.lr_at(step),
                    **meter.take(reduce)}
            log(last)
    if rank == 0:
        save_torch_atomic(_teacher_file(setup, model, sam, arch, cfg.steps), paths.teacher)
    if _distributed(world_size):
        torch.distributed.barrier()
    return {"steps": cfg.steps, "start_step": start, "encoded": encoded, "trainable_parameters": trainable,
            "last": last,
            "pairs": None if pairs is None else {"kept": len(pairs), "dropped": pairs.dropped}}


def _start_sam(setup: FinetuneSetup, device: str) -> Sam:
    """The SAM the run starts from: the base SAM, or the ``start_teacher``'s decoder on its encoder.

    The driver resolved and hashed the files; on a cluster this worker's node must see the same ones (the
    registry's check names the node and what to do).
    """
    from omnilabel.models.registry import WeightRef, locate
    from omnilabel.models.sam_loader import load_sam
    from omnilabel.teachers.teacher_ckpt import attach_teacher, build_full_sam, read_teacher

    tf = None
    if setup.start_teacher is not None:
        tf = read_teacher(locate(WeightRef("teacher", setup.start_teacher, sha256=setup.start_teacher_sha256)))
        if tf.encoder_included:
            return build_full_sam(tf, device=device)
    if setup.base_path is None:
        raise InputError("a fine-tuning run needs a base SAM, or a teacher that holds its image encoder")
    sam = load_sam(locate(WeightRef("base SAM", setup.base_path)), device=device)
    if tf is None:
        return sam
    return attach_teacher(tf, sam, encoder_sha256=setup.base_encoder_sha256, encoder_name=f"--sam {setup.base_id}")
