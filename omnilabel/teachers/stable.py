"""Stable-SAM (Fan et al., arXiv 2311.15776; digest ``specs/stable-sam.md``): learn *where* SAM's mask decoder
samples the image features its tokens attend to, with every SAM weight frozen.

Two plugins sit on a token-to-image cross-attention of SAM's ``TwoWayTransformer``:

- **DSP**, the Deformable Sampling Plugin (§2, Eq. 3–4): an offset network on the image features of that
  block, ``x_p`` (B, C, g, g), predicts one offset per feature cell, ``Δp = s_p · tanh(θ_offset(x_p))``, and
  the features are resampled bilinearly at ``p + Δp`` (zeros outside the grid, as Deformable DETR and DAT).
  ``θ_offset`` is Conv 1×1 (C → C_h) → depthwise Conv 5×5 → LayerNorm → GELU → Conv 1×1 (C_h → 2, no bias).
- **DRP**, the Dynamic Routing Plugin (§3, Eq. 5–6): ``α = softmax(MLP(t_o)) · s`` from the output-mask token
  ``t_o``, with MLP = Linear (C → h) → LayerNorm → GELU → Linear (h → 2) and ``s`` a learnable scalar; the
  frozen attention then reads keys and values from ``α1 · x_{p+Δp} + α2 · x_p``.

Only the key and value inputs of that attention change: the block's ``keys`` stream (its residual image
tokens, the image-to-token attention, the upscaling and the hypernetwork product) stays on the regular grid,
so the predicted mask is not warped (digest §6, must-not-miss 2). ``install_stable`` replaces the chosen
``TwoWayAttentionBlock``s of a ``MaskDecoder`` by ``StableAttentionBlock``s that hold the *same* SAM modules
(same state-dict names) plus the plugin under ``stable``; ``SamTeacher`` (inference) and ``SamTrainable``
(fine-tuning) both run the decoder's transformer, so both use it.

Choices where the paper is silent (digest §6), and why:

- **Placement**: one DSP + DRP on ``layers[1]`` only (``StableConfig.layers``). In ``layers[0]`` the keys are
  the image embedding plus the no-mask embedding, so for box and point prompts its offsets could not depend
  on the prompt; the paper's attention analysis is on the second block. The final token-to-image attention
  is not given one.
- **Widths**: ``C_h = C`` for the offset network and ``h = C / 8`` for the DRP: for SAM's C = 256 that is
  81,827 parameters, the paper's "0.08 M" (digest §2 table: 73,472 offset network + 8,355 DRP). The file of a
  256-wide decoder's plugins is about 330 KB.
- **s_p = 2 feature cells** (32 px at SAM's 1024-px input): DAT's largest offset range (factor 4 of
  half-cells); a bound of a few cells lets a token's keys come from the object next to where they drifted
  without turning the attention into a global warp.
- **Positional encoding**: ``key_pe`` stays on the regular grid (``k = mixed + key_pe``, ``v = mixed``), and
  the offset network sees ``x_p`` without it (Eq. 3).
- **t_o**: ``queries[:, 1]`` after the block's self-attention and ``norm1``, just before the cross-attention:
  the first mask token, the one SAM decodes single-output masks with. All tokens share the attention's
  keys and values, so there is one α per prompt, and the decoder computes every token whatever the caller
  asks for; with multimask output the same token routes for the three multimask tokens (their mean would
  change with each token's learnt role; the single-output token absorbs the whole prompt).
- **Offsets per prompt**: SAM's decoder repeats the image embedding per prompt (``repeat_interleave``), and
  in ``layers[1]`` the keys already depend on the prompt, so offsets are computed per prompt.
- **Initialisation, exactly SAM**: the offset network's last conv is zero (``Δp = 0`` exactly), ``s = 1``
  and the DRP's last layer is zero (α = (½, ½) for every prompt). The mix is computed as the algebraically
  equal ``s · x + α1 · (x_{p+Δp} − x)``, and the bilinear sampler is written so that an exactly integer
  position returns its cell exactly (weights 1 and 0; ``grid_sample``'s coordinate normalisation does not
  round-trip integers exactly). So an untrained plugin adds exactly zero: ``1 · x + α1 · 0 == x`` bit for
  bit, and SAM's masks and scores are unchanged. Gradients still reach the offset network from the first
  step (the sampler's derivative at ``Δp = 0`` is the feature difference to the next cell); the DRP's MLP
  learns once the offsets have moved.
- **Sampling**: bilinear, zeros outside the grid (the DAT / Deformable-DETR default), a single offset group
  at full resolution; positions in feature-cell units, (x, y) order.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from omnilabel.errors import CheckpointError, InputError

if TYPE_CHECKING:
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam

    from omnilabel.teachers.teacher_ckpt import TeacherFile

__all__ = ["MASK_TOKEN_INDEX", "DynamicRouter", "StableAttentionBlock", "StableConfig", "StablePlugin",
           "StablePlugins", "attach_stable", "bilinear_sample", "count_parameters", "decoder_sha256",
           "install_stable", "plugins_of"]

#: The token SAM's decoder holds the single-output mask in (after the IoU token): Stable-SAM's t_o.
MASK_TOKEN_INDEX = 1


@dataclass(frozen=True)
class StableConfig:
    """The plugins' shape (recorded in the teacher file; see the module docstring for each choice).

    Attributes:
        layers: indices of the ``TwoWayAttentionBlock``s that get a DSP + DRP (digest §6: ``layers[1]``).
        offset_hidden: C_h of the offset network; None = the decoder's width C.
        router_hidden: h of the DRP's MLP; None = C / 8.
        offset_scale: s_p, the largest offset per axis, in feature cells (the paper gives no value: 2).
        kernel_size: the offset network's depthwise conv (paper: 5 × 5).
    """

    layers: tuple[int, ...] = (1,)
    offset_hidden: int | None = None
    router_hidden: int | None = None
    offset_scale: float = 2.0
    kernel_size: int = 5

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        problems = []
        if not self.layers or len(set(self.layers)) != len(self.layers) or min(self.layers) < 0:
            problems.append(f"layers must be distinct block indices >= 0, got {self.layers}")
        for name in ("offset_hidden", "router_hidden"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                problems.append(f"{name} must be >= 1 or None, got {value}")
        if not 0 < self.offset_scale < float("inf"):
            problems.append(f"offset_scale must be > 0, got {self.offset_scale}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            problems.append(f"kernel_size must be odd and >= 1, got {self.kernel_size}")
        if problems:
            raise InputError("bad Stable-SAM settings", problems)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "layers": list(self.layers)}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> StableConfig:
        """The config of a teacher file's ``stable`` record (other keys, e.g. ``parameters``, ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})


