"""Files, the ground floor: atomic writes, JSON and JSON lines, ``torch.save``, sha256.

Everything omnilabel writes goes through :func:`atomic_path`: a reader sees a file's old content or its
complete new one, never a part, and a run that fails leaves no partial file behind. Nothing here knows COCO,
models or jobs; every other module may import this one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from omnilabel.errors import InputError

__all__ = ["JsonlFollower", "append_jsonl", "atomic_path", "dump_json", "file_sha256", "read_json",
           "save_torch_atomic", "text_sha256", "write_json_atomic", "write_jsonl_atomic"]

_BLOCK_BYTES = 1 << 20


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed.

    A reader of ``path`` sees its old content or the complete new one, never a part. The temporary name
    keeps ``path``'s suffix (``.x.png.<pid>.<hex>.tmp.png``) so writers that go by the suffix still work, and
    the file gets the umask's permissions (``open(..., "x")``, not ``mkstemp``'s 0600). Parent directories
    are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp{path.suffix}"
    try:
        with open(tmp, "x"):
            pass
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


_TO_JSON = ((np.bool_, bool), (np.integer, int), (np.floating, float), (np.ndarray, np.ndarray.tolist),
            (bytes, lambda b: b.decode("ascii")))  # bytes: compressed RLE counts as pycocotools returns them


def _json_default(obj: Any) -> Any:
    for kind, convert in _TO_JSON:
        if isinstance(obj, kind):
            return convert(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def dump_json(obj: Any) -> str:
    """Compact JSON (``separators=(",", ":")``), keys in insertion order, so one object always gives the same
    text. numpy scalars and arrays become numbers and lists, ``bytes`` (RLE counts) ASCII strings.

    Raises:
        TypeError: a value that cannot be serialized. ValueError: NaN or infinity (they are not JSON).
    """
    return json.dumps(obj, separators=(",", ":"), allow_nan=False, default=_json_default)


def write_json_atomic(obj: Any, path: str | Path) -> None:
    """Write ``dump_json(obj)`` so that ``path`` holds its old content or the complete new one, never a part.

    Raises:
        TypeError: ``obj`` holds a value that cannot be serialized (nothing is written).
        ValueError: ``obj`` holds NaN or infinity (nothing is written).
        OSError: the file cannot be written (nothing is left behind).
    """
    text = dump_json(obj)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_jsonl_atomic(records: Iterable[Any], path: str | Path) -> None:
    """Write one ``dump_json`` line per record, atomically (see ``write_json_atomic``)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(dump_json(rec))
            f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def append_jsonl(record: Any, path: str | Path) -> None:
    """Append one JSON line to ``path`` (a log: a reader may see the last line half-written, see
    ``JsonlFollower``)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(dump_json(record) + "\n")


def read_json(path: str | Path) -> Any:
    """Parse a JSON file.

    Raises:
        InputError: the file is missing or unreadable, or not JSON (the message gives line and column).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        msg = f"{path}: line {e.lineno} column {e.colno}: invalid JSON: {e.msg}"
        raise InputError(msg, [msg]) from None
    except (UnicodeDecodeError, RecursionError) as e:
        raise InputError(f"{path}: not a readable JSON file: {e}") from None


class JsonlFollower:
    """Reads the lines appended to a JSON-lines file since the follower was made (a log another process
    writes). A line still being written waits for the next read.

    Args:
        path: the file; it need not exist yet.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def read(self) -> list[Any]:
        """The complete lines appended since the last read, parsed."""
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]
        self.offset += len(complete)
        return [json.loads(line) for line in complete.decode("utf-8").splitlines() if line.strip()]


def save_torch_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename: a reader never sees half a file."""
    import torch

    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK_BYTES), b""):
            h.update(block)
    return h.hexdigest()


def text_sha256(text: str) -> str:
    """Hex sha256 of a string's UTF-8 bytes."""
    return hashlib.sha256(text.encode()).hexdigest()
