"""What the command line shows a person: progress bars driven by the library's events, and closing tables.

The only module that knows rich (with the commands that print through it). ``events(label)`` yields the
``on_event`` callback every long library call takes (``omnilabel.events``) and draws what arrives: a bar of
images for a job, a bar of steps with loss and learning rate for training, a bar of bytes for a download,
warnings and validation results as lines.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from omnilabel.events import OnEvent

#: Messages, bars and errors (stderr).
console = Console(stderr=True)
#: Results (stdout).
out = Console()

_TRAINING = ("start", "step", "epoch", "checkpoint", "done")


def error_line(message: str) -> Text:
    return Text("error: ", style="bold red") + Text(message)


class _EventDisplay:
    """Turns events into at most one live bar at a time (rich allows one), plus printed lines."""

    def __init__(self, label: str, con: Console) -> None:
        self.label, self.console = label, con
        self.bar: Progress | None = None
        self.kind: str | None = None
        self.tasks: dict[str, Any] = {}
        self.rate: dict[str, Any] = {}
        self.epochs: dict[str, int] = {}

    def _switch(self, kind: str) -> Progress:
        if self.kind == kind and self.bar is not None:
            return self.bar
        self.close()
        if kind == "progress":
            columns: tuple[Any, ...] = (
                TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[unit]}"),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn())
        elif kind == "download":
            columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                       TimeRemainingColumn())
        else:
            columns = (TextColumn(f"[bold]{self.label}[/]{{task.fields[epoch]}}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("steps  loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[rate]}"),
                       TimeElapsedColumn(), TimeRemainingColumn())
        self.bar = Progress(*columns, console=self.console, transient=False)
        self.bar.start()
        self.kind, self.tasks = kind, {}
        return self.bar

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        self.bar, self.kind = None, None

    def __call__(self, ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        if kind == "warning":
            self.console.print(f"[yellow]warning:[/] {ev['message']}", soft_wrap=True)
        elif kind == "progress":
            self._progress(ev)
        elif kind == "download":
            bar = self._switch("download")
            name = str(ev["file"])
            if name not in self.tasks:
                self.tasks[name] = bar.add_task(name, total=ev.get("total"))
            bar.update(self.tasks[name], completed=ev["done"], total=ev.get("total"))
        elif kind == "pairs":
            self.console.print(f"refiner training pairs: {ev['kept']} kept, {ev['dropped']} dropped "
                               f"(IoU of SAM's mask with the GT < {ev['min_iou']})")
        elif kind in _TRAINING:
            self._training(ev)
        elif kind == "losses":
            val = ev.get("val") or {}
            line = "  ".join(f"{name} {ev['train'][key]:.4f}" + (f" (val {val[key]:.4f})" if key in val else "")
                             for key, name in (("hpg", "HPG loss"), ("hdnet", "HDNet loss")))
            (self.bar.console if self.bar is not None else self.console).print(f"epoch {ev['epoch']}: {line}")

    def _progress(self, ev: dict[str, Any]) -> None:
        bar = self._switch("progress")
        now = time.perf_counter()
        if "job" in self.tasks and ev.get("unit", "") != self.rate.get("unit", ""):
            self.close()  # a new stage counts another unit: a bar of its own
            bar = self._switch("progress")
        if "job" not in self.tasks:
            self.rate["unit"] = ev.get("unit", "")
            self.tasks["job"] = bar.add_task(self.label, total=ev["total"], unit=ev.get("unit", ""), rate="")
            self.rate.update(t=now, n=ev["done"])  # work resumed from earlier runs does not count towards the rate
        elapsed = now - self.rate["t"]
        rate = (ev["done"] - self.rate["n"]) / elapsed if elapsed > 0 else 0.0
        bar.update(self.tasks["job"], completed=ev["done"], total=ev["total"],
                   rate=f"{rate:.2f} {ev.get('unit', '')}/s" if rate else "")

    def _training(self, ev: dict[str, Any]) -> None:
        kind = ev["event"]
        if kind == "start":
            bar = self._switch("training")
            self.epochs = {"per": int(ev.get("steps_per_epoch") or 0), "of": int(ev.get("epochs") or 0)}
            self.tasks["train"] = bar.add_task(self.label, total=ev["total_steps"], completed=ev["step"],
                                               epoch=self._epoch(ev["step"]), loss="-", lr="-", rate="")
            if ev.get("resumed_from"):
                bar.console.print(f"resumed from {ev['resumed_from']} (step {ev['step']})")
        elif kind == "step" and "train" in self.tasks and self.bar is not None:
            rate = f"{ev['images_per_s']:.1f} img/s" if ev.get("images_per_s") else ""
            self.bar.update(self.tasks["train"], completed=ev["step"], loss=f"{ev['loss']:.4f}",
                            lr=f"{ev['lr']:.2e}", rate=rate, epoch=self._epoch(ev["step"]))
        elif kind == "epoch" and ev.get("val"):
            val = ev["val"]
            best = "  (best)" if ev.get("best") else ""
            self.console.print(f"epoch {ev['epoch'] + 1}, step {ev['step']}: val AP {val['AP']:.3f}  "
                               f"AP50 {val['AP50']:.3f}  AP75 {val['AP75']:.3f}{best}")

    def _epoch(self, step: int) -> str:
        if not self.epochs.get("per"):
            return ""
        return f" epoch {min(step // self.epochs['per'] + 1, self.epochs['of'])}/{self.epochs['of']}"


@contextlib.contextmanager
def events(label: str, con: Console | None = None) -> Iterator[OnEvent]:
    """Yield an ``on_event`` callback that draws the events of one library call (see the module docstring)."""
    display = _EventDisplay(label, con or console)
    try:
        yield display
    finally:
        display.close()


def table(title: str, rows: list[tuple[str, str]], *, columns: tuple[str, str] = ("what", "value")) -> Table:
    """A two-column table (the second right-aligned)."""
    t = Table(title=title)
    t.add_column(columns[0])
    t.add_column(columns[1], justify="right", overflow="fold")
    for row in rows:
        t.add_row(*row)
    return t


def job_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The rows every per-image job's closing table ends with before its own: the shards a rerun resumed, and
    where the failed images are listed."""
    rows = []
    if summary["skipped_shards"]:
        rows.append(("shards resumed (not recomputed)", str(summary["skipped_shards"])))
    if summary["errors"]:
        rows.append(("failed images listed in", summary["errors_path"]))
    return rows


