#!/usr/bin/env bash
# GPU throughput of `omnilabel pseudomask` (bench/gpu.py): prints it and records it in BENCHMARKS.md.
# Needs one CUDA GPU; builds random-weight SAMs offline, downloads nothing; about 5 minutes.
# Extra arguments go to bench/gpu.py (e.g. --models vit_b --seconds 10).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
elif command -v python >/dev/null 2>&1; then
    PY=python
else
    PY=python3
fi
# The repository root on the path, so that an uninstalled checkout runs too.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" bench/gpu.py --write "$@"
