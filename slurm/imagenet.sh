#!/usr/bin/env bash
# ImageNet-1K (configs/imagenet1k.yaml) on a SLURM cluster: one torchrun per node, one process per
# GPU the job holds on that node (gloo CPU processes on a node without GPUs), requeued from its last
# step when the time limit comes. Partition, account, time, CPUs and GPUs: on the command line.
#   sbatch --nodes 4 --gpus-per-node 8 --cpus-per-task 64 --time 24:00:00 slurm/imagenet.sh [key=value ...]
# SCP_CONFIG=<config> runs another config through the same script. docs/OPERATIONS.md, "Slurm",
# says what the cluster must provide and how time limits, requeue and resume behave.
#SBATCH --job-name=scp-imagenet
#SBATCH --ntasks-per-node=1
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
set -euo pipefail
# sbatch runs a copy of this file from Slurm's spool directory, so $0 says nothing about where the
# repository is: SCP_HOME, else the path the job was submitted with (scontrol's Command=, relative
# to the submit directory).
if [ -z "${SCP_HOME:-}" ]; then
  script=$0
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    script=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n 1)
    case "$script" in /*) ;; *) script=${SLURM_SUBMIT_DIR:-.}/$script ;; esac
  fi
  SCP_HOME=$(cd "$(dirname "$script")/.." && pwd)
fi
export SCP_HOME
exec bash "$SCP_HOME/slurm/launch.sh" job "${SCP_CONFIG:-imagenet1k}" "$@"
