"""The student's training loop: one function that runs in this process or on each Ray Train worker.

It knows nothing of Ray: the caller says which worker it is (``rank`` of ``world_size``, with the
``torch.distributed`` process group already initialised when there are several) and on which device.
Worker 0 writes everything into the run directory — step checkpoints (every ``checkpoint_every`` steps and
at each epoch end, atomically, the last ``keep_checkpoints`` kept), ``best.pt`` (best validation AP),
``metrics.jsonl`` — so on a cluster the run directory must be on storage every node sees.

Optimiser (Mask2Former): AdamW, ``lr`` for the heads and ``lr · backbone_lr_mult`` for the backbone, no
weight decay on normalisation layers and embeddings, the gradient norm of the full model clipped to
``grad_clip_norm``; the learning rate follows ``lr_schedule`` per step, no warm-up (:func:`lr_factor`):
``multistep`` (the ``paper`` preset, Mask2Former COCO: × ``lr_gamma`` 0.1 at 88.9 % and 96.3 % of the steps)
or ``poly`` (the ``tiny`` preset: ``(1 - step / total) ** poly_power``). The factor is a function of the step
alone, so a resumed run follows the same schedule as an uninterrupted one.
Mixed precision on GPU (bf16 where supported, else fp16 with loss scaling); float32 on the CPU.

With ``uncertainty`` (``--uncertainty``) each pseudomask's mask terms are weighted per point by its certainty
``1 - u`` (``omnilabel.students.loss``); the maps are located before the first step and read with each sample.

Validation predicts at the student's evaluation size (``student.json``; see ``omnilabel.students.data``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from omnilabel.data.coco import load_coco, resolve_image_path
from omnilabel.data.images import read_image_rgb
from omnilabel.errors import InputError
from omnilabel.models.precision import autocast, needs_loss_scaling
from omnilabel.students.certainty import pseudomask_uncertainty_paths
from omnilabel.students.data import EpochBatchSampler, TrainDataset, collate, training_samples
from omnilabel.students.inference import PredictConfig, coco_results, predict_images
from omnilabel.students.loss import total_loss
from omnilabel.students.mask2former import backbone_of, build_model, load_weights, set_train_mode
from omnilabel.students.run import (
    BEST,
    METRICS,
    RunSetup,
    TrainConfig,
    checkpoint_path,
    eval_sizes,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    read_student,
    save_checkpoint,
)

_NORMS = (torch.nn.BatchNorm2d, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.Embedding)


def param_groups(model: torch.nn.Module, *, lr: float, weight_decay: float, backbone_lr_mult: float
                 ) -> list[dict[str, Any]]:
    """AdamW groups: backbone / rest x decayed / not (norm layers and embeddings get no weight decay)."""
    backbone = {id(p) for p in backbone_of(model).parameters()}
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                groups.setdefault((id(p) in backbone, not isinstance(module, _NORMS)), []).append(p)
    return [{"params": ps, "lr": lr * (backbone_lr_mult if in_backbone else 1.0),
             "weight_decay": weight_decay if decay else 0.0}
            for (in_backbone, decay), ps in sorted(groups.items())]


def lr_factor(step: int, *, total_steps: int, train: TrainConfig) -> float:
    """The learning-rate factor of optimiser step ``step`` (0-based) of ``total_steps``.

    ``multistep``: ``lr_gamma ** n``, n the milestones ``round(f · total_steps)`` (f in ``lr_steps``) that are
    <= ``step`` (detectron2's WarmupMultiStepLR, without warm-up). ``poly``: ``(1 - step / total_steps) **
    poly_power``, 0 past the end (detectron2's WarmupPolyLR).

    Raises:
        InputError: an unknown ``lr_schedule``.
    """
    if train.lr_schedule == "multistep":
        passed = sum(step >= round(f * total_steps) for f in train.lr_steps)
        return train.lr_gamma ** passed
    if train.lr_schedule == "poly":
        return max(1.0 - step / total_steps, 0.0) ** train.poly_power
    raise InputError(f"unknown lr_schedule {train.lr_schedule!r}; choose multistep or poly")


def build_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int, train: TrainConfig
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_factor`; step it after every optimiser step. Its state is only the
    step count, so loading a checkpoint's state resumes the schedule exactly."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps=total_steps, train=train))


class MetricsLog:
    """Worker 0 appends one JSON line per event to ``metrics.jsonl`` and passes it to ``on_metrics``."""

    def __init__(self, run_dir: Path, *, rank: int, on_metrics: Callable[[dict[str, Any]], None] | None) -> None:
        self.path, self.rank, self.on_metrics = run_dir / METRICS, rank, on_metrics

    def __call__(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        if self.on_metrics is not None:
            self.on_metrics(record)


class Validator:
    """COCO segm AP of the student on the validation set, each worker predicting its share of the images."""

    def __init__(self, setup: RunSetup, student: dict[str, Any], *, rank: int, world_size: int) -> None:
        from omnilabel.eval.coco_eval import evaluate_segm

        self.evaluate = evaluate_segm
        self.gt = load_coco(setup.val_json, allow_outside_images=setup.allow_outside_images)
        images_dir = Path(setup.val_images_dir or Path(setup.val_json).parent)
        self.tasks = [(img["id"], resolve_image_path(images_dir, img["file_name"],
                                                     allow_outside_images=setup.allow_outside_images))
                      for img in self.gt["images"]][rank::world_size]
        self.category_ids, self.sizes = student["category_ids"], eval_sizes(student)
        self.world_size = world_size
        self.config = PredictConfig(batch_size=max(setup.train.batch_size // world_size, 1))

    def __call__(self, model: torch.nn.Module, device: torch.device) -> dict[str, float] | None:
        """AP, AP50, AP75, APs, APm, APl on worker 0; None on the others."""
        model.eval()
        results: list[dict[str, Any]] = []
        for lo in range(0, len(self.tasks), 32):
            chunk = self.tasks[lo:lo + 32]
            preds = predict_images(model, [read_image_rgb(p) for _, p in chunk], **self.sizes,
                                   config=self.config, device=device)
            for (image_id, _), (masks, scores, labels) in zip(chunk, preds, strict=True):
                results += coco_results(image_id, masks, scores, labels, category_ids=self.category_ids)
        if self.world_size > 1:
            gathered: list[Any] = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, results)
            results = [r for part in gathered for r in part]
            if torch.distributed.get_rank() != 0:
                return None
        return self.evaluate(results, self.gt)


def train_loop(setup: RunSetup, *, device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
               on_metrics: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train (or resume) the student described by the run directory's ``student.json``.

    Args:
        setup: data, training settings, weights to start from, whether to resume.
        device: this worker's device.
        rank: this worker's index. world_size: number of workers (process group initialised when > 1).
        on_metrics: worker 0 calls it with each metrics record (see ``metrics.jsonl``).

    Returns:
        Summary: ``steps``, ``epochs``, ``best_ap``, ``last_checkpoint``, ``counts`` (annotations used and
        dropped), ``resumed_from``.

    Raises:
        InputError: no training image has a usable mask; with ``uncertainty``, a pseudomask without its
            uncertainty map (or none at all), or a map not of its image's size. CheckpointError: bad weights or
            checkpoint.
    """
    cfg, run_dir, device = setup.train, Path(setup.run_dir), torch.device(device)
    if setup.threads:
        torch.set_num_threads(setup.threads)
    torch.manual_seed(cfg.seed)
    student = read_student(run_dir)
    data = load_coco(setup.train_json, allow_outside_images=setup.allow_outside_images)
    uncertainty_paths = (pseudomask_uncertainty_paths(data, setup.train_json, min_score=cfg.min_score)
                         if cfg.uncertainty else None)
    samples, counts = training_samples(data, Path(setup.images_dir), category_ids=student["category_ids"],
                                       min_score=cfg.min_score, pseudo_weight=cfg.pseudo_weight,
                                       allow_outside_images=setup.allow_outside_images,
                                       uncertainty_paths=uncertainty_paths)
    if not samples:
        raise InputError(f"{setup.train_json}: no image has a usable mask to train on ({dict(counts)})")
    # The driver hands over a clean run directory unless resuming, so a checkpoint here is this run's: that of
    # an earlier invocation (--resume) or of a worker group Ray restarted after a failure.
    resume_path = latest_checkpoint(run_dir)
    model = build_model(student["mask2former"], source=None if resume_path else setup.source).to(device)
    frozen_bn = bool(student.get("frozen_backbone_bn"))
    set_train_mode(model, freeze_backbone_bn=frozen_bn)  # before the optimiser and DDP see requires_grad
    optimizer = torch.optim.AdamW(param_groups(model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                               backbone_lr_mult=cfg.backbone_lr_mult), lr=cfg.lr)
    steps_per_epoch = EpochBatchSampler.steps_per_epoch(len(samples), cfg.batch_size)
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    scheduler = build_scheduler(optimizer, total_steps=total, train=cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=needs_loss_scaling(device))
    step, best_ap = 0, None
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path)
        load_weights(model, ckpt["model"], source=str(resume_path))
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        step, best_ap = int(ckpt["step"]), ckpt.get("best_ap")
    net: torch.nn.Module = model
    if world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    validator = Validator(setup, student, rank=rank, world_size=world_size) if setup.val_json else None
    log = MetricsLog(run_dir, rank=rank, on_metrics=on_metrics)
    log({"event": "start", "step": step, "total_steps": total, "steps_per_epoch": steps_per_epoch,
         "epochs": -(-total // steps_per_epoch), "images": len(samples), "workers": world_size,
         "resumed_from": str(resume_path) if resume_path else None, "counts": dict(counts)})
    dataset = TrainDataset(samples, image_size=student["config"]["image_size"], scale_range=tuple(cfg.scale_range),
                           hflip_prob=cfg.hflip_prob)
    window = {"loss": 0.0, "n": 0, "t": time.perf_counter()}
    last_saved = step if resume_path else -1

    def save(epoch_end: bool) -> None:
        nonlocal last_saved
        t_save = time.perf_counter()
        if rank == 0 and last_saved != step:
            save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "step": step,
                             "best_ap": best_ap}, checkpoint_path(run_dir, step))
            prune_checkpoints(run_dir, keep=cfg.keep_checkpoints)
            log({"event": "checkpoint", "step": step, "epoch_end": epoch_end})
        last_saved = step
        window["t"] += time.perf_counter() - t_save  # checkpoints do not count against images/s

    while step < total:
        epoch, skip = divmod(step, steps_per_epoch)
        sampler = EpochBatchSampler(len(samples), batch_size=cfg.batch_size, seed=cfg.seed, epoch=epoch, rank=rank,
                                    world_size=world_size, skip_steps=skip)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data_workers,
                                             collate_fn=collate, pin_memory=device.type == "cuda")
        set_train_mode(net, freeze_backbone_bn=frozen_bn)
        for batch in loader:
            # The loss's random points depend on (seed, step, worker) only: a resumed run continues exactly.
            torch.manual_seed(cfg.seed * 1_000_003 + step * 1_009 + rank)
            loss = _train_step(net, model, batch, optimizer, scaler, device=device, clip=cfg.grad_clip_norm)
            scheduler.step()
            step += 1
            window["loss"] += loss
            window["n"] += 1
            if step % cfg.log_every == 0 or step == 1 or step == total:
                now = time.perf_counter()
                log({"event": "step", "step": step, "epoch": epoch, "loss": window["loss"] / window["n"],
                     "lr": max(g["lr"] for g in optimizer.param_groups),
                     "images_per_s": window["n"] * cfg.batch_size / max(now - window["t"], 1e-9),
                     "s_per_step": (now - window["t"]) / window["n"]})
                window.update(loss=0.0, n=0, t=time.perf_counter())
            if step % cfg.checkpoint_every == 0:
                save(epoch_end=False)
            if step >= total:
                break
        save(epoch_end=True)
        t_val = time.perf_counter()
        if validator is not None:
            metrics = validator(model, device)
            if rank == 0 and metrics is not None:
                is_best = best_ap is None or metrics["AP"] > best_ap
                if is_best:
                    best_ap = metrics["AP"]
                    save_checkpoint({"model": model.state_dict(), "step": step, "val": metrics}, run_dir / BEST)
                log({"event": "epoch", "step": step, "epoch": epoch, "val": metrics, "best": is_best})
            set_train_mode(net, freeze_backbone_bn=frozen_bn)
        else:
            log({"event": "epoch", "step": step, "epoch": epoch})
        window["t"] += time.perf_counter() - t_val  # validation does not count against images/s
    last = latest_checkpoint(run_dir)
    summary = {"steps": step, "total_steps": total, "epochs": -(-step // steps_per_epoch), "best_ap": best_ap,
               "last_checkpoint": str(last) if last else None, "counts": dict(counts),
               "resumed_from": str(resume_path) if resume_path else None}
    log({"event": "done", **summary})
    return summary


def _train_step(net: torch.nn.Module, model: torch.nn.Module, batch: dict[str, Any], optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, *, device: torch.device, clip: float) -> float:
    """One optimiser step on one batch; returns the (scaled-by-weight_dict) total loss."""
    non_blocking = device.type == "cuda"
    pixels = batch["pixel_values"].to(device, non_blocking=non_blocking)
    masks = [m.to(device, non_blocking=non_blocking) for m in batch["mask_labels"]]
    labels = [c.to(device) for c in batch["class_labels"]]
    weights = [w.to(device) for w in batch["weights"]]
    certainty = ([c.to(device, non_blocking=non_blocking) for c in batch["certainty"]] if "certainty" in batch
                 else None)
    with autocast(device):
        outputs = net(pixel_values=pixels, output_auxiliary_logits=True)
    aux = [{k: v.float() for k, v in layer.items()} for layer in outputs.auxiliary_logits or []]
    losses = model.criterion(outputs.masks_queries_logits.float(), outputs.class_queries_logits.float(), masks,
                             labels, auxiliary_predictions=aux, target_weights=weights, target_certainty=certainty)
    loss = total_loss(losses, model.weight_dict)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    if clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip)
    scaler.step(optimizer)
    scaler.update()
    return float(loss.detach())
