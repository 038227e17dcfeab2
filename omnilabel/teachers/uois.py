"""UOIS-SAM (``seeds/uois-sam.txt``, digest ``specs/uois-sam.md``): class-agnostic masks from generated prompts.

- **HPG** (§3), ``Hpg``: a frozen DINOv2 backbone (``omnilabel.models.dinov2``) and a trained upsampling head
  predict a foreground/background map and a centroid heatmap at ``input_hw``; heatmap peaks inside the
  foreground (``omnilabel.ops.heatmap.heatmap_peaks``) become single positive point prompts for SAM.
- **HDNet** (§4), ``HDNet``: an MLP on SAM's IoU token and 4 mask tokens adds a residual to SAM's 4 predicted
  IoUs; the output with the best adapted score is each prompt's mask, prompts below ``score_thresh`` are dropped
  (background), then mask NMS and the large-area filter (``select_masks``). SAM stays frozen and unchanged: its
  tokens come from the same decoder computation as every other path (``SamTeacher.decode_points_tokens``).
- ``UoisPrompter`` runs both on one image (SAM encodes it once, elsewhere); ``grid_masks`` is the baseline the
  paper compares with (SAM's plain point grid, SAM's own scores, the same post-processing).

A prompter file (``train-prompter``'s output, ``save_prompter`` / ``read_prompter``) holds the head, HDNet, their
settings, the backbone it was trained on (name or path, and the sha256 of its weights) and the SAM (the sha256s
of its image encoder and of its prompt encoder + decoder): it is refused with another SAM or backbone.

Choices where the paper is silent (specs §8), each a setting with its reason:
- A1: the head is a 1×1 projection to ``head_width`` (256, the paper's "C = 256"), then blocks of (×2 bilinear
  upsampling → 3×3 conv → BatchNorm → PReLU) halving the width, until one more doubling would pass the input
  size; a last block interpolates to ``input_hw``; a 1×1 conv gives 3 channels (2 fg/bg logits, 1 heatmap logit).
- A3: the heatmap is a sigmoid of its logit (H ∈ [0, 1]). A4: "foreground > 0.85" is the softmax probability.
- A6: HDNet is per token: MLP(2C → 256 → 256 → 1) on [IoU token; mask token k], k = 0..3 (Crowd-SAM's reading
  of "the same architecture as the IoU head"); its last layer is zero-initialised, so an untrained HDNet
  returns SAM's scores unchanged.
- A9: NMS is on mask IoU, ranked by the adapted score; the area filter drops masks of more than
  ``max_area_px`` pixels at the image's own resolution (200 × 200 at the paper's 480 × 640).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from omnilabel.errors import CheckpointError, InputError

if TYPE_CHECKING:
    from omnilabel.teachers.sam import ImageEmbedding, SamTeacher

#: ``format`` of a prompter file.
PROMPTER_FORMAT = "omnilabel-prompter"
PROMPTER_VERSION = 1


@dataclass(frozen=True)
class HpgConfig:
    """The prompt generator's settings.

    Attributes:
        input_hw: (H, W) the image is resized to for DINOv2 (paper §3.1: 336 × 448); multiples of its patch size.
        head_width: width of the head's first layer (paper: "C = 256").
        sigma_px: σ of the centroid Gaussians at ``input_hw`` (paper: not given, A2; 4 px of 336 × 448 [ours]).
        fg_thresh: foreground probability a peak needs (paper §3.4: 0.85).
        peak_thresh: lowest heatmap value of a peak (paper: 0.007).
        max_peaks: most prompts per image (paper: K = 30).
        pool_px: max-pool window of peak finding (paper: 3 × 3).
        fg_weight: λ1 of the foreground loss (paper Eq. 4: 0.1). heatmap_weight: λ2 of the heatmap loss (1).
    """

    input_hw: tuple[int, int] = (336, 448)
    head_width: int = 256
    sigma_px: float = 4.0
    fg_thresh: float = 0.85
    peak_thresh: float = 0.007
    max_peaks: int = 30
    pool_px: int = 3
    fg_weight: float = 0.1
    heatmap_weight: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_hw", (int(self.input_hw[0]), int(self.input_hw[1])))
        if min(self.input_hw) < 1 or self.head_width < 4 or self.sigma_px <= 0 or self.max_peaks < 1:
            raise InputError(f"bad prompt generator settings: {self}")


@dataclass(frozen=True)
class UoisConfig:
    """How prompts become masks.

    Attributes:
        score_thresh: a prompt whose best adapted score is lower is dropped (paper §4.4: 0.48).
        nms_iou: mask-IoU NMS threshold across prompts (paper: 0.3).
        max_area_px: masks larger than this many pixels are dropped (paper: 200 × 200 at 480 × 640, table- and
            wall-sized masks); None keeps every size.
        min_area_px: smaller masks are dropped (1: only empty ones).
        grid_per_side: points per side of the grid baseline (``grid_masks``; paper Table IV: 32).
    """

    score_thresh: float = 0.48
    nms_iou: float = 0.3
    max_area_px: int | None = 40_000
    min_area_px: int = 1
    grid_per_side: int = 32


class _UpBlock(nn.Sequential):
    """Interpolation → 3×3 conv → BatchNorm → PReLU (spec §3.1); ``size`` None doubles the input."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.PReLU(c_out))

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:  # type: ignore[override]
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        else:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return super().forward(x)


