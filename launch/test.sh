#!/usr/bin/env bash
# Install what is missing, lint, then run the whole test suite (what CI runs). Arguments go to pytest:
# `bash launch/test.sh -m "not slow"` is the quick run; the kinds are markers too (pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
# Two cores shared by torch's intra-op pool and our multi-process tests: oversubscription made
# single forwards ~50x slower here, so each process gets one thread unless the caller says otherwise.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
.venv/bin/ruff check scp_dist tests launch benchmarks
exec .venv/bin/python -m pytest -q "$@"
