#!/usr/bin/env bash
# One node: torchrun over all local GPUs (or N CPU processes with NPROC=N on a CPU host).
#   bash launch/train.sh configs/cifar10.yaml [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
config="$1"; shift
if command -v nvidia-smi >/dev/null 2>&1; then nproc_default=$(nvidia-smi -L | wc -l); else nproc_default=1; fi
NPROC="${NPROC:-$nproc_default}"
exec .venv/bin/torchrun --standalone --nproc_per_node "$NPROC" -m scp_dist.train --config "$config" "$@"