class HpgHead(nn.Module):
    """The trainable part of HPG: DINOv2 patch tokens → fg/bg logits and a centroid heatmap at the input size.

    Args:
        in_channels: the backbone's width (384 for ViT-S/14).
        patch_size: the backbone's patch size (14): the head upsamples by it.
        width: the first layer's width (``HpgConfig.head_width``).
    """

    def __init__(self, in_channels: int, patch_size: int, width: int = 256) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, 1)
        n_double = max(0, math.ceil(math.log2(max(patch_size, 1))) - 1)
        widths = [max(width // 2**i, 16) for i in range(n_double + 2)]
        self.blocks = nn.ModuleList(_UpBlock(widths[i], widths[i + 1]) for i in range(n_double + 1))
        self.out = nn.Conv2d(widths[-1], 3, 1)

    def forward(self, tokens: torch.Tensor, out_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: tokens (B, C, h, w) float patch tokens; out_hw the input size (H, W).

        Returns:
            fg_logits: (B, 2, H, W) float (channel 1: foreground); heatmap_logits: (B, H, W) float (sigmoid → H).
        """
        x = self.proj(tokens)
        for block in self.blocks[:-1]:
            x = block(x)
        x = self.out(self.blocks[-1](x, tuple(out_hw)))
        return x[:, :2], x[:, 2]


class HDNet(nn.Module):
    """UOIS-SAM's discriminator (Eq. 5): Ŝ' = MLP(concat(repeat(T_iou), T_mask)) + Ŝ, per mask token.

    Args:
        dim: C, the width of SAM's decoder tokens (256).
        hidden: the MLP's hidden width (the IoU head's: 256).
    """

    def __init__(self, dim: int = 256, hidden: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, iou_token: torch.Tensor, mask_tokens: torch.Tensor, sam_iou: torch.Tensor) -> torch.Tensor:
        """Args: iou_token (M, C), mask_tokens (M, 4, C), sam_iou (M, 4) float.

        Returns:
            (M, 4) float adapted scores Ŝ'.
        """
        k = mask_tokens.shape[1]
        x = torch.cat([iou_token[:, None, :].expand(-1, k, -1), mask_tokens], dim=-1)
        return sam_iou + self.mlp(x)[..., 0]


class Hpg(nn.Module):
    """The prompt generator: frozen DINOv2 + ``HpgHead``.

    Args:
        backbone: a ``transformers`` ``Dinov2Model`` (frozen here).
        config: its settings.
    """

    def __init__(self, backbone: nn.Module, config: HpgConfig | None = None) -> None:
        super().__init__()
        self.config = config or HpgConfig()
        self.backbone = backbone.eval().requires_grad_(False)
        self.patch_size = int(backbone.config.patch_size)
        h, w = self.config.input_hw
        if h % self.patch_size or w % self.patch_size:
            raise InputError(f"input size {h}x{w} is not a multiple of the backbone's patch size {self.patch_size}")
        self.head = HpgHead(int(backbone.config.hidden_size), self.patch_size, self.config.head_width)

    def train(self, mode: bool = True) -> Hpg:
        super().train(mode)
        self.backbone.eval()  # frozen: its dropout and statistics never train
        return self

    def pixels(self, images_rgb: list[np.ndarray]) -> torch.Tensor:
        """(B, 3, H, W) normalised float pixels at ``input_hw`` of (h, w, 3) uint8 images of any sizes."""
        from omnilabel.models.dinov2 import normalize_images

        device = next(self.head.parameters()).device
        resized = [F.interpolate(torch.as_tensor(im, device=device).permute(2, 0, 1)[None].float(),
                                 size=self.config.input_hw, mode="bilinear", align_corners=False, antialias=True)
                   for im in images_rgb]
        batch = torch.cat(resized).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return normalize_images(batch).to(device)

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H/p, W/p) frozen backbone features of normalised pixels."""
        from omnilabel.models.dinov2 import patch_tokens

        with torch.no_grad():
            return patch_tokens(self.backbone, pixels)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The head on backbone tokens: (B, 2, H, W) fg/bg logits and (B, H, W) heatmap logits at ``input_hw``."""
        return self.head(tokens, self.config.input_hw)

    @torch.no_grad()
    def maps(self, image_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Foreground probability and heatmap of one image, both (H, W) float32 in [0, 1] at ``input_hw``."""
        was = self.training
        self.eval()
        fg, heat = self(self.tokens(self.pixels([image_rgb])))
        self.train(was)
        return (fg.softmax(dim=1)[0, 1].float().cpu().numpy(), heat[0].sigmoid().float().cpu().numpy())

    def prompts(self, image_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Point prompts of one image: heatmap peaks inside the foreground, in the image's pixels.

        Returns:
            points_xy: (K, 2) float64 pixel xy in ``image_rgb`` (K ≤ ``max_peaks``); scores: (K,) float32 heatmap.
        """
        from omnilabel.ops.heatmap import heatmap_peaks, scale_points_xy

        fg, heat = self.maps(image_rgb)
        c = self.config
        xy, scores = heatmap_peaks(fg, heat, fg_thresh=c.fg_thresh, peak_thresh=c.peak_thresh, max_peaks=c.max_peaks,
                                   pool_px=c.pool_px)
        return scale_points_xy(xy, c.input_hw, tuple(image_rgb.shape[:2])), scores


@dataclass
class UoisMasks:
    """Class-agnostic masks of one image.

    Attributes:
        masks: (N, H, W) bool, in descending score order. scores: (N,) float32 adapted scores (SAM's own for the
        grid baseline). points_xy: (N, 2) float64 the prompt of each mask. output: (N,) int64 which of SAM's 4
        outputs each mask is. prompts: how many prompts were decoded. dropped: prompts dropped by score, NMS
        and area.
    """

    masks: np.ndarray
    scores: np.ndarray
    points_xy: np.ndarray
    output: np.ndarray
    prompts: int
    dropped: dict[str, int]


def select_masks(sam: SamTeacher, emb: ImageEmbedding, points_xy: np.ndarray, config: UoisConfig,
                 hdnet: HDNet | None = None) -> UoisMasks:
    """Decode point prompts, pick each prompt's mask, drop background, duplicates and huge masks (spec §4.5).

    With ``hdnet``: all 4 of SAM's outputs, scored by HDNet's adapted scores. Without: SAM's plain convention for
    a lone point — its 3 multimask outputs scored by SAM's own predicted IoU (the grid baseline).

    Args:
        sam: the SAM the image was encoded with. emb: the image's embedding. points_xy: (K, 2) float pixel xy.
        config: thresholds. hdnet: the discriminator, or None.

    Returns:
        The kept masks, best first.
    """
    from omnilabel.ops.entity import mask_nms

    pts = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
    n = len(pts)
    logits, scores, chosen = [np.zeros((0, *sam.sam.prompt_encoder.mask_input_size), np.float32)], [], []
    for c in sam.decode_points_tokens(emb, pts):
        if hdnet is not None:
            dev = next(hdnet.parameters()).device
            with torch.no_grad():
                s = hdnet(torch.as_tensor(c.iou_token, device=dev), torch.as_tensor(c.mask_tokens, device=dev),
                          torch.as_tensor(c.iou_scores, device=dev)).float().cpu().numpy()
            first = 0
        else:
            s, first = c.iou_scores[:, 1:], 1
        best = s.argmax(axis=1)
        rows = np.arange(len(best))
        logits.append(c.low_res_logits[rows, best + first])
        scores.append(s[rows, best])
        chosen.append(best + first)
    lr = np.concatenate(logits)
    sc = np.concatenate(scores).astype(np.float32) if scores else np.zeros(0, np.float32)
    out = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
    keep = sc >= config.score_thresh
    dropped = {"score": int((~keep).sum())}
    lr, sc, out, pts = lr[keep], sc[keep], out[keep], pts[keep]
    masks = sam.upsample(emb, lr)
    order = np.argsort(-sc, kind="stable")
    masks, sc, out, pts = masks[order], sc[order], out[order], pts[order]
    kept = np.sort(mask_nms(masks, sc, iou_thresh=config.nms_iou)) if len(masks) else np.zeros(0, np.int64)
    dropped["nms"] = len(masks) - len(kept)
    masks, sc, out, pts = masks[kept], sc[kept], out[kept], pts[kept]
    area = masks.sum(axis=(1, 2))
    ok = area >= config.min_area_px
    if config.max_area_px is not None:
        ok &= area <= config.max_area_px
    dropped["area"] = int((~ok).sum())
    return UoisMasks(masks[ok], sc[ok], pts[ok], out[ok], n, dropped)


def grid_masks(sam: SamTeacher, emb: ImageEmbedding, config: UoisConfig | None = None) -> UoisMasks:
    """The paper's baseline (Table IV, first row): SAM's plain ``grid_per_side``² point grid, SAM's own scores,
    the same post-processing as ``UoisPrompter``."""
    from omnilabel.ops.grid import point_grid

    config = config or UoisConfig()
    return select_masks(sam, emb, point_grid(config.grid_per_side, emb.original_size), config, None)


class UoisPrompter:
    """HPG prompts + SAM + HDNet on one image.

    Args:
        hpg: the prompt generator. hdnet: the discriminator. sam: the SAM both were trained against.
        config: post-processing thresholds.
    """

    def __init__(self, hpg: Hpg, hdnet: HDNet, sam: SamTeacher, config: UoisConfig | None = None) -> None:
        self.hpg, self.hdnet, self.sam = hpg.eval(), hdnet.eval(), sam
        self.config = config or UoisConfig()

    def segment(self, image_rgb: np.ndarray, emb: ImageEmbedding) -> UoisMasks:
        """Class-agnostic masks of ``image_rgb`` (``emb``: its embedding by ``self.sam``)."""
        points_xy, _ = self.hpg.prompts(image_rgb)
        return select_masks(self.sam, emb, points_xy, self.config, self.hdnet)


# ---- prompter files -------------------------------------------------------------------------------------------


def sam_checksums(sam: Any) -> dict[str, str]:
    """``state_dict_sha256`` of a ``Sam``'s image encoder and of its prompt encoder + mask decoder (plugins
    included): the SAM a prompter was trained against."""
    from omnilabel.teachers.teacher_ckpt import state_dict_sha256

    decoder = {f"prompt_encoder.{k}": v for k, v in sam.prompt_encoder.state_dict().items()}
    decoder.update({f"mask_decoder.{k}": v for k, v in sam.mask_decoder.state_dict().items()})
    return {"encoder_sha256": state_dict_sha256(sam.image_encoder.state_dict()),
            "decoder_sha256": state_dict_sha256(decoder)}


@dataclass
class PrompterFile:
    """A prompter file's contents (``read_prompter``).

    Attributes:
        path: the file. hpg: ``HpgConfig``. uois: ``UoisConfig``. head / hdnet: state dicts.
        backbone: ``{"id", "source", "sha256", "hidden_size", "patch_size"}``. sam: ``{"id", "source",
        "encoder_sha256", "decoder_sha256"}``. training: what trained it (epochs, losses, data).
    """

    path: Path
    hpg: HpgConfig
    uois: UoisConfig
    head: dict[str, torch.Tensor]
    hdnet: dict[str, torch.Tensor]
    backbone: dict[str, Any]
    sam: dict[str, Any]
    training: dict[str, Any]


def save_prompter(path: str | Path, *, hpg: Hpg, hdnet: HDNet, uois: UoisConfig, backbone: Mapping[str, Any],
                  sam: Mapping[str, Any], training: Mapping[str, Any]) -> Path:
    """Write a prompter file atomically (head and HDNet on the CPU)."""
    from omnilabel.io import save_torch_atomic

    obj = {"format": PROMPTER_FORMAT, "version": PROMPTER_VERSION,
           "hpg": dataclasses.asdict(hpg.config), "uois": dataclasses.asdict(uois),
           "head": {k: v.detach().cpu() for k, v in hpg.head.state_dict().items()},
           "hdnet": {k: v.detach().cpu() for k, v in hdnet.state_dict().items()},
           "backbone": dict(backbone), "sam": dict(sam), "training": dict(training)}
    return save_torch_atomic(obj, path)


def read_prompter(path: str | Path) -> PrompterFile:
    """Read a prompter file.

    Raises:
        CheckpointError: missing, unreadable, or not a prompter file (naming what it is instead).
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"no prompter file at {p} (train one with `omnilabel train-prompter`)")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is an unreadable file
        raise CheckpointError(f"{p}: cannot read the prompter file: {exc}") from exc
    if not isinstance(obj, dict) or obj.get("format") != PROMPTER_FORMAT:
        what = obj.get("format", "a file without a format") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{p} is not a prompter file ({what}); `omnilabel train-prompter` writes them")
    if int(obj.get("version", 0)) > PROMPTER_VERSION:
        raise CheckpointError(f"{p}: prompter format version {obj['version']} is newer than this omnilabel reads "
                              f"({PROMPTER_VERSION}); upgrade omnilabel")
    try:
        hpg = HpgConfig(**{**obj["hpg"], "input_hw": tuple(obj["hpg"]["input_hw"])})
        return PrompterFile(path=p, hpg=hpg, uois=UoisConfig(**obj["uois"]), head=obj["head"], hdnet=obj["hdnet"],
                            backbone=obj["backbone"], sam=obj["sam"], training=obj.get("training", {}))
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{p}: incomplete prompter file ({exc})") from exc


def check_sam(pf: PrompterFile, sam: Any, *, sam_name: str) -> None:
    """Refuse a SAM other than the one the prompter was trained against.

    Raises:
        CheckpointError: naming the SAM the file records and the one given.
    """
    have = sam_checksums(sam)
    for part in ("encoder_sha256", "decoder_sha256"):
        if have[part] != pf.sam.get(part):
            what = "image encoder" if part == "encoder_sha256" else "prompt encoder and mask decoder"
            raise CheckpointError(f"prompter {pf.path} was trained against SAM {pf.sam.get('id')} "
                                  f"({pf.sam.get('source')}), but {sam_name} has another {what}: pass that SAM "
                                  "(--sam / --teacher), or train a prompter for this one")


def load_prompter(pf: PrompterFile, sam: SamTeacher, backbone_path: str | Path, *, sam_name: str,
                  uois: UoisConfig | None = None) -> UoisPrompter:
    """A ``UoisPrompter`` from a prompter file, on ``sam``'s device.

    Args:
        pf: the file (``read_prompter``). sam: the SAM teacher of the job. backbone_path: the local DINOv2 folder
        (the file's ``backbone.source`` resolved). sam_name: how to name ``sam`` in errors. uois: thresholds
        (default: the file's).

    Raises:
        CheckpointError: another SAM or another backbone than the file's, or weights that do not fit.
    """
    from omnilabel.models.dinov2 import load_dinov2
    from omnilabel.teachers.teacher_ckpt import load_strict, state_dict_sha256

    check_sam(pf, sam.sam, sam_name=sam_name)
    device = str(sam.device)
    backbone = load_dinov2(backbone_path, device=device)
    if state_dict_sha256(backbone.state_dict()) != pf.backbone.get("sha256"):
        raise CheckpointError(f"prompter {pf.path} was trained on backbone {pf.backbone.get('id')} "
                              f"({pf.backbone.get('source')}); the weights at {backbone_path} are another model")
    hpg = Hpg(backbone, pf.hpg)
    load_strict(hpg.head, pf.head, "prompt generator head", pf.path)
    width = pf.hdnet.get("mlp.0.weight")
    if width is None or width.ndim != 2:
        raise CheckpointError(f"{pf.path}: its HDNet weights are incomplete (no mlp.0.weight)")
    hdnet = HDNet(int(width.shape[1]) // 2)
    load_strict(hdnet, pf.hdnet, "HDNet", pf.path)
    return UoisPrompter(hpg.to(device), hdnet.to(device), sam, uois or pf.uois)