def pseudomask_tables(summary: dict[str, Any]) -> list[Table]:
    """The closing tables of a pseudomask job (``run_pseudomask``'s summary)."""
    rows = [("images", str(summary["images"]))]
    if summary["skipped_shards"]:
        rows.append(("shards resumed (not recomputed)", str(summary["skipped_shards"])))
    for key in ("gt", "points", "boxes", "tags", "none"):
        if summary["counts"].get(key):
            rows.append(("GT masks passed through" if key == "gt" else f"pseudomasks from {key}",
                         str(summary["counts"][key])))
    rows.append(("empty masks dropped", str(summary["counts"].get("empty", 0))))
    if summary["counts"].get("duplicate"):
        rows.append(("detections of annotated objects dropped", str(summary["counts"]["duplicate"])))
    if summary.get("left_out"):
        rows.append(("images left out (need a detector)", str(summary["left_out"])))
    failed = str(summary["errors"]) + (f" (see {summary['errors_path']})" if summary["errors"] else "")
    rows.append(("images that failed", failed))
    n = max(summary["images"] - summary["errors"], 1)
    stages = Table(title="seconds per image, by stage")
    for stage in summary["seconds"]:
        stages.add_column(stage, justify="right")
    stages.add_column("wall (this run)", justify="right")
    stages.add_row(*(f"{v / n:.3f}" for v in summary["seconds"].values()), f"{summary['wall_s']:.1f} s")
    return [table(f"wrote {summary['output']}", rows, columns=("what", "count")), stages]


def evaluate_tables(result: dict[str, Any], name: str) -> list[Table]:
    """The tables of ``evaluate`` (``omnilabel.eval.report.evaluate_files``' result)."""
    title = f"COCO segm AP{' (class-agnostic)' if result.get('class_agnostic') else ''} — {name}"
    if result["images"] != result["gt_images"]:
        title += f" (its {result['images']} of the GT's {result['gt_images']} images)"
    ap = Table(title=title)
    for key in result["segm"]:
        ap.add_column(key, justify="right")
    ap.add_row(*(f"{v:.3f}" for v in result["segm"].values()))
    tables = [ap]
    if "teacher" in result:
        t = Table(title="pseudomask quality against GT (by weak type)")
        for col in ("weak", "count", "mIoU", "boundary IoU"):
            t.add_column(col, justify="right" if col != "weak" else "left")
        for weak, row in result["teacher"].items():
            t.add_row(weak, str(row["count"]), f"{row['miou']:.3f}", f"{row['boundary_iou']:.3f}")
        tables.append(t)
    if "uois" in result:
        u = result["uois"]
        t = Table(title="UOIS (class-agnostic)",
                  caption=f"percent, per-image mean over {u['images']} images")
        for col in ("Overlap P/R/F", "Boundary P/R/F", "%75"):  # the cells of the UOIS papers' tables
            t.add_column(col, justify="right")
        t.add_row(*("/".join(f"{100 * u[group][k]:.1f}" for k in "PRF") for group in ("overlap", "boundary")),
                  f"{100 * u['f75']:.1f}")
        tables.append(t)
    return tables


def rank_table(rows: list[dict[str, Any]], *, title: str) -> Table:
    """The table of ``rank``: one row per ranked image (``omnilabel.eval.rank.RankedImage`` as a dict)."""
    t = Table(title=title)
    for col in ("rank", "image id"):
        t.add_column(col, justify="right")
    t.add_column("file_name", overflow="fold")
    for col in ("pseudomasks", "score", "worst annotation"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r["rank"]), str(r["image_id"]), r["file_name"], str(r["n_pseudo"]), f"{r['score']:.3f}",
                  str(r["worst_annotation_id"]))
    return t
