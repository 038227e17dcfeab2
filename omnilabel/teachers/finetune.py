"""Teacher fine-tuning: SAM's mask decoder and prompt encoder (+ the class module) on fully annotated images.

The recipe of the omni-supervised paper (Sections 3.1, 3.4, 4.1, digest §5): the image encoder is frozen and
each image is encoded once for the whole run (embeddings cached on disk, :class:`EmbeddingCache`); prompts
come from the GT masks (``finetune_data``); the loss is ``λ_ce·CE + λ_dice·Dice`` with λ = 5 and 5 on
112 x 112 = 12,544 points per mask chosen by uncertainty-based importance sampling (oversample 3x, 75 % most
uncertain, ``omnilabel.ops.point_sampling``); AdamW, lr 1e-5 dropped to 1e-6 at 75 % of the steps, batch
32, 36,874 steps.

Choices where the paper is silent:

- Resolution: the loss compares the decoder's low-res logits (4g x 4g = 256 x 256 for official SAMs,
  covering SAM's padded square input frame) with the GT mask resized into that same padded frame at the
  input resolution (S x S = 1024 x 1024), both read at the sampled points by bilinear interpolation. The
  points live in the padded frame, so padding is learnt as background; no mask is upsampled to the image.
- A single point is ambiguous: SAM answers with 3 masks and the loss is the minimum over them (SAM's own
  training). Box and point + box prompts use the single-output head.
- SAM's IoU head picks among the 3 masks at inference and gives the pseudomask score, so it is trained too,
  with SAM's own MSE loss against the IoU of each predicted mask (weight ``iou_weight`` = 1; 0 freezes it).
- Box prompts are the GT masks' boxes in SAM's convention, jittered as SAM's own training does (10 % of
  the side, at most 20 px, in SAM's input frame; ``box_jitter``), since at inference a box comes from a
  detector or a stage-1 mask, never exactly from the GT (``finetune_data``).
- Weight decay: AdamW's default, 0.01. No warm-up, no gradient clipping (none is stated).
- The learning rate is a pure function of the step, and so is every random draw (``finetune_data``), so a
  checkpoint needs only the weights, the optimizer state and the step to resume exactly.
``FinetuneConfig.stable`` runs Stable-SAM's recipe instead (``omnilabel.teachers.stable``): SAM frozen, only
the DSP + DRP plugins inside its decoder train, on the RTS prompt mixture (``stable_prompts``), with Adam.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from omnilabel.errors import InputError
from omnilabel.ops.point_sampling import (
    dice_loss_at_points,
    point_sample,
    sigmoid_ce_loss_at_points,
    uncertain_point_coords,
)
from omnilabel.teachers.finetune_data import PROMPT_MODES, PromptMode
from omnilabel.teachers.sam import run_mask_decoder

if TYPE_CHECKING:
    from segment_anything.modeling import MaskDecoder, Sam

    from omnilabel.teachers.class_aware import ClassAwarePrompt

__all__ = ["FinetuneConfig", "SamTrainable", "TaskPrompt", "decode_per_instance", "mask_losses", "ua_mask_losses"]


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of one fine-tuning run.

    Attributes:
        prompts: ``points`` (P-SAM), ``boxes`` (box-SAM) or ``points+boxes`` (BP-SAM) (paper §3.4), or
            ``refine``: SUM's refinement module (``omnilabel.teachers.uncertainty``): each GT mask's SAM mask
            (its logits) + that mask's box + the click that made it, trained to give the GT mask.
        min_iou: ``refine`` only: training pairs whose SAM mask has IoU with the GT below this are dropped
            (SUM: 0.7).
        unlabeled: SUM training (``--unlabeled``): half of each batch are pseudomasks with uncertainty maps,
            trained with ``ua_focal_weight``·UA-focal + ``ua_dice_weight``·UA-Dice (c > ``ua_theta``), their
            point prompts drawn ∝ c, and a task prompt tells GT (task 1) from pseudomasks (task 0).
        ua_theta: SUM's θ of the UA Dice (0.6). ua_focal_weight, ua_dice_weight: SUM's (SAM's) 20 : 1.
        stable: Stable-SAM (``--stable``, ``omnilabel.teachers.stable``): every SAM weight frozen, only the DSP +
            DRP plugins train, on prompts of the RTS mixture (``stable_prompts``; ``prompts`` and the box jitter
            are not used); Adam (no weight decay), lr 1e-3, no drop, CE + Dice only (the IoU head is frozen and
            unsupervised). Not with refine, class-aware, unlabelled or encoder training.
        class_aware: train the class prompt of Eq. (1)–(2) (paper: every setting but box + class).
        steps: optimizer steps (paper: 36,874 = 10 epochs of 10 % of COCO).
        lr_drop_step: step from which the lr is ``lr * lr_drop_factor`` (paper: 27,655); None = 75 % of
            ``steps``, rounded down.
        batch_size: instances per step, over all workers (paper: 32; Stable-SAM's too).
        lr: learning rate; None: 1e-5 (paper, AdamW), with ``stable`` 1e-3 (Stable-SAM, Adam).
        lr_drop_factor: None: 0.1 (paper: 1e-5 → 1e-6); with ``stable`` 1.0 (Stable-SAM gives no schedule for
            its 1 epoch) unless ``lr_drop_step`` is given.
        weight_decay: None: AdamW's default 0.01 (the paper gives none); with ``stable`` 0 (Stable-SAM: Adam).
        ce_weight: λ_ce (paper: 5). dice_weight: λ_dice (paper: 5). Stable-SAM's "CE + Dice" gives no weights:
            the same 1 : 1 (Adam makes the common factor irrelevant).
        iou_weight: weight of the IoU-head MSE (SAM's training; not in the paper); 0 freezes the IoU head;
            None: 1, with ``stable`` 0 (Stable-SAM trains on CE + Dice only).
        num_points: points per mask for the loss (paper, after Mask2Former: 112 x 112).
        oversample_ratio: Mask2Former: 3. importance_ratio: Mask2Former: 0.75.
        box_jitter: add SAM's box noise to every box prompt (``boxes``, ``points+boxes``; nothing for
            ``points``), so the teacher learns the inexact boxes it gets at inference (detector boxes, boxes
            of stage-1 masks). SAM's training does it (SAM paper, appendix "Training algorithm"); the paper
            is silent.
        box_jitter_frac: noise std as a fraction of the box's side (SAM: 10 %).
        box_jitter_max_px: largest move of a box coordinate, in pixels of SAM's input frame (SAM: 20 px).
        seed: seeds the data order, the prompts, the point sampling and the class module's initialisation.
        train_encoder: also train the image encoder (a small teacher from scratch; nothing is cached).
        checkpoint_every: steps between resumable checkpoints (and one at the end).
        log_every: steps between loss reports.
    """

    prompts: PromptMode = "points+boxes"
    min_iou: float = 0.7
    unlabeled: bool = False
    stable: bool = False
    ua_theta: float = 0.6
    ua_focal_weight: float = 20.0
    ua_dice_weight: float = 1.0
    class_aware: bool = False
    steps: int = 36_874
    lr_drop_step: int | None = None
    batch_size: int = 32
    lr: float = None  # type: ignore[assignment]  # resolved in __post_init__
    lr_drop_factor: float = None  # type: ignore[assignment]
    weight_decay: float = None  # type: ignore[assignment]
    ce_weight: float = 5.0
    dice_weight: float = 5.0
    iou_weight: float = None  # type: ignore[assignment]
    num_points: int = 112 * 112
    oversample_ratio: float = 3.0
    importance_ratio: float = 0.75
    box_jitter: bool = True  # SAM paper, appendix "Training algorithm": boxes are jittered in training
    box_jitter_frac: float = 0.1  # SAM: "standard deviation equal to 10% of the box sidelength"
    box_jitter_max_px: float = 20.0  # SAM: "to a maximum of 20 pixels" (in its 1024-px input frame)
    seed: int = 0
    train_encoder: bool = False
    checkpoint_every: int = 1000
    log_every: int = 10

    def __post_init__(self) -> None:
        defaults = {"lr": 1e-3 if self.stable else 1e-5,
                    "lr_drop_factor": 1.0 if self.stable and self.lr_drop_step is None else 0.1,
                    "weight_decay": 0.0 if self.stable else 0.01, "iou_weight": 0.0 if self.stable else 1.0}
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        problems = []
        if self.prompts not in PROMPT_MODES:
            problems.append(f"prompts must be one of {', '.join(PROMPT_MODES)}, got {self.prompts!r}")
        if not 0.0 <= self.min_iou <= 1.0:
            problems.append(f"min_iou must be in [0, 1], got {self.min_iou}")
        if self.unlabeled and (self.prompts == "refine" or self.class_aware):
            problems.append("SUM training (--unlabeled) trains a teacher for points and/or boxes without a class "
                            "module: not with --prompts refine or --class-aware")
        if not 0.0 <= self.ua_theta < 1.0 or min(self.ua_focal_weight, self.ua_dice_weight) < 0:
            problems.append(f"need 0 <= ua_theta < 1 and UA loss weights >= 0, got {self.ua_theta}, "
                            f"{self.ua_focal_weight}, {self.ua_dice_weight}")
        if self.stable and (self.prompts == "refine" or self.class_aware or self.unlabeled or self.train_encoder):
            problems.append("Stable-SAM (--stable) trains only its plugins on a frozen SAM, with its own prompt "
                            "mixture: not with --prompts refine, --class-aware, --unlabeled or --train-encoder")
        if self.prompts == "refine" and (self.class_aware or self.train_encoder):
            problems.append("a refiner (prompts refine) decodes from the teacher's frozen encoder and takes no "
                            "class: it cannot be trained with --class-aware or --train-encoder")
        for name in ("steps", "batch_size", "num_points", "checkpoint_every", "log_every"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or not 0 < self.lr_drop_factor <= 1:
            problems.append(f"need lr > 0 and 0 < lr_drop_factor <= 1, got {self.lr}, {self.lr_drop_factor}")
        if self.lr_drop_step is not None and not 0 <= self.lr_drop_step <= self.steps:
            problems.append(f"lr_drop_step must be in [0, steps={self.steps}], got {self.lr_drop_step}")
        if min(self.ce_weight, self.dice_weight, self.iou_weight, self.weight_decay) < 0:
            problems.append("loss weights and weight decay must be >= 0")
        if self.oversample_ratio < 1 or not 0 <= self.importance_ratio <= 1:
            problems.append("need oversample_ratio >= 1 and 0 <= importance_ratio <= 1")
        if not isinstance(self.box_jitter, bool):
            problems.append(f"box_jitter must be True or False, got {self.box_jitter!r}")
        if not (0 <= self.box_jitter_frac < float("inf") and 0 <= self.box_jitter_max_px < float("inf")):
            problems.append(f"need finite box_jitter_frac >= 0 and box_jitter_max_px >= 0, got "
                            f"{self.box_jitter_frac}, {self.box_jitter_max_px}")
        if self.seed < 0:
            problems.append(f"seed must be >= 0, got {self.seed}")
        if problems:
            raise InputError("bad fine-tuning settings", problems)

    @property
    def drop_step(self) -> int:
        """First step that runs at the dropped learning rate."""
        return int(self.lr_drop_step) if self.lr_drop_step is not None else int(0.75 * self.steps)

    def lr_at(self, step: int) -> float:
        """Learning rate of 0-based step ``step``."""
        return self.lr * (self.lr_drop_factor if step >= self.drop_step else 1.0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def decode_per_instance(
    decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    *,
    multimask: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's mask decoder with one image embedding per prompt, so prompts of different images train in one call
    (``omnilabel.teachers.sam.run_mask_decoder`` with a batch of embeddings).

    Args:
        decoder: ``segment_anything`` ``MaskDecoder``.
        image_embeddings: (B, C, g, g) float, row i the embedding of prompt i's image.
        image_pe: (1, C, g, g) dense positional encoding (``PromptEncoder.get_dense_pe``).
        sparse: (B, T, C) sparse prompt embeddings. dense: (B, C, g, g) dense prompt embeddings.
        multimask: return the 3 multimask outputs (else the single-output one).

    Returns:
        logits: (B, K, 4g, 4g) low-res mask logits; iou: (B, K) predicted IoUs; K = 3 or 1.
    """
    out = run_mask_decoder(decoder, image_embeddings, image_pe, sparse, dense)
    keep = slice(1, None) if multimask else slice(0, 1)
    return out.logits[:, keep], out.iou[:, keep]


class TaskPrompt(nn.Module):
    """SUM's task prompt (§3.2.4): a learned vector added to the dense prompt embedding (which the decoder adds
    to the image embedding), per prompt.

    Task 0 is SAM's own (pseudomasks) and stays exactly zero, so task 0 is the unchanged SAM; task 1 is this
    dataset's GT, whose conventions (what counts as one object, where its boundary lies) the teacher learns
    apart from SAM's. ``pseudomask`` decodes with task 1: pseudomasks should look like this dataset's labels.
    The teacher file holds ``task_prompt.gt`` (C,), zero-initialised.

    Args:
        dim: C, the prompt embedding width.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gt = nn.Parameter(torch.zeros(dim))

    def forward(self, dense: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """``dense`` (b, C, g, g) plus the vector of each prompt's task (b,) int64 (0 or 1)."""
        offset = task.to(dense.dtype)[:, None] * self.gt[None]
        return dense + offset[:, :, None, None]


class SamTrainable(nn.Module):
    """What fine-tuning runs: SAM's prompt encoder and decoder (+ class module, + encoder) on a batch of prompts.

    Its state dict is the ``state`` of a teacher file: ``prompt_encoder.*``, ``mask_decoder.*``, and
    ``class_prompt.*`` / ``image_encoder.*`` when present.

    Args:
        sam: the SAM; its modules are used, not copied.
        class_prompt: the class module, or None.
        train_encoder: hold (and run) the image encoder; else ``forward`` takes cached features.
    """

    def __init__(self, sam: Sam, *, class_prompt: ClassAwarePrompt | None = None, train_encoder: bool = False,
                 task_prompt: TaskPrompt | None = None) -> None:
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        self.class_prompt = class_prompt
        self.task_prompt = task_prompt
        self.image_encoder = sam.image_encoder if train_encoder else None
        #: Autocast dtype of the image encoder and mask decoder on CUDA (None: float32). The prompt encoder
        #: always runs in float32, as at inference: positional encodings of coordinates lose pixels in bf16.
        self.amp_dtype: torch.dtype | None = None

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None or device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def forward(self, features: torch.Tensor | None, images: torch.Tensor | None, image_index: torch.Tensor | None,
                groups: list[dict[str, Any]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Decode groups of same-kind prompts.

        Args:
            features: (B, C, g, g) cached image embeddings, one per prompt (when the encoder is frozen).
            images: (U, 3, S, S) preprocessed images (when the encoder trains); image_index: (B,) int64 rows.
            groups: each ``{"index": (b,) int64 prompt rows, "points": (b, 1, 2) | None, "labels": (b, 1) |
                None, "boxes": (b, 4) | None, "text": (b, D) | None, "masks": (b, 1, 4g, 4g) | None (mask
                prompt logits), "multimask": bool}``, coordinates in the resized input frame.

        Returns:
            Per group ``(logits (b, K, 4g, 4g), iou (b, K))``.
        """
        if self.image_encoder is not None and images is not None:
            with self._autocast(images.device):
                features = self.image_encoder(images)[image_index]
        if features is None:
            raise ValueError("SamTrainable needs cached features, or images when it holds the image encoder")
        image_pe = self.prompt_encoder.get_dense_pe()
        outputs = []
        for g in groups:
            points = None if g["points"] is None else (g["points"], g["labels"])
            if self.class_prompt is not None:
                sparse, dense = self.class_prompt(self.prompt_encoder, points=points, boxes=g["boxes"], masks=None,
                                                  text_embeddings=g["text"])
            else:
                sparse, dense = self.prompt_encoder(points=points, boxes=g["boxes"], masks=g.get("masks"))
            if self.task_prompt is not None and g.get("task") is not None:
                dense = self.task_prompt(dense, g["task"])
            with self._autocast(features.device):
                logits, iou = decode_per_instance(self.mask_decoder, features[g["index"]], image_pe, sparse, dense,
                                                  multimask=bool(g["multimask"]))
            outputs.append((logits.float(), iou.float()))
        return outputs

    def freeze_for(self, config: FinetuneConfig) -> list[nn.Parameter]:
        """Set ``requires_grad`` as the recipe says and return the parameters to optimise.

        Trained: the mask decoder (its IoU head only with ``iou_weight`` > 0); SAM's prompt encoder without a
        class module, else F_train, the projection and G_zero (F_locked = SAM's prompt encoder stays frozen);
        the image encoder with ``train_encoder``. With ``stable``: the Stable-SAM plugins inside the decoder
        only, every SAM weight frozen (gradients still flow through the frozen decoder into them).
        """
        if config.stable:
            from omnilabel.teachers.stable import plugins_of

            self.requires_grad_(False)
            plugins = plugins_of(self.mask_decoder)
            if not list(plugins.parameters()):
                raise ValueError("a Stable-SAM run needs the plugins installed in the mask decoder")
            plugins.requires_grad_(True)
            return list(plugins.parameters())
        for p in self.parameters():
            p.requires_grad_(True)
        if self.class_prompt is not None:
            self.prompt_encoder.requires_grad_(False)
        if config.iou_weight == 0:
            self.mask_decoder.iou_prediction_head.requires_grad_(False)
        # F_train's dense path is never used: the class module takes dense embeddings from F_locked.
        if self.class_prompt is not None:
            self.class_prompt.trainable.mask_downscaling.requires_grad_(False)
            self.class_prompt.trainable.no_mask_embed.requires_grad_(False)
        return [p for p in self.parameters() if p.requires_grad]


def _sampled_points(logits: torch.Tensor, *, config: FinetuneConfig,
                    generators: Sequence[torch.Generator] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(flat logits (b·K, 1, h, w), points (b·K, P, 2))``: each output's points by importance sampling, from
    its prompt's generator."""
    b, k, h, w = logits.shape
    flat = logits.reshape(b * k, 1, h, w).float()
    coords = torch.cat([
        uncertain_point_coords(flat[i * k:(i + 1) * k], num_points=config.num_points,
                               oversample_ratio=config.oversample_ratio, importance_ratio=config.importance_ratio,
                               generator=None if generators is None else generators[i])
        for i in range(b)])
    return flat, coords


def _iou_head_loss(logits: torch.Tensor, iou_pred: torch.Tensor, target_frame: torch.Tensor) -> torch.Tensor:
    """(b,) mean over the K outputs of ``(iou_pred − IoU)²``, IoU of ``logits > 0`` with the target at the
    logits' resolution."""
    h, w = logits.shape[-2:]
    with torch.no_grad():
        gt_low = torch.nn.functional.adaptive_avg_pool2d(target_frame, (h, w)) > 0.5
        pred_low = logits.detach() > 0
        inter = (pred_low & gt_low).flatten(2).sum(-1).float()
        union = (pred_low | gt_low).flatten(2).sum(-1).float()
        iou_true = inter / union.clamp(min=1.0)
    return ((iou_pred.float() - iou_true) ** 2).mean(dim=1)


def mask_losses(logits: torch.Tensor, iou_pred: torch.Tensor, gt_frame: torch.Tensor, *, config: FinetuneConfig,
                generators: Sequence[torch.Generator] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Point-sampled mask loss (min over the K outputs) and IoU-head loss of one group.

    Args:
        logits: (b, K, h, w) low-res logits over the padded input frame.
        iou_pred: (b, K) predicted IoUs.
        gt_frame: (b, 1, S, S) float GT masks in the padded input frame.
        config: the loss weights and sampling settings.
        generators: b sources of the sampling draws, one per prompt (on ``logits``' device), so that a
            prompt's points do not depend on what else is in its batch; None uses torch's global RNG.

    Returns:
        ``(mask_loss (b,), iou_loss (b,))``: ``min_k (λ_ce·CE + λ_dice·Dice)``, and the mean over k of
        ``(iou_pred - IoU)²`` with IoU that of ``logits > 0`` against the GT at the logits' resolution.
    """
    b, k, _, _ = logits.shape
    flat, coords = _sampled_points(logits, config=config, generators=generators)
    pred = point_sample(flat, coords)[:, 0]
    with torch.no_grad():
        # each GT mask is read at the points of its K outputs at once (no K copies of an S x S mask)
        target = point_sample(gt_frame, coords.reshape(b, -1, 2)).reshape(b * k, -1)
    per_output = (config.ce_weight * sigmoid_ce_loss_at_points(pred, target)
                  + config.dice_weight * dice_loss_at_points(pred, target)).reshape(b, k)
    iou_loss = _iou_head_loss(logits, iou_pred, gt_frame)
    return per_output.min(dim=1).values, iou_loss


def ua_mask_losses(logits: torch.Tensor, iou_pred: torch.Tensor, target_frame: torch.Tensor,
                   certainty_frame: torch.Tensor, *, config: FinetuneConfig,
                   generators: Sequence[torch.Generator] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``mask_losses`` for pseudomasks (SUM Eq. 1–2, point-sampled like the labelled loss).

    At the points ``mask_losses`` would sample, per output ``ua_focal_weight · (1/P) Σ c_i focal_i +
    ua_dice_weight · UA-Dice`` with the Dice over points with ``c > ua_theta`` only
    (``omnilabel.ops.uncertainty``); the minimum over the K outputs; the IoU head's target is the IoU with the
    pseudomask (not masked by c; the paper is silent).

    Args:
        target_frame: (b, 1, S, S) pseudomasks in the padded input frame.
        certainty_frame: (b, 1, S, S) their certainty ``c = 1 − u`` in the same frame (1 in the padding).
    """
    from omnilabel.ops.uncertainty import ua_dice_loss_at_points, ua_focal_loss_at_points

    b, k, _, _ = logits.shape
    flat, coords = _sampled_points(logits, config=config, generators=generators)
    pred = point_sample(flat, coords)[:, 0]
    with torch.no_grad():
        target = point_sample(target_frame, coords.reshape(b, -1, 2)).reshape(b * k, -1)
        certainty = point_sample(certainty_frame, coords.reshape(b, -1, 2)).reshape(b * k, -1)
    per_output = (config.ua_focal_weight * ua_focal_loss_at_points(pred, target, certainty)
                  + config.ua_dice_weight * ua_dice_loss_at_points(pred, target, certainty, theta=config.ua_theta)
                  ).reshape(b, k)
    iou_loss = _iou_head_loss(logits, iou_pred, target_frame)
    return per_output.min(dim=1).values, iou_loss


def point_generator(seed: int, step: int, position: int, device: torch.device) -> torch.Generator:
    """The point-sampling generator of global batch position ``position`` at step ``step`` (a pure function of
    its arguments, so the points do not depend on the number of workers)."""
    state = int(np.random.SeedSequence([seed, step, position, 7]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(state)


class LossMeter:
    """Running sums of the losses between two reports."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64)
        self.count = 0
        self.t0 = time.perf_counter()

    def add(self, total: float, mask: float, iou: float) -> None:
        self.sums += torch.tensor([total, mask, iou], dtype=torch.float64)
        self.count += 1

    def take(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        sums = self.sums / max(self.count, 1)
        if reduce is not None:
            sums = reduce(sums)
        out = {"loss": float(sums[0]), "mask_loss": float(sums[1]), "iou_loss": float(sums[2]),
               "seconds_per_step": (time.perf_counter() - self.t0) / max(self.count, 1)}
        self.reset()
        return out
