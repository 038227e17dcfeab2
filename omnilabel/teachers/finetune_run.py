"""One worker of a fine-tuning run: in-process, or one rank of a Ray Train (DDP) job.

The run directory, shared by every worker (on a cluster it must be on storage every node sees)::

    RUN_DIR/
      run.json                   what the run is (input, base, settings); a resume must match it
      embeddings/<sha[:16]>/     one <image_id>.pt per image, keyed by the encoder's sha256
      checkpoints/last.pt        weights, optimizer state and step of the last checkpoint
      log.jsonl                  one line per loss report
      teacher.pt                 the finished teacher file

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
from omnilabel.ops.boxes import jitter_boxes_xyxy
from omnilabel.teachers.finetune import (
    FinetuneConfig,
    LossMeter,
    SamTrainable,
    TaskPrompt,
    mask_losses,
    point_generator,
    ua_mask_losses,
)
from omnilabel.teachers.finetune_data import (
    EmbeddingCache,
    TrainImage,
    TrainInstance,
    batch_instances,
    decode_mask,
    mask_in_input_frame,
    mixed_batch_instances,
    sample_prompt,
    sample_unlabeled_prompt,
)
from omnilabel.teachers.teacher_ckpt import TEACHER_FORMAT, TEACHER_VERSION, state_dict_sha256
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


def _read_u(inst: TrainInstance, shape: tuple[int, ...]) -> np.ndarray:
    """(H, W) float32 uncertainty map of a pseudomask; it must have its mask's size.

    Raises:
        InputError: unreadable, or another size (naming the annotation).
    """
    from omnilabel.data.maps import read_uncertainty_map

    try:
        u = read_uncertainty_map(str(inst.uncertainty)).values
    except InputError as e:
        raise InputError(f"annotation id={inst.annotation_id}: {e}") from None
    if u.shape != tuple(shape):
        raise InputError(f"annotation id={inst.annotation_id}: uncertainty map {inst.uncertainty} is "
                         f"{u.shape[0]}x{u.shape[1]}, its mask {shape[0]}x{shape[1]}")
    return u


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


class _Batcher:
    """Builds the tensors of one step on one worker."""

    def __init__(self, setup: FinetuneSetup, sam: Sam, *, cache: EmbeddingCache | None, rank: int, world_size: int,
                 device: torch.device) -> None:
        from segment_anything.utils.transforms import ResizeLongestSide

        self.setup, self.sam, self.cache = setup, sam, cache
        self.rank, self.world_size, self.device = rank, world_size, device
        self.image_size = int(sam.image_encoder.img_size)
        self.transform = ResizeLongestSide(self.image_size)
        self.class_rows = {c: i for i, c in enumerate(setup.class_ids)}
        self.text = None if setup.class_text is None else torch.as_tensor(setup.class_text, device=device)
        self._images: dict[int, torch.Tensor] = {}
        #: The refiner's training pairs (``prompts refine``), set by ``train_worker``.
        self.pairs: PairSet | None = None
        self._pair_logits: dict[Any, torch.Tensor] = {}

    def _image(self, index: int) -> torch.Tensor:
        """(3, h', w') uint8 resized image, kept in memory (``--train-encoder`` runs only)."""
        if index not in self._images:
            from omnilabel.data.images import read_image_rgb

            rgb = read_image_rgb(self.setup.images[index].path)
            self._images[index] = torch.as_tensor(self.transform.apply_image(rgb)).permute(2, 0, 1).contiguous()
        return self._images[index]

    def _prompt(self, mask: np.ndarray, *, step: int, position: int, original_size: tuple[int, int],
                certainty: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The prompt of global batch position ``position`` at step ``step``, in SAM's input frame.

        Args:
            mask: (H, W) bool GT mask at the original size ``original_size`` = (H, W).

        Returns:
            ``(point_xy (2,), box_xyxy (4,))`` float64, all-NaN where the prompt has none; the box jittered
            with ``box_jitter`` (``finetune_data``'s choices).
        """
        cfg = self.setup.config
        rng = np.random.default_rng([cfg.seed, step, position])
        if certainty is None:
            point, box = sample_prompt(mask, cfg.prompts, rng)
        else:  # a pseudomask: its point drawn ∝ certainty (SUM §3.2.2)
            point, box = sample_unlabeled_prompt(mask, certainty, cfg.prompts, rng)
        if np.isfinite(point).all():
            point = self.transform.apply_coords(point[None], original_size)[0]
        if np.isfinite(box).all():
            box = self.transform.apply_boxes(box[None], original_size)[0]
            if cfg.box_jitter:
                # the jitter's draws come after the prompt's, from its generator: a pure function of
                # (seed, step, position) again; bounds: the box of a full mask, in SAM's convention
                h, w = original_size
                bounds = self.transform.apply_coords(np.array([[w - 1.0, h - 1.0]]), original_size)[0]
                box = jitter_boxes_xyxy(box, rng, std_frac=cfg.box_jitter_frac, max_px=cfg.box_jitter_max_px,
                                        bounds_wh=bounds)
        return point, box

    def _refine_step(self, step: int) -> tuple[dict[str, Any], torch.Tensor, int]:
        """A step of refiner pairs: the SAM mask's logits + its box + its click, target the GT mask."""
        cfg, dev, pairs = self.setup.config, self.device, self.pairs
        assert pairs is not None and self.cache is not None
        positions, indices = batch_instances(step, batch_size=cfg.batch_size, n_instances=len(pairs), seed=cfg.seed,
                                             rank=self.rank, world_size=self.world_size)
        b = len(positions)
        feats, gts, pts, bxs, logits = [], [], np.zeros((b, 2)), np.zeros((b, 4)), []
        for j, idx in enumerate(indices):
            k = int(pairs.instance[idx])
            inst = self.setup.instances[k]
            f, input_size, original = self.cache.load(self.setup.images[inst.image_index].image_id)
            feats.append(f)
            pts[j] = self.transform.apply_coords(pairs.point[idx][None], tuple(original))[0]
            bxs[j] = self.transform.apply_boxes(pairs.box[idx][None], tuple(original))[0]
            logits.append(pairs.logits(k, self._pair_logits))
            gts.append(mask_in_input_frame(decode_mask(inst), input_size=tuple(input_size),
                                           image_size=self.image_size, device=dev))
        group = {"index": torch.arange(b, device=dev),
                 "points": torch.as_tensor(pts, dtype=torch.float32, device=dev)[:, None],
                 "labels": torch.ones((b, 1), dtype=torch.int, device=dev),
                 "boxes": torch.as_tensor(bxs, dtype=torch.float32, device=dev),
                 "masks": torch.stack(logits).to(dev, torch.float32)[:, None], "text": None, "multimask": False}
        inputs = {"features": torch.stack(feats).to(dev, torch.float32), "images": None, "image_index": None,
                  "groups": [group], "positions": positions}
        return inputs, torch.stack(gts), b

    def __call__(self, step: int) -> tuple[dict[str, Any], torch.Tensor, int]:
        """``(model inputs + "positions" (b,) global batch positions, gt (b, 1, S, S), b)`` of step ``step``."""
        if self.pairs is not None:
            return self._refine_step(step)
        cfg, dev = self.setup.config, self.device
        if cfg.unlabeled:
            positions, unlabeled, indices = mixed_batch_instances(
                step, batch_size=cfg.batch_size, n_labeled=len(self.setup.instances),
                n_unlabeled=len(self.setup.unlabeled), seed=cfg.seed, rank=self.rank, world_size=self.world_size)
        else:
            positions, indices = batch_instances(step, batch_size=cfg.batch_size,
                                                 n_instances=len(self.setup.instances), seed=cfg.seed, rank=self.rank,
                                                 world_size=self.world_size)
            unlabeled = np.zeros(len(positions), dtype=bool)
        b = len(positions)
        pts, bxs = np.full((b, 2), np.nan), np.full((b, 4), np.nan)
        gts, feats, image_of, certainty = [], [], [], []
        for j, (pos, idx) in enumerate(zip(positions, indices, strict=True)):
            inst = (self.setup.unlabeled if unlabeled[j] else self.setup.instances)[int(idx)]
            im = self.setup.images[inst.image_index]
            mask = decode_mask(inst)
            c = None if inst.uncertainty is None else 1.0 - _read_u(inst, mask.shape)
            if self.cache is not None:
                f, input_size, original = self.cache.load(im.image_id)
                feats.append(f)
            else:
                original = (im.height, im.width)
                input_size = self.transform.get_preprocess_shape(im.height, im.width, self.image_size)
                image_of.append(inst.image_index)
            pts[j], bxs[j] = self._prompt(mask, step=step, position=int(pos), original_size=tuple(original),
                                          certainty=c)
            gts.append(mask_in_input_frame(mask, input_size=tuple(input_size), image_size=self.image_size, device=dev))
            if cfg.unlabeled:  # c in the input frame: u resized like the mask, padding u = 0 (c = 1)
                u = np.zeros(mask.shape, np.float32) if c is None else 1.0 - c
                certainty.append(1.0 - mask_in_input_frame(u, input_size=tuple(input_size),
                                                           image_size=self.image_size, device=dev))
        inputs: dict[str, Any] = {"features": None, "images": None, "image_index": None}
        if self.cache is not None:
            inputs["features"] = torch.stack(feats).to(dev, torch.float32)
        else:
            unique = sorted(set(image_of))
            inputs["images"] = torch.cat([self.sam.preprocess(self._image(u).to(dev, torch.float32)[None])
                                          for u in unique])
            inputs["image_index"] = torch.as_tensor([unique.index(u) for u in image_of], device=dev)
        has_pt, has_box = np.isfinite(pts).all(1), np.isfinite(bxs).all(1)
        groups = []
        for kind_pt, kind_box in ((True, False), (False, True), (True, True)):
            rows = np.flatnonzero((has_pt == kind_pt) & (has_box == kind_box))
            if not len(rows):
                continue
            text = None
            if self.text is not None:
                cats = [self.setup.instances[int(indices[r])].category_id for r in rows]
                text = self.text[torch.as_tensor([self.class_rows[c] for c in cats], device=dev)]
            groups.append({
                "index": torch.as_tensor(rows, device=dev),
                "points": torch.as_tensor(pts[rows], dtype=torch.float32, device=dev)[:, None] if kind_pt else None,
                "labels": torch.ones((len(rows), 1), dtype=torch.int, device=dev) if kind_pt else None,
                "boxes": torch.as_tensor(bxs[rows], dtype=torch.float32, device=dev) if kind_box else None,
                "text": text, "multimask": kind_pt and not kind_box,
                "task": torch.as_tensor(~unlabeled[rows], dtype=torch.int64, device=dev) if cfg.unlabeled else None})
        inputs["groups"] = groups
        inputs["positions"] = positions
        inputs["unlabeled"] = unlabeled
        inputs["certainty"] = torch.stack(certainty) if cfg.unlabeled else None
        return inputs, torch.stack(gts), b


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
    return SamTrainable(sam, class_prompt=class_prompt, train_encoder=cfg.train_encoder,
                        task_prompt=task_prompt).to(device)


