#!/usr/bin/env bash
# One node: torchrun over the GPUs this shell may use, or CPU processes (gloo) on a host without.
#   bash launch/train.sh configs/cifar10.yaml [key=value ...]
#   NPROC=2 bash launch/train.sh configs/cifar10.yaml      # two processes (GPUs, or gloo on CPU)
# GPUs: CUDA_VISIBLE_DEVICES when it is set (what a scheduler or the user granted; empty = none),
# else the lines of `nvidia-smi -L`; no nvidia-smi, or one that fails (no driver), means a CPU host:
# one process unless NPROC says more. Each process gets its share of the cores as OMP_NUM_THREADS
# (unless set). SCP_DRY_RUN=1 prints the torchrun command instead of running it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: bash launch/train.sh CONFIG [key=value ...]" >&2; exit 2; }
config="$1"; shift
gpus=0
if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
  case "$CUDA_VISIBLE_DEVICES" in
    "" | -1 | NoDevFiles) gpus=0 ;;
    *) gpus=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .) ;;
  esac
elif command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ') || gpus=0
fi
if [ "$gpus" -gt 0 ]; then nproc_default=$gpus; else nproc_default=1; fi
NPROC="${NPROC:-$nproc_default}"
threads=$(($(nproc) / NPROC))
[ "$threads" -ge 1 ] || threads=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$threads}"
echo "[train.sh] $NPROC process(es) ($gpus GPU(s) visible), OMP_NUM_THREADS=$OMP_NUM_THREADS" >&2
cmd=(.venv/bin/torchrun --standalone --nproc_per_node "$NPROC" -m scp_dist.train --config "$config" "$@")
if [ "${SCP_DRY_RUN:-0}" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
exec "${cmd[@]}"
