"""Drive the command line from tests: in this process (exit code, stdout, stderr), or as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

from omnilabel.cli import main


def run_in_process(capsys, *argv) -> tuple[int, str, str]:
    """``omnilabel ARGV`` through ``main``, as the console script runs it; returns (exit code, out, err)."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def run_ok(*argv) -> None:
    """``omnilabel ARGV`` through ``main`` in this process, output left to the caller's streams; it must succeed
    (for fixtures that build inputs and need no captured output)."""
    try:
        main([str(a) for a in argv])
    except SystemExit as exc:
        assert not exc.code, argv


def run_subprocess(*argv) -> subprocess.CompletedProcess:
    """``python -m omnilabel.cli ARGV`` in a fresh process (what a killed or parallel job needs)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "omnilabel.cli", *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=600)
