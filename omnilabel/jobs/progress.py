"""What a job shows a person: one progress bar for the whole job, and the closing summary tables."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


@contextlib.contextmanager
def progress_bar(label: str, console: Console) -> Iterator[Callable[[int, int], None]]:
    """A rich bar (images done / total, images/s, elapsed, ETA); yields ``on_progress(done, total)``."""
    progress = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
                        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=console, transient=False)
    task = progress.add_task(label, total=None, rate="")
    start: dict[str, float] = {}

    def on_progress(done: int, total: int) -> None:
        now = time.perf_counter()
        start.setdefault("t", now)
        start.setdefault("n", done)  # images resumed from earlier runs do not count towards the rate
        rate = (done - start["n"]) / (now - start["t"]) if now > start["t"] else 0.0
        progress.update(task, completed=done, total=total, rate=f"{rate:.2f} img/s" if rate else "")

    with progress:
        yield on_progress


def summary_tables(summary: dict[str, Any]) -> list[Table]:
    """The closing tables of a pseudomask job (``run_pseudomask``'s summary)."""
    table = Table(title=f"wrote {summary['output']}")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("images", str(summary["images"]))
    if summary["skipped_shards"]:
        table.add_row("shards resumed (not recomputed)", str(summary["skipped_shards"]))
    for key in ("gt", "points", "boxes", "tags", "none"):
        if summary["counts"].get(key):
            label = "GT masks passed through" if key == "gt" else f"pseudomasks from {key}"
            table.add_row(label, str(summary["counts"][key]))
    table.add_row("empty masks dropped", str(summary["counts"].get("empty", 0)))
    failed = str(summary["errors"]) + (f" (see {summary['errors_path']})" if summary["errors"] else "")
    table.add_row("images that failed", failed)
    n = max(summary["images"] - summary["errors"], 1)
    stages = Table(title="seconds per image, by stage")
    for stage in summary["seconds"]:
        stages.add_column(stage, justify="right")
    stages.add_column("wall (this run)", justify="right")
    stages.add_row(*(f"{v / n:.3f}" for v in summary["seconds"].values()), f"{summary['wall_s']:.1f} s")
    return [table, stages]
