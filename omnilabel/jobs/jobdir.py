"""The job directory: what makes every per-image job resumable.

Layout::

    JOB_DIR/
      manifest.json          input hash, settings, model ids, shard plan (written once)
      shards/00000.jsonl     one line per image of a finished shard (written atomically)

A shard file exists only when the whole shard is finished (temp file + rename), so a killed job leaves
either a complete shard or none. A rerun with the same manifest skips finished shards; a rerun with a
different one refuses unless asked to overwrite.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omnilabel.errors import JobError
from omnilabel.io import write_json_atomic, write_jsonl_atomic

MANIFEST = "manifest.json"
SHARDS = "shards"


class JobDir:
    """One job's directory.

    Args:
        path: the directory (created if missing).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def shard_dir(self) -> Path:
        return self.path / SHARDS

    def shard_path(self, index: int) -> Path:
        return self.shard_dir / f"{index:05d}.jsonl"

    def open(self, manifest: dict[str, Any], *, overwrite: bool = False) -> None:
        """Start or resume: write the manifest, or check it equals the one already there.

        Raises:
            JobError: the directory holds a different job and ``overwrite`` is False.
        """
        existing = self.path / MANIFEST
        if existing.exists():
            try:
                old = json.loads(existing.read_text())
            except (OSError, json.JSONDecodeError):
                old = None
            if old != json.loads(json.dumps(manifest)):
                if not overwrite:
                    changed = sorted(k for k in set(manifest) | set(old or {})
                                     if (old or {}).get(k) != json.loads(json.dumps(manifest)).get(k))
                    raise JobError(f"job directory {self.path} holds a different job (differs in: "
                                   f"{', '.join(changed) or 'manifest'}); pass --overwrite to start it again, "
                                   "or choose another --job-dir")
                shutil.rmtree(self.shard_dir, ignore_errors=True)
            else:
                self.shard_dir.mkdir(parents=True, exist_ok=True)
                return
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(manifest, existing)

    def finished(self, n_shards: int) -> set[int]:
        """Indices of the shards already written."""
        return {i for i in range(n_shards) if self.shard_path(i).exists()}

    def write_shard(self, index: int, records: list[dict[str, Any]]) -> None:
        """Write one finished shard atomically: one JSON line per image record."""
        write_jsonl_atomic(records, self.shard_path(index))

    def read_shard(self, index: int) -> Iterator[dict[str, Any]]:
        """The image records of one finished shard, in order."""
        with open(self.shard_path(index)) as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)
