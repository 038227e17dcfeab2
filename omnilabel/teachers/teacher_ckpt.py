"""Fine-tuned teacher files: only what fine-tuning changed, tied to the SAM they were trained from.

A teacher file is a ``torch.save`` of plain containers and tensors (read with ``weights_only=True``)::

    {"format": "omnilabel.sam-teacher", "version": 1,
     "prompts": "points" | "boxes" | "points+boxes", "class_aware": bool, "step": int,
     "base": {"id": "vit_h", "source": "vit_h" or an absolute path, "encoder_sha256": hex},
     "encoder_sha256": hex,          # the image encoder this teacher decodes from
     "encoder_included": bool,       # trained with --train-encoder: the file holds the encoder too
     "arch": {SamArch fields},
     "clip": None or {"source", "model_name", "width", "sha256"},
     "config": {FinetuneConfig fields},
     "state": {"prompt_encoder.*", "mask_decoder.*", ["class_prompt.*"], ["image_encoder.*"],
               ["task_prompt.gt"]: tensors}}

``prompts`` may also be ``refine`` (SUM's refinement module, ``omnilabel.teachers.uncertainty``); a teacher of
SUM training (``--unlabeled``) holds ``task_prompt.gt``, the vector ``pseudomask`` adds to the dense prompt
embedding (``omnilabel.teachers.finetune.TaskPrompt``).

Without the encoder a ``vit_h`` teacher is about 16 MB. The base is identified by the sha256 of its image
encoder's weights (:func:`state_dict_sha256`), not of its file, so the same weights saved as ``.pth`` or
``.safetensors`` match; loading a teacher on another base raises a ``CheckpointError``. A class-aware
teacher records the sha256 of the CLIP text tower it was trained with, checked the same way.

A Stable-SAM teacher (``finetune-teacher --stable``, ``omnilabel.teachers.stable``) holds no decoder, only the
plugins (about 330 KB for SAM's 256-wide decoder), and is version 2 (older readers refuse it by its version)::

    {"format": "omnilabel.sam-teacher", "version": 2, "prompts": "stable", "class_aware": False, "step": int,
     "base": {...}, "encoder_sha256": hex, "encoder_included": False, "arch": {...}, "clip": None,
     "config": {FinetuneConfig fields},
     "decoder_included": False,      # decode with the base's prompt encoder and decoder, or the start's
     "decoder_sha256": hex,          # stable.decoder_sha256 of the prompt encoder + decoder they were trained on
     "stable": {StableConfig fields, "parameters": int},
     "start": None or {"id": file name, "sha256": file sha256, "source": absolute path},
     "state": {"stable.layers.<i>.*": tensors}}

Without ``start`` the plugins sit on the base SAM's decoder. With it they sit on a fine-tuned teacher's
(``finetune-teacher --stable --teacher T.pt``): loading reads that teacher from ``start.source`` (or, moved
together, beside the plugin file), attaches it, and installs the plugins on its decoder. In both cases the
decoder's checksum must equal ``decoder_sha256``, else a ``CheckpointError`` names the file and the ``--sam``
or teacher file it needs. Decoder teacher files keep version 1 and ``decoder_included`` (absent) true.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from omnilabel.errors import CheckpointError

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

    from omnilabel.teachers.class_aware import ClassAwarePrompt

__all__ = ["STABLE_VERSION", "TEACHER_FORMAT", "TeacherFile", "attach_teacher", "build_full_sam", "check_encoder",
           "class_prompt_of", "file_size_mb", "load_strict", "read_teacher", "state_dict_sha256"]

TEACHER_FORMAT = "omnilabel.sam-teacher"
#: Version of a teacher file with a decoder.
TEACHER_VERSION = 1
#: Version of a plugin-only (Stable-SAM) teacher file; the highest this omnilabel reads.
STABLE_VERSION = 2
_PARTS = ("prompt_encoder", "mask_decoder", "class_prompt", "image_encoder", "task_prompt", "stable")
_MAX_LISTED = 8


def state_dict_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state dict's names, dtypes, shapes and bytes, in sorted key order.

    Args:
        state: name → tensor (any device; copied to CPU in turn).

    Returns:
        64 lowercase hex digits; equal for equal weights whatever file format they came from.
    """
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class TeacherFile:
    """A teacher file, read and checked (see the module docstring for the fields).

    Attributes:
        path: where it was read from.
        meta: every field but ``state``.
        state: name → tensor, names prefixed by the part (``mask_decoder.``...).
    """

    path: Path
    meta: dict[str, Any]
    state: dict[str, torch.Tensor]

    @property
    def class_aware(self) -> bool:
        return bool(self.meta["class_aware"])

    @property
    def encoder_included(self) -> bool:
        return bool(self.meta["encoder_included"])

    @property
    def encoder_sha256(self) -> str:
        return str(self.meta["encoder_sha256"])

    @property
    def clip(self) -> dict[str, Any] | None:
        return self.meta.get("clip")

    @property
    def base_source(self) -> str:
        return str(self.meta["base"]["source"])

    @property
    def is_stable(self) -> bool:
        """A Stable-SAM plugin file (``finetune-teacher --stable``)."""
        return bool(self.meta.get("stable"))

    @property
    def decoder_included(self) -> bool:
        """The file holds its prompt encoder and mask decoder (every file but a plugin-only one)."""
        return bool(self.meta.get("decoder_included", True))

    def part(self, name: str) -> dict[str, torch.Tensor]:
        """The state of one part, prefix removed (empty when the file does not hold it)."""
        prefix = name + "."
        return {k[len(prefix):]: v for k, v in self.state.items() if k.startswith(prefix)}