def bilinear_sample(x: torch.Tensor, pos_xy: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Features read at fractional cell positions, bilinearly, zeros outside the grid.

    Equal to ``F.grid_sample(..., mode="bilinear", padding_mode="zeros", align_corners=True)`` on the
    normalised positions, but written on cell indices so that an integer position returns its cell exactly
    (weight 1 on it, 0 on its neighbours): an untrained DSP (Δp = 0) reproduces the grid bit for bit.

    Args:
        x: (B, H·W, C) float features, row-major over the (H, W) grid.
        pos_xy: (B, N, 2) float positions in cells, (x, y) order; cell (i, j) is at (j, i).
        hw: (H, W).

    Returns:
        (B, N, C) in ``x``'s dtype.
    """
    h, w = hw
    b, _, c = x.shape
    px, py = pos_xy[..., 0], pos_xy[..., 1]
    x0f, y0f = torch.floor(px), torch.floor(py)
    fx, fy = (px - x0f).to(x.dtype), (py - y0f).to(x.dtype)
    x0, y0 = x0f.long(), y0f.long()
    out = None
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            index = yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)
            values = torch.gather(x, 1, index[..., None].expand(b, index.shape[1], c))
            term = (wx * wy * inside.to(x.dtype))[..., None] * values
            out = term if out is None else out + term
    assert out is not None
    return out


class DynamicRouter(nn.Module):
    """DRP (Eq. 5): ``α = softmax(MLP(t_o)) · s`` per prompt.

    Args:
        dim: C, the token width. hidden: h.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, 2))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, token: torch.Tensor) -> torch.Tensor:
        """``token`` (B, C) → α (B, 2) float32: (α1 deformed, α2 regular), α1 + α2 = s."""
        return torch.softmax(self.mlp(token).float(), dim=-1) * self.scale.float()