def _teacher_file(setup: FinetuneSetup, model: SamTrainable, arch: dict[str, Any], step: int) -> dict[str, Any]:
    cfg = setup.config
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    encoder_sha = (state_dict_sha256(model.image_encoder.state_dict()) if model.image_encoder is not None
                   else setup.base_encoder_sha256)
    start = None if setup.start_teacher is None else {"id": Path(setup.start_teacher).name,
                                                      "sha256": setup.start_teacher_sha256}
    return {"format": TEACHER_FORMAT, "version": TEACHER_VERSION, "prompts": cfg.prompts,
            "class_aware": cfg.class_aware, "step": step, "start": start,
            "base": {"id": setup.base_id, "source": setup.base_source, "encoder_sha256": setup.base_encoder_sha256},
            "encoder_sha256": encoder_sha, "encoder_included": cfg.train_encoder, "arch": arch,
            "clip": setup.clip, "config": cfg.to_dict(), "state": state}


def train_worker(setup: FinetuneSetup, *, rank: int = 0, world_size: int = 1, device: str = "cpu",
                 on_event: OnEvent | None = None) -> dict[str, Any]:
    """Run (or continue) the fine-tuning as one worker; with ``world_size`` > 1 the process group must exist.

    Args:
        setup: the run.
        rank: this worker's rank. world_size: number of workers (DDP when > 1).
        device: torch device string of this worker.
        on_event: rank 0 calls it with what it appends to the log: ``{"event": "start", "step", "total_steps"}``
            once, then each loss report ``{"event": "step", "step", "total_steps", "lr", "loss", "mask_loss",
            "iou_loss", "seconds_per_step"}``, after any checkpoint of that step is written.

    Returns:
        ``{"steps", "start_step", "encoded", "last": the last report}``.

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
        pair_dir = cache.root / pair_dir_key(decoder_sha, cfg.seed)
        build_refine_pairs(sam, cache, setup.images, setup.instances, pair_dir=pair_dir, seed=cfg.seed, rank=rank,
                           world_size=world_size, device=device)
        if _distributed(world_size):
            torch.distributed.barrier()
        pairs = PairSet.read(pair_dir, setup.images, min_iou=cfg.min_iou)
    model = _build_model(setup, sam, dev)
    params = model.freeze_for(cfg)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
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
    batcher = _Batcher(setup, sam, cache=cache, rank=rank, world_size=world_size, device=dev)
    batcher.pairs = pairs
    meter, last = LossMeter(), {}

    def log(record: dict[str, Any]) -> None:
        if rank == 0:
            append_jsonl(record, paths.log)
            if on_event is not None:
                on_event(record)

    if pairs is not None:
        log({"event": "pairs", "kept": len(pairs), "dropped": pairs.dropped, "min_iou": cfg.min_iou})
    log({"event": "start", "step": start, "total_steps": cfg.steps})

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
        save_torch_atomic(_teacher_file(setup, model, arch, cfg.steps), paths.teacher)
    if _distributed(world_size):
        torch.distributed.barrier()
    return {"steps": cfg.steps, "start_step": start, "encoded": encoded, "last": last,
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
