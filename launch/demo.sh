#!/usr/bin/env bash
# The main job on the embedded dataset: install what is missing, then cluster scikit-learn's digits
# and print ACC/NMI/ARI for the SCP head and for k-means on the same features.
#   bash launch/demo.sh [--seeds 5] [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
# Its last lines name each run's report page (runs/<config>_seed<N>/report/index.html; output.report=true).
exec .venv/bin/python -m scp_dist.demo "$@"
