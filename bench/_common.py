"""Helpers shared by the benchmark scripts: tables, the machine description, peak memory, BENCHMARKS.md.

Each script owns one section of ``BENCHMARKS.md``, delimited by ``<!-- bench:NAME -->`` and
``<!-- /bench:NAME -->``; ``write_section`` replaces that section (or appends it) and leaves the rest of the
file as it was, so scripts can be run in any order.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

#: ``BENCHMARKS.md`` at the repository root.
BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
_TITLE = ("# Benchmarks\n\nWritten by the scripts in `bench/`; each section is rewritten by the script "
          "named in it.\n")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; cells are ``str()``-ed, numbers right-aligned.

    Args:
        headers: column names.
        rows: one sequence per row, as long as ``headers``.

    Returns:
        The table, one line per row, without a trailing newline.
    """
    cells = [[str(c) for c in row] for row in rows]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, expected {len(headers)}: {row}")
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [bool(cells) and all(_looks_numeric(r[i]) for r in cells) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.rjust(w) if num else v.ljust(w)
                                 for v, w, num in zip(values, widths, numeric, strict=True)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2))
                          for w, num in zip(widths, numeric, strict=True)) + "|"
    return "\n".join([line(list(headers)), rule, *(line(r) for r in cells)])


def _looks_numeric(cell: str) -> bool:
    text = cell.strip().lstrip("×x").rstrip("×x%")
    if text in ("", "—", "-"):
        return True
    try:
        float(text)
    except ValueError:
        return False
    return True


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def usable_cores() -> int:
    """CPU cores this process may run on (the affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's marketing name, from ``/proc/cpuinfo`` on Linux, else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(*, threads: int, device: str) -> str:
    """One line describing where a benchmark ran: cores, CPU, torch version and threads, device."""
    import torch

    parts = [f"{usable_cores()} usable cores ({cpu_model()})", f"torch {torch.__version__}",
             f"torch threads {threads}", f"Python {platform.python_version()}", f"device {device}"]
    if device.startswith("cuda") and torch.cuda.is_available():
        parts[-1] += f" ({torch.cuda.get_device_name(0)})"
    return ", ".join(parts)


def command_line() -> str:
    """The command that ran this script, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        shown = script.relative_to(BENCHMARKS_MD.parent)
    except ValueError:
        shown = script
    return shlex.join(["python", str(shown), *sys.argv[1:]])


def today() -> str:
    """Local date, ISO format."""
    return _dt.date.today().isoformat()


def write_section(name: str, body: str, *, path: Path = BENCHMARKS_MD) -> Path:
    """Replace (or append) the section ``name`` of ``BENCHMARKS.md``, leaving the rest untouched.

    Args:
        name: section key; the markers are ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``.
        body: markdown between the markers (a heading included).
        path: the file; created with a title if missing.

    Returns:
        ``path``.
    """
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else _TITLE
    i, j = text.find(start), text.find(end)
    if i >= 0 and j > i:
        text = text[:i] + block + text[j + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    # Atomic: another script may be reading the file.
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False,
                                     prefix=".BENCHMARKS.", suffix=".tmp") as f:
        f.write(text)
    os.replace(f.name, path)
    return path


def omnilabel(*args: object) -> float:
    """Run one ``omnilabel`` command as a user would (its output to stderr); returns its wall seconds.

    Raises:
        subprocess.CalledProcessError: the command failed.
    """
    t0 = time.perf_counter()
    print("$ omnilabel " + " ".join(map(str, args)), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "omnilabel", *map(str, args)], check=True, stdout=sys.stderr)
    return time.perf_counter() - t0
