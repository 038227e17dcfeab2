"""Merge finished shards into one COCO file, streaming: memory holds one shard line at a time.

Annotation ids are assigned 1, 2, … in shard order, then image order, then the order the teacher gave,
so the merged file is identical however many workers made the shards.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omnilabel.io import atomic_path, dump_json
from omnilabel.jobs.jobdir import JobDir
from omnilabel.jobs.runner import check_not_all_failed


def write_errors(lines: list[str], path: str | Path | None) -> None:
    """Write the failed images' JSON lines to ``path``, or remove ``path`` when none failed."""
    if path is None:
        return
    path = Path(path)
    if lines:
        path.write_text("\n".join(lines) + "\n")
    else:
        path.unlink(missing_ok=True)


def finished_records(job: JobDir, n_shards: int, errors: list[str]) -> Iterator[dict[str, Any]]:
    """The records of shards ``0..n_shards-1`` in order, one line in memory at a time; a failed image's record is
    not yielded but appended to ``errors`` as the JSON line ``errors.jsonl`` holds (``write_errors``)."""
    for shard in range(n_shards):
        for rec in job.read_shard(shard):
            if rec.get("error"):
                errors.append(dump_json({k: rec.get(k) for k in ("image_id", "file_name", "error")}))
            else:
                yield rec


def merge_shards(job: JobDir, n_shards: int, *, header: dict[str, Any], output: str | Path,
                 errors_path: str | Path | None = None) -> dict[str, Any]:
    """Write ``header`` (every top-level key but ``annotations``) and all shards' annotations as COCO.

    Args:
        job: the job directory; every shard ``0..n_shards-1`` must be finished.
        n_shards: number of shards.
        header: COCO keys to write before the annotations (``images``, ``categories``, …).
        output: the COCO file to write (atomically: temp file + rename).
        errors_path: where to write one JSON line per image that failed (removed when there is none).

    Raises:
        JobError: every image failed; ``output`` is then not written (``errors_path`` is).

    Returns:
        Totals: ``counts`` (Counter per kind), ``seconds`` (Counter per stage), ``images`` done,
        ``errors`` (number of failed images), ``annotations`` written.
    """
    counts: Counter = Counter()
    seconds: Counter = Counter()
    n_images = n_errors = 0
    next_id = 1
    err_lines: list[str] = []
    with atomic_path(output) as tmp, open(tmp, "w") as f:
        f.write("{")
        for key, value in header.items():
            if key != "annotations":
                f.write(f"{dump_json(key)}:{dump_json(value)},")
        f.write('"annotations":[')
        first = True
        for rec in finished_records(job, n_shards, err_lines):
            n_images += 1
            counts.update(rec.get("counts", {}))
            seconds.update(rec.get("seconds", {}))
            for ann in rec["annotations"]:
                ann = {"id": next_id, "image_id": rec["image_id"], **ann}
                next_id += 1
                f.write(("" if first else ",") + dump_json(ann))
                first = False
        n_errors = len(err_lines)
        n_images += n_errors
        f.write("]}")
        f.flush()
        os.fsync(f.fileno())
        write_errors(err_lines, errors_path)
        check_not_all_failed(n_images, n_errors, errors_path=Path(errors_path or output))
    return {"counts": counts, "seconds": seconds, "images": n_images, "errors": n_errors,
            "annotations": next_id - 1}