def read_teacher(path: str | Path) -> TeacherFile:
    """Read a teacher file.

    Raises:
        CheckpointError: missing or unreadable file, not a teacher file, a newer format version, or a file
            without the parts its header promises.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"teacher file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch/pickle/zip raise many unrelated types for a bad file
        raise CheckpointError(f"cannot read teacher file {path}: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict) or obj.get("format") != TEACHER_FORMAT:
        raise CheckpointError(f"{path} is not an omnilabel teacher file (made by `omnilabel finetune-teacher`); "
                              "a plain SAM checkpoint goes to --sam")
    if int(obj.get("version", 0)) > STABLE_VERSION:
        raise CheckpointError(f"{path} is teacher format version {obj['version']}; this omnilabel reads up to "
                              f"{STABLE_VERSION}")
    state = obj.get("state")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"teacher file {path} holds no tensor state")
    meta = {k: v for k, v in obj.items() if k != "state"}
    tf = TeacherFile(path=path, meta=meta, state=state)
    needed = (["prompt_encoder", "mask_decoder"] if tf.decoder_included else []) + (
        ["class_prompt"] if tf.class_aware else []) + (["image_encoder"] if tf.encoder_included else []) + (
        ["stable"] if tf.is_stable else [])
    missing = [p for p in needed if not tf.part(p)]
    stray = sorted({k.split(".")[0] for k in state} - set(_PARTS))
    records = []
    if tf.class_aware and not tf.clip:
        records.append("no CLIP record for its class module")
    if tf.is_stable and not isinstance(meta.get("decoder_sha256"), str):
        records.append("no decoder_sha256 for its Stable-SAM plugins")
    if not tf.decoder_included and not tf.is_stable:
        records.append("neither a decoder nor Stable-SAM plugins")
    if missing or stray or records:
        raise CheckpointError(f"teacher file {path} is incomplete: missing parts {missing}, unknown parts {stray}"
                              + "".join(f"; {r}" for r in records))
    return tf


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, path: Path) -> None:
    """``module.load_state_dict(state, strict=True)``, with a ``CheckpointError`` naming ``what`` and ``path``
    and the missing, unexpected and mis-shaped keys when the weights do not fit."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mis_shaped = [f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
                  for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mis_shaped:
        def listed(keys: list[str]) -> str:
            return ", ".join(keys[:_MAX_LISTED]) + (f", ... ({len(keys) - _MAX_LISTED} more)"
                                                    if len(keys) > _MAX_LISTED else "")
        problems = [f"{name}: {listed(keys)}" for name, keys in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mis_shaped))
                    if keys]
        raise CheckpointError(f"teacher file {path}: its {what} does not fit this SAM; " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def build_full_sam(tf: TeacherFile, *, device: str = "cpu") -> Sam:
    """The whole SAM of a teacher that holds its image encoder (trained with ``--train-encoder``).

    Raises:
        CheckpointError: the file holds no encoder, or its weights do not fit its recorded architecture.
    """
    from omnilabel.models.sam_loader import PIXEL_MEAN, PIXEL_STD, SamArch, build_sam_from_arch

    if not tf.encoder_included:
        raise CheckpointError(f"teacher file {tf.path} holds no image encoder; load it onto its base SAM")
    arch_fields = dict(tf.meta["arch"])
    arch_fields["global_attn_indexes"] = tuple(arch_fields["global_attn_indexes"])
    with torch.device("meta"):
        sam = build_sam_from_arch(SamArch(**arch_fields))
    sam.to_empty(device=torch.device(device))
    for part in ("image_encoder", "prompt_encoder", "mask_decoder"):
        load_strict(getattr(sam, part), tf.part(part), part, tf.path)
    with torch.no_grad():
        sam.pixel_mean.copy_(torch.tensor(PIXEL_MEAN).view(-1, 1, 1))
        sam.pixel_std.copy_(torch.tensor(PIXEL_STD).view(-1, 1, 1))
    return sam.eval()


def check_encoder(tf: TeacherFile, *, encoder_sha256: str, encoder_name: str) -> None:
    """Refuse a teacher trained on another image encoder than the job's.

    Raises:
        CheckpointError: naming the teacher, its base SAM and the ``--sam`` to pass.
    """
    if tf.encoder_sha256 != encoder_sha256:
        base = tf.meta["base"]
        raise CheckpointError(
            f"teacher {tf.path} was fine-tuned from SAM {base['id']!r} (image-encoder sha256 "
            f"{tf.encoder_sha256[:12]}…), but {encoder_name} has image-encoder sha256 {encoder_sha256[:12]}…; "
            f"load it on the SAM it was trained from (--sam {base['source']})")


def attach_teacher(tf: TeacherFile, encoder_sam: Sam, *, encoder_sha256: str, encoder_name: str) -> Sam:
    """A SAM that decodes with the teacher's prompt encoder and mask decoder from ``encoder_sam``'s encoder.

    The returned model shares ``encoder_sam.image_encoder`` (the same module, not a copy): every teacher of a
    job decodes from the one embedding that encoder computes. A plugin-only file (``tf.is_stable``) decodes
    with the decoder it was trained on plus its plugins (``omnilabel.teachers.stable.attach_stable``).

    Args:
        tf: the teacher file.
        encoder_sam: the SAM whose image encoder encodes every image of the job.
        encoder_sha256: ``state_dict_sha256`` of that encoder's weights.
        encoder_name: how to name it in an error (``--sam vit_b``, ``teacher p.pt``).

    Raises:
        CheckpointError: the teacher was trained on another encoder (or, plugins, on another decoder), or its
            weights do not fit.
    """
    from segment_anything.modeling import Sam

    if tf.is_stable:
        from omnilabel.teachers.stable import attach_stable

        return attach_stable(tf, encoder_sam, encoder_sha256=encoder_sha256, encoder_name=encoder_name)
    check_encoder(tf, encoder_sha256=encoder_sha256, encoder_name=encoder_name)
    prompt_encoder = copy.deepcopy(encoder_sam.prompt_encoder)
    mask_decoder = copy.deepcopy(encoder_sam.mask_decoder)
    load_strict(prompt_encoder, tf.part("prompt_encoder"), "prompt encoder", tf.path)
    load_strict(mask_decoder, tf.part("mask_decoder"), "mask decoder", tf.path)
    mean = encoder_sam.pixel_mean.detach().cpu().view(-1).tolist()
    std = encoder_sam.pixel_std.detach().cpu().view(-1).tolist()
    sam = Sam(image_encoder=encoder_sam.image_encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder,
              pixel_mean=mean, pixel_std=std)
    return sam.to(encoder_sam.pixel_mean.device).eval()


def class_prompt_of(tf: TeacherFile, sam: Sam) -> ClassAwarePrompt | None:
    """The teacher's trained class module (None for a teacher without one).

    Raises:
        CheckpointError: its weights do not fit.
    """
    from omnilabel.teachers.class_aware import ClassAwarePrompt

    if not tf.class_aware:
        return None
    clip = tf.clip or {}
    module = ClassAwarePrompt(sam.prompt_encoder, text_dim=int(clip["width"]))
    load_strict(module, tf.part("class_prompt"), "class module", tf.path)
    return module.to(sam.pixel_mean.device).eval()


def file_size_mb(path: str | Path) -> float:
    """Size of a file in MiB (for summaries)."""
    return float(np.round(Path(path).stat().st_size / 2**20, 2))
