"""Training UOIS-SAM's prompt generator (HPG) and discriminator (HDNet) on GT masks (specs §3.3, §3.5, §4.3).

Both train on frozen models, so what each image contributes is computed once (``image_sample``, the per-image,
heavy part: the DINOv2 forward pass, the GT targets, SAM's encoder and decoder on sampled prompts) and the
epochs then run on those samples (``PrompterTrainer``, light: the head and the MLP). HPG and HDNet train
separately (their losses share no parameter), each with its own AdamW and StepLR, in the same epochs; each keeps
its own best validation checkpoint.

Choices where the paper is silent:
- A8: each image gives ``prompts_per_image`` (30, the paper's M) single-point prompts, ``negative_frac`` (1/4
  [ours]) of them on the GT background (target 0 for every output), the rest uniformly inside the visible GT
  masks, instances taken in turn; an image without background pixels gives positives only, one without objects
  negatives only. The points are drawn once per image (seeded by its id), not per epoch: SAM is frozen, so a
  new draw would cost a decoder pass per image per epoch for little.
- A7: the target of each of SAM's 4 outputs is its IoU with the GT mask, the output upsampled to the image and
  thresholded at SAM's 0; the loss is the MSE over all M × 4 adapted scores. One image's prompts form one batch.
- The heatmap loss is the MSE between the sigmoid heatmap and the Gaussian targets; the foreground loss is the
  class-balanced CE (``omnilabel.ops.heatmap.class_balanced_ce``); targets are made at the HPG input size from
  the GT masks resized there (nearest).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from omnilabel.errors import InputError
from omnilabel.teachers.uois import HDNet, Hpg

if TYPE_CHECKING:
    from omnilabel.teachers.sam import SamTeacher


@dataclass(frozen=True)
class PrompterTrainConfig:
    """The recipe (spec §3.5, §4.3; the same for HPG and HDNet).

    Attributes:
        epochs: epochs of each (paper: at most 30).
        lr: AdamW learning rate (paper: 1e-3). weight_decay: (paper: 1e-4). betas: (paper: 0.9, 0.999).
        step_epochs: StepLR period (paper: ×0.1 every 10 epochs). gamma: its factor.
        hpg_batch: images per HPG step (paper: 32).
        prompts_per_image: HDNet prompts per image, one step each image (paper: M = 30).
        negative_frac: share of those prompts on the GT background ([ours], module docstring).
        seed: the head's initialisation, the prompts drawn, the order of the images each epoch.
    """

    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    step_epochs: int = 10
    gamma: float = 0.1
    hpg_batch: int = 32
    prompts_per_image: int = 30
    negative_frac: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", (float(self.betas[0]), float(self.betas[1])))
        problems = [f"{name} must be >= 1, got {getattr(self, name)}"
                    for name in ("epochs", "step_epochs", "hpg_batch", "prompts_per_image") if getattr(self, name) < 1]
        if not 0.0 <= self.negative_frac <= 1.0:
            problems.append(f"negative_frac must be in [0, 1], got {self.negative_frac}")
        if self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if problems:
            raise InputError("bad train-prompter settings", problems)


def resize_masks(masks: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """(N, H, W) bool → (N, h, w) bool, nearest neighbour."""
    if not len(masks):
        return np.zeros((0, *size_hw), dtype=bool)
    t = torch.as_tensor(np.ascontiguousarray(masks), dtype=torch.uint8)[:, None]
    return F.interpolate(t, size=size_hw, mode="nearest")[:, 0].bool().numpy()


def sample_prompts(masks: np.ndarray, n: int, negative_frac: float,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """HDNet's training prompts of one image (module docstring, A8).

    Args:
        masks: (N, H, W) bool visible GT masks. n: prompts to draw. negative_frac: share on the background.
        rng: the image's generator.

    Returns:
        points_xy: (n, 2) float64 pixel centres (x = column); owner: (n,) int64 index of the GT mask each point
        lies in, -1 for background.
    """
    h, w = masks.shape[1:] if masks.ndim == 3 else (0, 0)
    union = masks.any(axis=0) if len(masks) else None
    background = np.flatnonzero(~union.ravel()) if union is not None else None
    owners = [np.flatnonzero(m.ravel()) for m in masks]
    owners = [(k, px) for k, px in enumerate(owners) if len(px)]
    n_neg = int(round(n * negative_frac))
    if not owners:
        n_neg = n
    if background is not None and not len(background):
        n_neg = 0
    points, owner = [], []
    for j in range(n - n_neg):
        k, px = owners[j % len(owners)]
        points.append(int(rng.choice(px)))
        owner.append(k)
    if n_neg:
        if background is None:
            raise InputError("an image without masks needs its size to draw background prompts")
        points += [int(p) for p in rng.choice(background, size=n_neg)]
        owner += [-1] * n_neg
    flat = np.asarray(points, dtype=np.int64)
    return np.stack([flat % w, flat // w], axis=1).astype(np.float64), np.asarray(owner, dtype=np.int64)


def hdnet_sample(sam: SamTeacher, emb: Any, masks: np.ndarray, config: PrompterTrainConfig,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    """SAM's tokens and scores on one image's training prompts, with the IoU target of each of its 4 outputs.

    Returns:
        ``iou_token`` (M, C), ``mask_tokens`` (M, 4, C), ``sam_iou`` (M, 4), ``target`` (M, 4), all float32.
    """
    h, w = emb.original_size
    masks = masks if len(masks) else np.zeros((0, h, w), dtype=bool)
    points, owner = sample_prompts(masks, config.prompts_per_image, config.negative_frac, rng)
    iou_token, mask_tokens, sam_iou, target = [], [], [], []
    for c in sam.decode_points_tokens(emb, points):
        n, k = c.low_res_logits.shape[:2]
        outs = sam.upsample(emb, c.low_res_logits.reshape(n * k, *c.low_res_logits.shape[2:])).reshape(n, k, h, w)
        t = np.zeros((n, k), dtype=np.float32)
        for row, i in enumerate(c.indices):
            if owner[i] >= 0:
                gt = masks[owner[i]]
                inter = (outs[row] & gt).reshape(k, -1).sum(axis=1)
                union = (outs[row] | gt).reshape(k, -1).sum(axis=1)
                t[row] = inter / np.maximum(union, 1)
        iou_token.append(c.iou_token)
        mask_tokens.append(c.mask_tokens)
        sam_iou.append(c.iou_scores)
        target.append(t)
    return {"iou_token": np.concatenate(iou_token), "mask_tokens": np.concatenate(mask_tokens),
            "sam_iou": np.concatenate(sam_iou), "target": np.concatenate(target)}


def hpg_sample(hpg: Hpg, image_rgb: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
    """The frozen backbone's tokens of one image and its HPG targets at ``hpg.config.input_hw``.

    Returns:
        ``tokens`` (C, h, w) float16; ``fg`` (H, W) uint8 (1: inside some GT mask); ``heat`` (H, W) float16.
    """
    from omnilabel.ops.heatmap import heatmap_targets

    tokens = hpg.tokens(hpg.pixels([image_rgb]))[0]
    fg, heat = heatmap_targets(resize_masks(masks, hpg.config.input_hw), sigma_px=hpg.config.sigma_px)
    if not len(masks):
        fg, heat = np.zeros(hpg.config.input_hw, dtype=bool), np.zeros(hpg.config.input_hw, dtype=np.float32)
    return {"tokens": tokens.cpu().numpy().astype(np.float16), "fg": fg.astype(np.uint8),
            "heat": heat.astype(np.float16)}


class PrompterTrainer:
    """The epochs of HPG's head and HDNet on samples saved as ``.npz`` files (``image_sample``'s arrays).

    Args:
        hpg: the generator (its head trains). hdnet: the discriminator. config: the recipe. device: torch device.
    """

    def __init__(self, hpg: Hpg, hdnet: HDNet, config: PrompterTrainConfig, *, device: str = "cpu") -> None:
        self.hpg, self.hdnet, self.config = hpg.to(device), hdnet.to(device), config
        self.device = torch.device(device)

        def adamw(params: Any) -> torch.optim.Optimizer:
            return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas)

        self.opt_hpg, self.opt_hdnet = adamw(hpg.head.parameters()), adamw(hdnet.parameters())
        self.sched_hpg = torch.optim.lr_scheduler.StepLR(self.opt_hpg, config.step_epochs, gamma=config.gamma)
        self.sched_hdnet = torch.optim.lr_scheduler.StepLR(self.opt_hdnet, config.step_epochs, gamma=config.gamma)

    # -- losses -----------------------------------------------------------------------------------------------

    def hpg_loss(self, files: Sequence[Path]) -> torch.Tensor:
        """HPG's loss (Eq. 4) on a batch of sample files."""
        from omnilabel.ops.heatmap import class_balanced_ce

        arrays = [np.load(f) for f in files]
        tokens = torch.as_tensor(np.stack([a["tokens"] for a in arrays]), device=self.device).float()
        fg = torch.as_tensor(np.stack([a["fg"] for a in arrays]), device=self.device).long()
        heat = torch.as_tensor(np.stack([a["heat"] for a in arrays]), device=self.device).float()
        fg_logits, heat_logits = self.hpg(tokens)
        c = self.hpg.config
        return c.fg_weight * class_balanced_ce(fg_logits, fg) + c.heatmap_weight * F.mse_loss(heat_logits.sigmoid(),
                                                                                              heat)

    def hdnet_loss(self, file: Path) -> torch.Tensor:
        """HDNet's loss (Eq. 7, on the adapted scores) on one image's prompts."""
        a = np.load(file)
        arr = {k: torch.as_tensor(a[k], device=self.device).float()
               for k in ("iou_token", "mask_tokens", "sam_iou", "target")}
        return F.mse_loss(self.hdnet(arr["iou_token"], arr["mask_tokens"], arr["sam_iou"]), arr["target"])

    # -- epochs -----------------------------------------------------------------------------------------------

    def train_epoch(self, files: Sequence[Path], epoch: int) -> dict[str, float]:
        """One epoch of each model over ``files`` (shuffled by seed and epoch), then one scheduler step each.

        Returns:
            ``hpg`` and ``hdnet``: their mean training loss.
        """
        order = np.random.default_rng([self.config.seed, epoch]).permutation(len(files))
        shuffled = [files[i] for i in order]
        self.hpg.train()
        self.hdnet.train()
        hpg_losses, hd_losses = [], []
        for start in range(0, len(shuffled), self.config.hpg_batch):
            loss = self.hpg_loss(shuffled[start : start + self.config.hpg_batch])
            self.opt_hpg.zero_grad(set_to_none=True)
            loss.backward()
            self.opt_hpg.step()
            hpg_losses.append(float(loss.detach()))
        for f in shuffled:
            loss = self.hdnet_loss(f)
            self.opt_hdnet.zero_grad(set_to_none=True)
            loss.backward()
            self.opt_hdnet.step()
            hd_losses.append(float(loss.detach()))
        self.sched_hpg.step()
        self.sched_hdnet.step()
        return {"hpg": float(np.mean(hpg_losses)) if hpg_losses else 0.0,
                "hdnet": float(np.mean(hd_losses)) if hd_losses else 0.0}

    @torch.no_grad()
    def validate(self, files: Sequence[Path]) -> dict[str, float]:
        """Mean losses of both models over ``files`` (eval mode, no update)."""
        self.hpg.eval()
        self.hdnet.eval()
        hpg = [float(self.hpg_loss(files[s : s + self.config.hpg_batch])) * len(files[s : s + self.config.hpg_batch])
               for s in range(0, len(files), self.config.hpg_batch)]
        hd = [float(self.hdnet_loss(f)) for f in files]
        n = max(len(files), 1)
        return {"hpg": sum(hpg) / n, "hdnet": float(np.mean(hd)) if hd else 0.0}

    # -- resume -----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"head": self.hpg.head.state_dict(), "hdnet": self.hdnet.state_dict(),
                "opt_hpg": self.opt_hpg.state_dict(), "opt_hdnet": self.opt_hdnet.state_dict(),
                "sched_hpg": self.sched_hpg.state_dict(), "sched_hdnet": self.sched_hdnet.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.hpg.head.load_state_dict(state["head"])
        self.hdnet.load_state_dict(state["hdnet"])
        self.opt_hpg.load_state_dict(state["opt_hpg"])
        self.opt_hdnet.load_state_dict(state["opt_hdnet"])
        self.sched_hpg.load_state_dict(state["sched_hpg"])
        self.sched_hdnet.load_state_dict(state["sched_hdnet"])


def config_dict(config: Any) -> dict[str, Any]:
    """A frozen settings dataclass as JSON-ready data (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