class StablePlugin(nn.Module):
    """One DSP + DRP: the routed mix of deformed and regular features that replaces an attention's K/V input.

    Args:
        dim: C, the decoder's width.
        config: widths, s_p, kernel.

    Attributes:
        offset: θ_offset (its last conv zero-initialised). router: the DRP.
        last_alpha: (B, 2) α of the last forward pass, detached (for inspection: the paper reports mean α1
            per prompt type); None before the first.
    """

    def __init__(self, dim: int, config: StableConfig) -> None:
        from segment_anything.modeling.common import LayerNorm2d

        super().__init__()
        hidden = int(config.offset_hidden or dim)
        k = int(config.kernel_size)
        self.offset = nn.Sequential(
            nn.Conv2d(dim, hidden, 1),
            nn.Conv2d(hidden, hidden, k, padding=k // 2, groups=hidden),
            LayerNorm2d(hidden),
            nn.GELU(),
            nn.Conv2d(hidden, 2, 1, bias=False),
        )
        nn.init.zeros_(self.offset[-1].weight)
        self.router = DynamicRouter(dim, int(config.router_hidden or max(1, dim // 8)))
        self.offset_scale = float(config.offset_scale)
        self.last_alpha: torch.Tensor | None = None

    def offsets(self, x: torch.Tensor) -> torch.Tensor:
        """Δp (B, 2, H, W) in cells, (dx, dy), bounded by s_p, of features ``x`` (B, C, H, W)."""
        return self.offset_scale * torch.tanh(self.offset(x).float())

    def forward(self, keys: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """The K/V input of the token-to-image attention.

        Args:
            keys: (B, H·W, C) image features of the block, on a square grid (SAM's g × g).
            token: (B, C) t_o of each prompt.

        Returns:
            (B, H·W, C) ``α1 · x_{p+Δp} + α2 · x_p``, computed as ``s · x + α1 · (x_{p+Δp} − x)``.
        """
        b, n, c = keys.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"Stable-SAM expects a square feature grid, got {n} tokens")
        hw = (side, side)
        x = keys.transpose(1, 2).reshape(b, c, side, side)
        delta = self.offsets(x).permute(0, 2, 3, 1).reshape(b, n, 2)
        ys, xs = torch.meshgrid(torch.arange(side, device=keys.device), torch.arange(side, device=keys.device),
                                indexing="ij")
        grid = torch.stack([xs, ys], dim=-1).reshape(1, n, 2).to(delta.dtype)
        deformed = bilinear_sample(keys, grid + delta, hw)
        alpha = self.router(token)
        self.last_alpha = alpha.detach()
        a1 = alpha[:, 0].to(keys.dtype)[:, None, None]
        return self.router.scale.to(keys.dtype) * keys + a1 * (deformed - keys)


class StablePlugins(nn.Module):
    """The plugins of one decoder by block index (``layers.<i>.*``: the teacher file's ``stable.*`` state)."""

    def __init__(self, plugins: dict[int, StablePlugin]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({str(i): p for i, p in sorted(plugins.items())})


_BLOCK_PARTS = ("self_attn", "norm1", "cross_attn_token_to_image", "norm2", "mlp", "norm3", "norm4",
                "cross_attn_image_to_token")


class StableAttentionBlock(nn.Module):
    """SAM's ``TwoWayAttentionBlock`` with Stable-SAM's K/V input on its token-to-image attention.

    Holds the original block's modules themselves (not copies; same state-dict names) and the plugin as
    ``stable``. The forward pass is ``TwoWayAttentionBlock.forward`` with one change: the token-to-image
    attention reads ``k = mixed + key_pe, v = mixed`` instead of ``k = keys + key_pe, v = keys``.
    """

    def __init__(self, block: nn.Module, plugin: StablePlugin) -> None:
        super().__init__()
        for name in _BLOCK_PARTS:
            setattr(self, name, getattr(block, name))
        self.skip_first_layer_pe = bool(block.skip_first_layer_pe)
        self.stable = plugin

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                key_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Self attention block
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            attn_out = self.self_attn(q=q, k=q, v=queries)
            queries = queries + attn_out
        queries = self.norm1(queries)

        # Tokens attend to the routed deformed/regular mix; the keys stream itself stays on the grid
        mixed = self.stable(keys, queries[:, MASK_TOKEN_INDEX])
        q = queries + query_pe
        k = mixed + key_pe
        attn_out = self.cross_attn_token_to_image(q=q, k=k, v=mixed)
        queries = queries + attn_out
        queries = self.norm2(queries)

        # MLP block
        mlp_out = self.mlp(queries)
        queries = queries + mlp_out
        queries = self.norm3(queries)

        # Image embedding attends to the tokens
        q = queries + query_pe
        k = keys + key_pe
        attn_out = self.cross_attn_image_to_token(q=k, k=q, v=queries)
        keys = keys + attn_out
        keys = self.norm4(keys)
        return queries, keys


def install_stable(decoder: MaskDecoder, config: StableConfig | None = None) -> StablePlugins:
    """Put untrained plugins into a decoder, in place (its SAM weights untouched).

    Args:
        decoder: a ``segment_anything`` ``MaskDecoder`` without plugins.
        config: where and how wide (default ``StableConfig()``).

    Returns:
        The plugins (the modules now inside the decoder), on the decoder's device.

    Raises:
        CheckpointError: the decoder already has plugins, or has no block of a requested index.
    """
    config = config or StableConfig()
    layers = decoder.transformer.layers
    if any(isinstance(block, StableAttentionBlock) for block in layers):
        raise CheckpointError("this mask decoder already has Stable-SAM plugins")
    missing = [i for i in config.layers if i >= len(layers)]
    if missing:
        raise CheckpointError(f"Stable-SAM plugins for blocks {missing}, but the decoder has {len(layers)} blocks")
    dim = int(decoder.transformer_dim)
    ref = next(decoder.parameters())
    plugins = {}
    for i in config.layers:
        plugins[i] = StablePlugin(dim, config).to(device=ref.device, dtype=ref.dtype)
        layers[i] = StableAttentionBlock(layers[i], plugins[i])
    return StablePlugins(plugins)


def plugins_of(decoder: MaskDecoder) -> StablePlugins:
    """The plugins inside a decoder (shared modules; empty when it has none)."""
    return StablePlugins({i: block.stable for i, block in enumerate(decoder.transformer.layers)
                          if isinstance(block, StableAttentionBlock)})


def decoder_sha256(prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder) -> str:
    """``state_dict_sha256`` of SAM's prompt encoder and mask decoder, plugins left out: what the plugins of a
    teacher file were trained on (``prompt_encoder.*``, ``mask_decoder.*`` names, as in a teacher file)."""
    from omnilabel.teachers.teacher_ckpt import state_dict_sha256

    plugin_prefixes = tuple(f"transformer.layers.{i}.stable." for i, block in
                            enumerate(mask_decoder.transformer.layers) if isinstance(block, StableAttentionBlock))
    state = {f"prompt_encoder.{k}": v for k, v in prompt_encoder.state_dict().items()}
    state.update({f"mask_decoder.{k}": v for k, v in mask_decoder.state_dict().items()
                  if not k.startswith(plugin_prefixes)})
    return state_dict_sha256(state)


def start_file(tf: TeacherFile) -> Path:
    """The teacher file a stacked plugin file sits on: where it was at training, else beside the plugins.

    Raises:
        CheckpointError: in neither place.
    """
    start = tf.meta["start"]
    recorded = Path(str(start.get("source") or start["id"]))
    beside = tf.path.parent / str(start["id"])
    for candidate in (recorded, beside):
        if candidate.is_file():
            return candidate
    raise CheckpointError(
        f"teacher {tf.path} holds Stable-SAM plugins trained on top of teacher {start['id']!r} (file sha256 "
        f"{str(start.get('sha256'))[:12]}…), which is neither at {recorded} nor beside it at {beside}; put that "
        "teacher file back at one of them")


def attach_stable(tf: TeacherFile, encoder_sam: Sam, *, encoder_sha256: str, encoder_name: str) -> Sam:
    """A SAM that decodes with a plugin-only teacher file: the decoder it was trained on, plus its plugins.

    That decoder is the base SAM's (``encoder_sam``'s) or, for plugins trained on top of a fine-tuned teacher
    (``finetune-teacher --stable --teacher T.pt``), that teacher's, read from the path the file records (or
    beside the file). Either way its checksum must be the one the file records.

    Args:
        tf: a teacher file with ``stable`` set (``TeacherFile.is_stable``).
        encoder_sam: the SAM whose image encoder encodes every image of the job (shared, not copied).
        encoder_sha256: ``state_dict_sha256`` of that encoder. encoder_name: how to name it in an error.

    Raises:
        CheckpointError: another image encoder; the start teacher is missing; the decoder is not the one
            the plugins were trained on (naming the file and the ``--sam`` or teacher file to restore); or the
            plugins' weights do not fit.
    """
    from segment_anything.modeling import Sam

    from omnilabel.teachers.teacher_ckpt import attach_teacher, check_encoder, load_strict, read_teacher

    check_encoder(tf, encoder_sha256=encoder_sha256, encoder_name=encoder_name)
    start = tf.meta.get("start")
    if start:
        start_path = start_file(tf)
        sam = attach_teacher(read_teacher(start_path), encoder_sam, encoder_sha256=encoder_sha256,
                             encoder_name=encoder_name)
    else:
        mean = encoder_sam.pixel_mean.detach().cpu().view(-1).tolist()
        std = encoder_sam.pixel_std.detach().cpu().view(-1).tolist()
        sam = Sam(image_encoder=encoder_sam.image_encoder, prompt_encoder=copy.deepcopy(encoder_sam.prompt_encoder),
                  mask_decoder=copy.deepcopy(encoder_sam.mask_decoder), pixel_mean=mean, pixel_std=std)
        sam = sam.to(encoder_sam.pixel_mean.device)
    recorded, have = str(tf.meta["decoder_sha256"]), decoder_sha256(sam.prompt_encoder, sam.mask_decoder)
    if have != recorded:
        if start:
            raise CheckpointError(
                f"teacher {tf.path} holds Stable-SAM plugins trained on the decoder of teacher {start['id']!r} "
                f"(decoder sha256 {recorded[:12]}…), but {start_path} now has decoder sha256 {have[:12]}…; put "
                f"back the teacher file they were trained on (file sha256 {str(start.get('sha256'))[:12]}…), or "
                f"train plugins for this one: `omnilabel finetune-teacher --stable --teacher {start_path}`")
        base = tf.meta["base"]
        raise CheckpointError(
            f"teacher {tf.path} holds Stable-SAM plugins trained on the mask decoder of SAM {base['id']!r} "
            f"(decoder sha256 {recorded[:12]}…), but {encoder_name} has decoder sha256 {have[:12]}…; pass "
            f"--sam {base['source']}")
    try:
        config = StableConfig.from_dict(dict(tf.meta["stable"]))
        plugins = install_stable(sam.mask_decoder, config)
    except (CheckpointError, InputError, TypeError, ValueError) as exc:
        raise CheckpointError(f"teacher {tf.path}: bad Stable-SAM record: {exc}") from exc
    load_strict(plugins, tf.part("stable"), "Stable-SAM plugins", tf.path)
    return sam.eval()


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of a module (each shared one once)."""
    return sum(p.numel() for p in module.parameters())
