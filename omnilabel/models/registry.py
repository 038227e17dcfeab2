"""Named weights: where each official checkpoint comes from, where it lives in the cache, how it is fetched.

A name (``vit_b``, ``grounding-dino-tiny``, ``clip-vit-b-32``, ``resnet-50``, ``dinov2-small``) maps to a
:class:`WeightSpec`: one or more files with their URLs and, where known, their sha256 and size. Files are cached under
``$OMNILABEL_CACHE`` (default ``~/.cache/omnilabel``) as ``<cache>/<name>/<filename>``:

- a single-file checkpoint (SAM, CLIP) resolves to that file;
- a multi-file checkpoint (Grounding DINO, the students' ImageNet ResNets, and the DINOv2 backbones of
  UOIS-SAM's prompt generator, in ``transformers`` format) resolves to the directory ``<cache>/<name>``, which
  ``from_pretrained`` loads.

A download streams into a temporary file beside its target, checks the sha256 (or, where the sha256 is not
recorded, the size, if that is), and only then renames it into place: an interrupted or corrupt download
never leaves a file that looks cached. Progress goes to an ``on_event`` callback as ``download`` events
(see :mod:`omnilabel.events`); nothing is printed. ``OMNILABEL_OFFLINE=1`` forbids downloads (:func:`offline`
is the one place that reads it); then, as on a network failure, :func:`resolve` raises a
:class:`~omnilabel.errors.CheckpointError` naming each missing file, its URL, the exact path to put it at,
and the command ``omnilabel weights download NAME``.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from omnilabel.errors import CheckpointError
from omnilabel.events import OnEvent, emit
from omnilabel.io import file_sha256

__all__ = [
    "REGISTRY",
    "WeightFile",
    "WeightKind",
    "WeightRef",
    "WeightSpec",
    "cache_dir",
    "download",
    "is_cached",
    "list_weights",
    "locate",
    "node_name",
    "offline",
    "resolve",
    "weight_path",
    "weight_ref",
]

WeightKind = Literal["sam", "gdino", "clip", "resnet", "dinov2"]

#: Environment variable overriding the cache directory.
CACHE_ENV = "OMNILABEL_CACHE"
#: Environment variable that forbids downloads when set to 1/true/yes.
OFFLINE_ENV = "OMNILABEL_OFFLINE"

#: Bytes read at a time, and the least progress between two ``download`` events.
_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class WeightFile:
    """One downloadable file of a checkpoint.

    Attributes:
        filename: name in the cache directory of its checkpoint.
        url: where it is downloaded from (``https://`` or ``file://``).
        sha256: lowercase hex digest, or None where it is not recorded (the size is checked instead).
        size_bytes: exact size, or None where it is not recorded.
    """

    filename: str
    url: str
    sha256: str | None = None
    size_bytes: int | None = None


@dataclass(frozen=True)
class WeightSpec:
    """A named checkpoint.

    Attributes:
        name: the name users type (``vit_b``).
        kind: which model family loads it.
        files: its files; one for SAM and CLIP, several (a ``transformers`` model directory) for GDino,
            ResNet and DINOv2.
        description: one line for ``omnilabel weights list``.
        license: the license of the weights.
        architecture: what the loader builds: the ``segment_anything`` registry key for SAM (``vit_b``),
            the ``open_clip`` model name for CLIP (``ViT-B-32``), the Hugging Face repository for GDino,
            ResNet and DINOv2.
    """

    name: str
    kind: WeightKind
    files: tuple[WeightFile, ...]
    description: str
    license: str
    architecture: str = ""

    @property
    def is_directory(self) -> bool:
        """True when the checkpoint is a directory of several files."""
        return len(self.files) > 1


_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
_HF_URL = "https://huggingface.co/{repo}/resolve/main/{filename}"
_GDINO_FILES = (
    "config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
)
_RESNET_FILES = ("config.json", "model.safetensors")
_DINOV2_FILES = ("config.json", "model.safetensors")


def _sam(name: str, stem: str, sha256: str, size_bytes: int, label: str) -> WeightSpec:
    filename = f"sam_{stem}.pth"
    return WeightSpec(
        name=name,
        kind="sam",
        files=(WeightFile(filename, _SAM_URL + filename, sha256, size_bytes),),
        description=f"Segment Anything {label} (official checkpoint)",
        license="Apache-2.0",
        architecture=name,
    )


def _hf_directory(name: str, kind: WeightKind, repo: str, filenames: tuple[str, ...], description: str) -> WeightSpec:
    """A checkpoint that is a Hugging Face repository's folder in ``transformers`` format."""
    # The Hugging Face files carry no sha256 or size here: they are checked only for being complete.
    return WeightSpec(
        name=name,
        kind=kind,
        files=tuple(WeightFile(f, _HF_URL.format(repo=repo, filename=f)) for f in filenames),
        description=description,
        license="Apache-2.0",
        architecture=repo,
    )


def _gdino(name: str, label: str) -> WeightSpec:
    repo = f"IDEA-Research/{name}"
    return _hf_directory(name, "gdino", repo, _GDINO_FILES, f"Grounding DINO {label} ({repo}, transformers format)")


def _resnet(depth: int) -> WeightSpec:
    name, repo = f"resnet-{depth}", f"microsoft/resnet-{depth}"
    return _hf_directory(name, "resnet", repo, _RESNET_FILES,
                         f"ResNet-{depth}, ImageNet-1k ({repo}, transformers format): a student backbone")


def _dinov2(size: str, label: str) -> WeightSpec:
    name, repo = f"dinov2-{size}", f"facebook/dinov2-{size}"
    return _hf_directory(name, "dinov2", repo, _DINOV2_FILES,
                         f"DINOv2 {label} ({repo}, transformers format): UOIS-SAM's prompt-generator backbone")


REGISTRY: dict[str, WeightSpec] = {
    spec.name: spec
    for spec in (
        _sam("vit_b", "vit_b_01ec64", "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
             375_042_383, "ViT-B"),
        _sam("vit_l", "vit_l_0b3195", "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
             1_249_524_607, "ViT-L"),
        _sam("vit_h", "vit_h_4b8939", "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
             2_564_550_879, "ViT-H"),
        _gdino("grounding-dino-tiny", "Swin-T"),
        _gdino("grounding-dino-base", "Swin-B"),
        WeightSpec(
            name="clip-vit-b-32",
            kind="clip",
            files=(
                WeightFile(
                    "open_clip_pytorch_model.bin",
                    _HF_URL.format(
                        repo="laion/CLIP-ViT-B-32-laion2B-s34B-b79K", filename="open_clip_pytorch_model.bin"
                    ),
                ),
            ),
            description="OpenCLIP ViT-B/32 trained on LAION-2B (open_clip pretrained 'laion2b_s34b_b79k')",
            license="MIT",
            architecture="ViT-B-32",
        ),
        *(_resnet(depth) for depth in (18, 34, 50, 101, 152)),
        # UOIS-SAM spec §3.1: the HPG backbone is DINOv2 ViT-S/14 (dinov2-small, the default); base is wider.
        _dinov2("small", "ViT-S/14"),
        _dinov2("base", "ViT-B/14"),
    )
}


def list_weights() -> list[WeightSpec]:
    """Every registered checkpoint, in registry order."""
    return list(REGISTRY.values())


def cache_dir() -> Path:
    """The weight cache: ``$OMNILABEL_CACHE`` if set, else ``~/.cache/omnilabel`` (not created here)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "omnilabel"


def _spec(name: str) -> WeightSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise CheckpointError(
            f"unknown checkpoint name {name!r}; known names: {', '.join(REGISTRY)}"
        ) from None


def weight_path(name: str) -> Path:
    """Where a named checkpoint lives in the cache: its file, or its directory for multi-file checkpoints.

    Raises:
        CheckpointError: unknown name.
    """
    spec = _spec(name)
    folder = cache_dir() / spec.name
    return folder if spec.is_directory else folder / spec.files[0].filename


def _file_path(spec: WeightSpec, wf: WeightFile) -> Path:
    return cache_dir() / spec.name / wf.filename


def is_cached(name: str) -> bool:
    """Whether every file of a named checkpoint is in the cache (presence only; checksums are checked when
    downloading)."""
    spec = _spec(name)
    return all(_file_path(spec, wf).is_file() for wf in spec.files)


def offline() -> bool:
    """Whether downloads are forbidden: ``$OMNILABEL_OFFLINE`` is ``1``, ``true``, ``yes`` or ``on``."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _missing_message(spec: WeightSpec, reason: str) -> str:
    missing = [wf for wf in spec.files if not _file_path(spec, wf).is_file()] or list(spec.files)
    lines = [f"checkpoint {spec.name!r} ({spec.kind}) is not in the cache and {reason}."]
    lines.append("Missing files (download each URL to the path shown):")
    lines += [f"  {wf.url}\n    -> {_file_path(spec, wf)}" for wf in missing]
    lines.append(
        f"Or run `omnilabel weights download {spec.name}` where the network is reachable "
        f"(set {CACHE_ENV} to choose the cache), or pass a local checkpoint path instead of the name."
    )
    return "\n".join(lines)


def _fetch(wf: WeightFile, target: Path, *, on_event: OnEvent | None) -> None:
    """Stream ``wf.url`` to ``target`` through a temporary file; verify; rename. Network errors propagate.

    Emits ``download`` events (``file``, ``done``, ``total``): one before the first byte, then one per
    ``_CHUNK_BYTES`` received at most, and one when the file is complete.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(wf.url) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else wf.size_bytes
            emit(on_event, "download", file=target.name, done=0, total=total)
            reported = 0
            while chunk := response.read(_CHUNK_BYTES):
                out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
                if size - reported >= _CHUNK_BYTES:
                    emit(on_event, "download", file=target.name, done=size, total=total)
                    reported = size
            if reported != size:
                emit(on_event, "download", file=target.name, done=size, total=total)
        if wf.sha256 is not None and digest.hexdigest() != wf.sha256.lower():
            raise CheckpointError(
                f"checksum mismatch for {wf.url}: sha256 {digest.hexdigest()}, expected {wf.sha256}; "
                "the partial file was deleted, try the download again"
            )
        if wf.sha256 is None and wf.size_bytes is not None and size != wf.size_bytes:
            raise CheckpointError(
                f"size mismatch for {wf.url}: {size} bytes, expected {wf.size_bytes}; "
                "the partial file was deleted, try the download again"
            )
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def download(name: str, *, force: bool = False, on_event: OnEvent | None = None) -> Path:
    """Fetch a named checkpoint into the cache.

    Args:
        name: a registry name.
        force: download again files that are already cached.
        on_event: called with ``download`` events (``file``: the file name, ``done``: bytes so far,
            ``total``: bytes or None when unknown) as each file arrives, at most once per MiB.

    Returns:
        :func:`weight_path` of the checkpoint.

    Raises:
        CheckpointError: unknown name; downloads forbidden by ``OMNILABEL_OFFLINE``; a network failure (the
            message names each missing file, where to put it and the command to retry); a checksum or size
            mismatch (the downloaded file is deleted).
    """
    spec = _spec(name)
    if offline():
        raise CheckpointError(_missing_message(spec, f"downloads are disabled ({OFFLINE_ENV} is set)"))
    for wf in spec.files:
        target = _file_path(spec, wf)
        if target.is_file() and not force:
            continue
        try:
            _fetch(wf, target, on_event=on_event)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise CheckpointError(_missing_message(spec, f"could not be downloaded ({exc})")) from exc
    return weight_path(name)


def resolve(name_or_path: str | os.PathLike[str], *, kind: WeightKind, allow_download: bool = True,
            on_event: OnEvent | None = None) -> Path:
    """Turn a checkpoint argument (a path or a registry name) into a local path.

    An existing file or directory is returned as is. A registry name of the right kind gives its cached
    path, downloading it first when it is not cached (unless ``allow_download`` is False or
    ``OMNILABEL_OFFLINE`` is set).

    Args:
        name_or_path: a path to a checkpoint file/directory, or a registry name.
        kind: the model family expected.
        allow_download: whether a missing named checkpoint may be downloaded.
        on_event: receives the ``download`` events of a download (see :func:`download`).

    Returns:
        A path that exists.

    Raises:
        CheckpointError: neither an existing path nor a known name of this kind (the message lists the known
            names of the kind); a name of another kind; a checkpoint that is missing and cannot be
            downloaded (the message names each file, where to put it and the download command).
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    spec = REGISTRY.get(name)
    known = [s.name for s in REGISTRY.values() if s.kind == kind]
    if spec is None:
        raise CheckpointError(
            f"{name!r} is neither an existing path nor a known {kind} checkpoint name; "
            f"known {kind} names: {', '.join(known)}"
        )
    if spec.kind != kind:
        raise CheckpointError(
            f"{name!r} is a {spec.kind} checkpoint, not a {kind} one; known {kind} names: {', '.join(known)}"
        )
    if is_cached(name):
        return weight_path(name)
    if not allow_download:
        raise CheckpointError(_missing_message(spec, "downloading was not allowed"))
    return download(name, on_event=on_event)


# --- Weights on the node that uses them -------------------------------------------------------------------------
#
# A job's driver does not hand its own paths to workers on other machines: it sends ``WeightRef``s (a registry
# name with the files its registry records, or a path, with the sha256 of a file that must be the very one the
# driver read), and each worker turns them into paths on its own node (``locate``): names in that node's cache
# (``$OMNILABEL_CACHE`` there), downloading only where that node allows it; paths checked to exist there.


@dataclass(frozen=True)
class WeightRef:
    """A model as the driver names it, for a worker to find on its own node. Plain data (it pickles).

    Attributes:
        kind: what it is (``sam``, ``gdino``, ``clip``, ``resnet``, ``dinov2``, or ``teacher`` for a fine-tuned
            teacher file); for messages and for a name's registry kind.
        source: a registry name, or an absolute path to a file or folder.
        is_name: whether ``source`` is a registry name.
        files: for a name, ``(filename, sha256 or None)`` of each file in the driver's registry: a worker whose
            omnilabel records the name differently refuses it rather than load other weights.
        sha256: for a path that must be the very file the driver read (a teacher file, a student checkpoint),
            its sha256; None: presence is checked only.
    """

    kind: str
    source: str
    is_name: bool = False
    files: tuple[tuple[str, str | None], ...] = ()
    sha256: str | None = None


def node_name() -> str:
    """This machine's host name, as errors from a worker name its node."""
    return socket.gethostname()


def weight_ref(name_or_path: str | os.PathLike[str], *, kind: str, sha256: str | None = None) -> WeightRef:
    """What a driver sends for a checkpoint argument (nothing is downloaded or read here).

    An existing path becomes an absolute path; a registry name of ``kind`` stays a name (with the files and
    checksums of this registry); anything else that looks like a path (a separator, a suffix) is kept as a
    path that only the workers' nodes may have (a driver on a laptop, weights on the cluster's storage).

    Args:
        name_or_path: a path or a registry name.
        kind: the model family expected (a registry kind, or ``teacher``).
        sha256: the sha256 the file at a path must have on every node (None: not checked).

    Raises:
        CheckpointError: neither a path nor a known name of this kind.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        return WeightRef(kind, str(path.resolve()), sha256=sha256)
    spec = REGISTRY.get(text)
    if spec is not None and spec.kind == kind:
        return WeightRef(kind, text, is_name=True, files=tuple((wf.filename, wf.sha256) for wf in spec.files))
    if os.sep in text or "/" in text or path.suffix:
        return WeightRef(kind, str(path.absolute()), sha256=sha256)
    # Not a path: the errors of ``resolve`` (unknown name, or a name of another kind).
    resolve(text, kind=kind, allow_download=False)  # type: ignore[arg-type]
    raise AssertionError("unreachable: resolve raises for a missing path that is not a name of this kind")


def locate(ref: WeightRef, *, allow_download: bool = True, on_event: OnEvent | None = None) -> Path:
    """Where ``ref`` is on this node: a name in this node's cache (downloaded first where allowed and
    missing), or its path, checked to exist (and to have the driver's sha256 when the ref has one).

    Raises:
        CheckpointError: the name is recorded differently here than on the driver; it is missing here and
            cannot be downloaded; the path is missing here or is another file than the driver's. Each message
            names this node and what to do (storage every node sees, or ``weights download`` on every node).
    """
    node = node_name()
    if ref.is_name:
        spec = REGISTRY.get(ref.source)
        here = tuple((wf.filename, wf.sha256) for wf in spec.files) if spec is not None else None
        if here != ref.files:
            raise CheckpointError(
                f"node {node}: checkpoint {ref.source!r} is not the same here as on the driver (this node's "
                f"omnilabel {'does not know it' if here is None else 'records other files for it'}); install "
                "the same omnilabel version on every node")
        if is_cached(ref.source):
            return weight_path(ref.source)
        if not allow_download or offline():
            reason = "downloads are disabled there" + (f" ({OFFLINE_ENV} is set)" if offline() else "")
            raise CheckpointError(f"node {node}: " + _missing_message(_spec(ref.source), reason) + (
                f"\nOn a cluster: run `omnilabel weights download {ref.source}` on every node, or set "
                f"{CACHE_ENV} to a folder every node sees."))
        try:
            return download(ref.source, on_event=on_event)
        except CheckpointError as exc:
            raise CheckpointError(f"node {node}: {exc}") from exc
    path = Path(ref.source)
    if not path.exists():
        raise CheckpointError(
            f"node {node}: {ref.kind} {path} does not exist on this node. Every node must see the same file at "
            "the same path: put it on storage all nodes mount, or copy it to that path on every node")
    if ref.sha256 is not None:
        if file_sha256(path) != ref.sha256:
            raise CheckpointError(
                f"node {node}: {ref.kind} {path} is not the file the driver read (sha256 differs); every node "
                "must see the same file at that path")
    return path
