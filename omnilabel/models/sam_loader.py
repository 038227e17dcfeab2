"""Load any SAM-architecture checkpoint: the official ``vit_b/l/h`` files, tiny test models, fine-tuned teachers.

The image-encoder architecture is read from the state dict itself, so one loader serves every size:

- ``image_encoder.patch_embed.proj.weight`` (C, 3, p, p): embedding width C and patch size p;
- ``image_encoder.pos_embed`` (1, g, g, C): the embedding grid g, hence the input size g * p;
- ``image_encoder.blocks.N.*``: depth = highest N + 1;
- ``image_encoder.blocks.N.attn.rel_pos_h`` (2 * s - 1, C / heads): s = g for a global-attention block,
  s = window for a windowed one (14 in the official models); its width is the head dimension;
- ``image_encoder.neck.0.weight`` (out, C, 1, 1): the neck's output channels, which are also the
  prompt-embedding width of the prompt encoder and mask decoder (256 in the official models).

The prompt encoder and mask decoder are built as in ``segment_anything.build_sam._build_sam``. A model
whose window equals its grid is read as all-global (``window_size=0``): both attend over the whole grid,
so the two readings compute the same function.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from omnilabel.errors import CheckpointError, InputError

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

#: ``Sam`` input normalisation (ImageNet RGB statistics in 0-255), as in ``_build_sam``.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
#: Mask decoder of every official SAM: TwoWayTransformer depth 2, MLP 2048, 8 heads; IoU head 3 x 256.
DECODER_DEPTH = 2
DECODER_MLP_DIM = 2048
DECODER_NUM_HEADS = 8
IOU_HEAD_DEPTH = 3
IOU_HEAD_HIDDEN_DIM = 256
#: Hidden channels of the prompt encoder's mask-downscaling convolutions.
MASK_IN_CHANS = 16

_PREFIX = "image_encoder."
_MAX_LISTED = 10


@dataclass(frozen=True)
class SamArch:
    """Architecture of a SAM image encoder (the prompt encoder and decoder are fixed).

    Attributes:
        embed_dim: ViT width C (768 / 1024 / 1280 for vit_b / vit_l / vit_h).
        depth: number of ViT blocks.
        num_heads: attention heads per block.
        global_attn_indexes: blocks attending over the whole grid; the others use windows.
        window_size: window side in patches (14 officially; 0 when every block is global).
        patch_size: patch side in pixels (16 officially).
        image_size: square input side in pixels (1024 officially).
        out_chans: neck output channels = prompt-embedding width (256 officially).
    """

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int
    patch_size: int
    image_size: int
    out_chans: int = 256

    @property
    def grid_size(self) -> int:
        """Side of the image-embedding grid in patches (64 officially)."""
        return self.image_size // self.patch_size


#: The official architectures, as ``segment_anything.build_sam`` builds them.
OFFICIAL_SAM_ARCHS: dict[str, SamArch] = {
    "vit_b": SamArch(768, 12, 12, (2, 5, 8, 11), 14, 16, 1024, 256),
    "vit_l": SamArch(1024, 24, 16, (5, 11, 17, 23), 14, 16, 1024, 256),
    "vit_h": SamArch(1280, 32, 16, (7, 15, 23, 31), 14, 16, 1024, 256),
}


def _require(sd: dict[str, Any], key: str, ndim: int) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"not a SAM checkpoint: missing key {key!r}")
    shape = tuple(sd[key].shape)
    if len(shape) != ndim:
        raise CheckpointError(f"not a SAM checkpoint: {key!r} has shape {shape}, expected {ndim} dims")
    return shape


def sam_arch_from_state_dict(sd: dict[str, Any]) -> SamArch:
    """Infer the image-encoder architecture of a SAM state dict from its tensor shapes.

    Args:
        sd: a SAM state dict (tensors on any device, ``meta`` included; only shapes are read).

    Returns:
        The ``SamArch`` that reproduces the state dict's shapes.

    Raises:
        CheckpointError: a key the inference needs is missing or has an unexpected shape.
    """
    embed_dim, in_chans, patch_size, patch_w = _require(sd, _PREFIX + "patch_embed.proj.weight", 4)
    if in_chans != 3 or patch_size != patch_w:
        raise CheckpointError(
            f"not a SAM checkpoint: patch_embed.proj.weight has shape "
            f"{(embed_dim, in_chans, patch_size, patch_w)}, expected (C, 3, p, p)"
        )
    _, grid, grid_w, pos_dim = _require(sd, _PREFIX + "pos_embed", 4)
    if grid != grid_w or pos_dim != embed_dim:
        raise CheckpointError(f"not a SAM checkpoint: pos_embed has shape {(1, grid, grid_w, pos_dim)}")
    out_chans = _require(sd, _PREFIX + "neck.0.weight", 4)[0]

    block_ids = {int(k.split(".")[2]) for k in sd if k.startswith(_PREFIX + "blocks.") and k.split(".")[2].isdigit()}
    if not block_ids:
        raise CheckpointError("not a SAM checkpoint: no image_encoder.blocks.* keys")
    depth = max(block_ids) + 1

    global_rows = 2 * grid - 1
    global_idx: list[int] = []
    window_size = 0
    head_dim = 0
    for i in range(depth):
        rel = sd.get(f"{_PREFIX}blocks.{i}.attn.rel_pos_h")
        if rel is None:
            continue  # reported by the strict key check of ``load_sam``
        rows, head_dim = int(rel.shape[0]), int(rel.shape[1])
        if rows == global_rows:
            global_idx.append(i)
        else:
            window_size = (rows + 1) // 2
    if head_dim == 0:
        raise CheckpointError("not a SAM checkpoint: no image_encoder.blocks.N.attn.rel_pos_h (relative positions)")
    if embed_dim % head_dim:
        raise CheckpointError(f"not a SAM checkpoint: embed dim {embed_dim} is not a multiple of head dim {head_dim}")
    if window_size == 0:
        global_idx = list(range(depth))
    return SamArch(
        embed_dim=int(embed_dim),
        depth=depth,
        num_heads=int(embed_dim) // head_dim,
        global_attn_indexes=tuple(global_idx),
        window_size=window_size,
        patch_size=int(patch_size),
        image_size=int(grid) * int(patch_size),
        out_chans=int(out_chans),
    )


def build_sam_from_arch(arch: SamArch) -> Sam:
    """Build a SAM of the given architecture with ``segment_anything``'s default (random) initialisation.

    Components and fixed hyperparameters are those of ``segment_anything.build_sam._build_sam``. Call it
    under ``with torch.device("meta"):`` to get shapes without allocating weights.

    Args:
        arch: the image-encoder architecture.

    Returns:
        A ``segment_anything.modeling.Sam`` in eval mode.
    """
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = arch.grid_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=arch.depth,
            embed_dim=arch.embed_dim,
            img_size=arch.image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=arch.num_heads,
            patch_size=arch.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=arch.global_attn_indexes,
            window_size=arch.window_size,
            out_chans=arch.out_chans,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=arch.out_chans,
            image_embedding_size=(grid, grid),
            input_image_size=(arch.image_size, arch.image_size),
            mask_in_chans=MASK_IN_CHANS,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=DECODER_DEPTH,
                embedding_dim=arch.out_chans,
                mlp_dim=DECODER_MLP_DIM,
                num_heads=DECODER_NUM_HEADS,
            ),
            transformer_dim=arch.out_chans,
            iou_head_depth=IOU_HEAD_DEPTH,
            iou_head_hidden_dim=IOU_HEAD_HIDDEN_DIM,
        ),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )
    return sam.eval()


def init_sam_checkpoint(arch: SamArch, path: str | Path, *, seed: int = 0) -> Path:
    """Write a randomly initialised SAM of ``arch``, to train from scratch (``finetune-teacher --train-encoder``).

    The weights are ``segment_anything``'s default initialisation drawn after ``torch.manual_seed(seed)`` (the
    global RNG is left untouched), saved as the official checkpoints are: a plain state dict.

    Args:
        arch: the architecture; ``image_size`` a multiple of ``patch_size``, ``embed_dim`` of ``num_heads``.
        path: the ``.pth`` file to write (atomically; parent folders are created).
        seed: seed of the weights; the same arch and seed give the same weights.

    Raises:
        InputError: an inconsistent architecture.
    """
    from omnilabel.io import atomic_path

    problems = []
    if min(arch.embed_dim, arch.depth, arch.num_heads, arch.patch_size, arch.image_size, arch.out_chans) < 1:
        problems.append("every size must be >= 1")
    elif arch.embed_dim % arch.num_heads:
        problems.append(f"embed dim {arch.embed_dim} is not a multiple of num heads {arch.num_heads}")
    elif arch.image_size % arch.patch_size:
        problems.append(f"image size {arch.image_size} is not a multiple of patch size {arch.patch_size}")
    elif arch.out_chans % DECODER_NUM_HEADS or arch.out_chans % 8:
        problems.append(f"prompt dim {arch.out_chans} must be a multiple of {max(DECODER_NUM_HEADS, 8)}")
    bad_globals = [i for i in arch.global_attn_indexes if not 0 <= i < arch.depth]
    if bad_globals:
        problems.append(f"global attention blocks {bad_globals} are not in 0..{arch.depth - 1}")
    if len(arch.global_attn_indexes) < arch.depth and arch.window_size < 1:
        problems.append("windowed blocks need a window size >= 1")
    if problems:
        raise InputError("cannot build this SAM", problems)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = build_sam_from_arch(arch)
    state = {k: v.detach().cpu().contiguous() for k, v in sam.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"SAM checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch/pickle/zip/safetensors raise many unrelated types for a bad file
        raise CheckpointError(f"cannot read SAM checkpoint {path}: {type(e).__name__}: {e}") from e
    if isinstance(obj, dict):
        for wrapper in ("model", "state_dict"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"SAM checkpoint {path} does not hold a state dict of tensors")
    sd = {str(k): v for k, v in obj.items()}
    # Checkpoints saved from a DistributedDataParallel-wrapped model prefix every key.
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _listed(keys: list[str]) -> str:
    head = ", ".join(keys[:_MAX_LISTED])
    return head + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def load_sam(path: str | Path, *, device: str = "cpu") -> Sam:
    """Load a SAM checkpoint of any image-encoder size, strictly.

    Accepts a plain state dict (Meta's official ``.pth`` format, what ``save_sam_checkpoint`` writes), a
    dict holding it under ``"model"`` or ``"state_dict"``, or a ``.safetensors`` file. The model is built
    on the ``meta`` device and materialised only once the keys and shapes are known to match.

    Args:
        path: checkpoint file.
        device: torch device string for the returned model (``"cpu"``, ``"cuda"``, ``"cuda:1"``).

    Returns:
        A ``segment_anything.modeling.Sam`` in eval mode on ``device``.

    Raises:
        CheckpointError: the file is missing or unreadable (naming the path), or its keys or shapes do not
            match the architecture (listing the first missing, unexpected and mis-shaped keys).
    """
    path = Path(path)
    sd = _read_state_dict(path)
    arch = sam_arch_from_state_dict(sd)
    with torch.device("meta"):
        sam = build_sam_from_arch(arch)
    expected = {k: tuple(v.shape) for k, v in sam.state_dict().items()}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mis_shaped = [
        f"{k} {tuple(sd[k].shape)} != {expected[k]}" for k in expected if k in sd and tuple(sd[k].shape) != expected[k]
    ]
    if missing or unexpected or mis_shaped:
        problems = []
        if missing:
            problems.append(f"missing keys: {_listed(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_listed(unexpected)}")
        if mis_shaped:
            problems.append(f"shape mismatches: {_listed(mis_shaped)}")
        raise CheckpointError(
            f"SAM checkpoint {path} does not match the inferred architecture {arch}; " + "; ".join(problems)
        )
    sam.to_empty(device=torch.device(device))
    sam.load_state_dict(sd, strict=True)
    # Non-persistent buffers are not in the state dict; ``to_empty`` left them uninitialised.
    with torch.no_grad():
        sam.pixel_mean.copy_(torch.tensor(PIXEL_MEAN).view(-1, 1, 1))
        sam.pixel_std.copy_(torch.tensor(PIXEL_STD).view(-1, 1, 1))
    return sam.eval()
