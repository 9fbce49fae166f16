#!/usr/bin/env bash
# The SLURM launcher behind slurm/imagenet.sh and slurm/scp.sbatch (those are #SBATCH lines that
# find the repository and call this). docs/OPERATIONS.md, "Slurm", says how to use them.
#
#   launch.sh job CONFIG [key=value ...]    the batch shell: one torchrun per node through srun,
#                                           the time-limit signal, the requeue
#   launch.sh node CONFIG [key=value ...]   each node (srun runs it): processes and threads from the
#                                           node's allocation, then torchrun
#
# Environment, all optional:
#   SCP_HOME               the repository (the sbatch scripts set it; relative paths in configs and
#                          overrides are relative to it, whatever the submit directory)
#   SCP_VENV               the virtual environment, on a file system every node sees (default $SCP_HOME/.venv)
#   SCP_RUN_NAME           output.run_name (default <job name>-<job id>: a requeue continues its run)
#   SCP_NPROC_PER_NODE     processes per node (default: the GPUs of the job's allocation on the node,
#                          or SCP_CPU_PROCS_PER_NODE gloo CPU processes, default 1, where it has none)
#   SCP_RDZV_PORT          the c10d rendezvous port on the first node (default 20000 + job id % 10000)
#   SCP_SHUTDOWN_TIMEOUT   seconds torchrun gives the other workers once one has exited (default 90)
#   SCP_EXIT_WAIT          seconds srun gives the other nodes once one node has finished (default 120)
#   SCP_DRY_RUN=1          each node prints its torchrun command instead of running it
set -euo pipefail

die() { echo "[scp] error: $*" >&2; exit 2; }

# The GPUs of this job on this node, from Slurm's allocation (never the node's: nvidia-smi lists
# every GPU of the machine, other jobs' included). Slurm sets CUDA_VISIBLE_DEVICES for a step that
# holds GPUs; a value inherited from the submitting shell is ignored when the job has none.
allocated_gpus() {
  local n=${SLURM_GPUS_ON_NODE:-} ids=${SLURM_STEP_GPUS:-${SLURM_JOB_GPUS:-}}
  if ! [[ $n =~ ^[0-9]+$ ]]; then
    n=0
    if [ -n "$ids" ]; then n=$(tr ',' '\n' <<<"$ids" | grep -c .); fi
  fi
  if [ "$n" -gt 0 ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "$CUDA_VISIBLE_DEVICES" != NoDevFiles ]; then
    n=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
  fi
  echo "$n"
}

# The smallest per-node CPU count of the job: SLURM_JOB_CPUS_PER_NODE looks like "32(x2),16".
min_job_cpus() {
  local min="" c
  for c in $(tr ',' ' ' <<<"${SLURM_JOB_CPUS_PER_NODE:-1}"); do
    c=${c%%(*}
    if [ -z "$min" ] || [ "$c" -lt "$min" ]; then min=$c; fi
  done
  echo "${min:-1}"
}

# shellcheck disable=SC2317  # run by the USR1 trap
on_usr1() {
  [ "$requeue" = 0 ] || return 0  # once per attempt
  requeue=1
  echo "[scp] $(date '+%F %T') USR1: time limit near, checkpointing at the current step"
  # every process of the job's steps (not this batch shell): the workers; torchrun ignores it
  scancel --signal=USR1 "$SLURM_JOB_ID" || echo "[scp] scancel --signal=USR1 failed" >&2
}

run_job() {
  local config=$1; shift
  [ -n "${SLURM_JOB_ID:-}" ] || die "submit with sbatch (e.g. sbatch --nodes 2 slurm/imagenet.sh); for one node use launch/train.sh"
  [ -x "$SCP_VENV/bin/python" ] || die "no Python at $SCP_VENV/bin/python: set SCP_VENV to a virtual environment every node can read"
  cd "$SCP_HOME"
  local nodes=$SLURM_JOB_NUM_NODES head port cpus
  head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  # Two jobs sharing a first node must not share a rendezvous store: the port comes from the job id.
  port=${SCP_RDZV_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
  cpus=${SLURM_CPUS_PER_TASK:-$(min_job_cpus)}
  export SCP_HOME SCP_VENV SCP_HEAD=$head SCP_PORT=$port
  export SCP_RUN_NAME=${SCP_RUN_NAME:-${SLURM_JOB_NAME:-scp}-$SLURM_JOB_ID}
  echo "[scp] $(date '+%F %T') job $SLURM_JOB_ID attempt $((${SLURM_RESTART_COUNT:-0} + 1)): $nodes node(s)" \
       "$SLURM_JOB_NODELIST, rendezvous $head:$port, run $SCP_RUN_NAME, config $config"

  # Slurm's warning before the time limit (#SBATCH --signal=B:USR1@SECS) reaches this shell only:
  # pass it to the steps' processes, whose ranks finish the current step together, write a
  # checkpoint at it and exit; then requeue the job, which continues from that step
  # (train.resume=auto). SIGTERM (scancel, preemption, the time limit itself, scontrol requeue)
  # reaches every process from Slurm directly: the workers checkpoint the same way; what happens
  # to the job is Slurm's decision, so this shell only keeps waiting.
  requeue=0
  trap on_usr1 USR1
  trap 'echo "[scp] $(date "+%F %T") SIGTERM: the workers checkpoint at the current step"' TERM
  # srun in the background: a shell runs its traps only between commands, and `wait` is one.
  # --wait, not --kill-on-bad-exit: after a signal the ranks on other nodes exit as soon as they
  # agree to stop, while rank 0 is still writing the checkpoint; srun gives the other nodes
  # SCP_EXIT_WAIT seconds after the first one ends before it terminates them (a crashed node does
  # not keep the job alive longer than that).
  srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --cpus-per-task="$cpus" \
    --kill-on-bad-exit=0 --wait="${SCP_EXIT_WAIT:-120}" \
    bash "$SCP_HOME/slurm/launch.sh" node "$config" "$@" &
  local pid=$! rc=0
  while :; do
    rc=0; wait "$pid" || rc=$?
    kill -0 "$pid" 2>/dev/null || break  # >128 with srun still running: a trap ran; wait again
  done
  rc=0; wait "$pid" || rc=$?  # srun's own status (bash keeps it), not a trap's
  if [ "$requeue" = 1 ] && [ "$rc" != 0 ]; then
    echo "[scp] $(date '+%F %T') requeueing job $SLURM_JOB_ID (srun exit $rc); it continues from the checkpoint"
    if scontrol requeue "$SLURM_JOB_ID"; then
      exit 0
    fi
    echo "[scp] scontrol requeue failed: resubmit with the same output.run_name (SCP_RUN_NAME=$SCP_RUN_NAME) to continue" >&2
    exit 75
  fi
  echo "[scp] $(date '+%F %T') job $SLURM_JOB_ID attempt $((${SLURM_RESTART_COUNT:-0} + 1)) ended: exit $rc"
  exit "$rc"
}

run_node() {
  local config=$1; shift
  local host gpus procs cpus threads kind
  host=$(hostname -s)
  gpus=$(allocated_gpus)
  local extra=()
  if [ -n "${SCP_NPROC_PER_NODE:-}" ]; then
    procs=$SCP_NPROC_PER_NODE
    kind=$([ "$gpus" -gt 0 ] && echo GPU || echo process)
  elif [ "$gpus" -gt 0 ]; then
    procs=$gpus kind="GPU (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset})"
  else
    procs=${SCP_CPU_PROCS_PER_NODE:-1} kind="CPU (gloo)"
    extra=(train.device=cpu dist.backend=gloo)  # no GPU of this job: never touch the node's
  fi
  [[ $procs =~ ^[1-9][0-9]*$ ]] || die "$host: processes per node must be a positive integer, got '$procs'"
  # One process per node used to run with every core's worth of threads per process and
  # oversubscribe: each process gets its share of the step's CPUs.
  cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-$(nproc)}}
  threads=$((cpus / procs))
  [ "$threads" -ge 1 ] || threads=1
  export OMP_NUM_THREADS=$threads
  # shellcheck disable=SC2054  # the commas are one argument: torchrun's list of signals
  local cmd=("$SCP_VENV/bin/python" -m torch.distributed.run
    --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node "$procs"
    --rdzv_backend c10d --rdzv_endpoint "$SCP_HEAD:$SCP_PORT" --rdzv_id "$SLURM_JOB_ID" --max_restarts 0
    --signals_to_handle SIGINT,SIGHUP,SIGQUIT --shutdown_timeout "${SCP_SHUTDOWN_TIMEOUT:-90}"
    "$SCP_HOME/slurm/worker.py" --config "$config" output.run_name="$SCP_RUN_NAME" train.resume=auto ${extra[@]+"${extra[@]}"} "$@")
  echo "[scp] $host: $procs $kind process(es), $cpus CPU(s), OMP_NUM_THREADS=$threads"
  if [ "${SCP_DRY_RUN:-0}" = 1 ]; then
    printf '[scp] %s: dry run:' "$host"; printf ' %q' "${cmd[@]}"; echo
    exit 0
  fi
  # Signals. Slurm sends USR1 and TERM (scancel --signal, preemption, scontrol requeue, the time
  # limit) to every process of the step, the workers included, so each worker gets exactly one from
  # Slurm. torchrun must neither forward them (a worker would get a second, which the trainer takes
  # as "exit now, without a checkpoint") nor die of USR1 (orphaning its workers): it runs with both
  # ignored, and slurm/worker.py gives the workers the default action back, then the trainer its
  # handlers (checkpoint at the current step, exit). A worker that did not exist yet when the signal
  # came (torchrun was starting) would never see it: this shell notes the signal in a file, and
  # worker.py exits at its start when the file is there.
  local tmp=${TMPDIR:-/tmp} f
  export SCP_STOP_FILE="$tmp/scp-stop.$SLURM_JOB_ID.${SLURM_RESTART_COUNT:-0}.$host.$$"
  for f in "$tmp/scp-stop.$SLURM_JOB_ID."*".$host".*; do rm -f "$f"; done  # a killed attempt's
  trap 'rm -f "$SCP_STOP_FILE"' EXIT
  trap 'touch "$SCP_STOP_FILE"' USR1 TERM
  (trap '' USR1 TERM && exec "${cmd[@]}") &
  local pid=$! rc=0
  while :; do
    rc=0; wait "$pid" || rc=$?
    kill -0 "$pid" 2>/dev/null || break  # a trap ran: wait again
  done
  rc=0; wait "$pid" || rc=$?
  exit "$rc"
}

SCP_HOME=${SCP_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
SCP_VENV=${SCP_VENV:-$SCP_HOME/.venv}
role=${1:-}
[ $# -ge 2 ] || die "usage: launch.sh job|node CONFIG [key=value ...]"
shift
case "$role" in
  job) run_job "$@" ;;
  node) run_node "$@" ;;
  *) die "usage: launch.sh job|node CONFIG [key=value ...]" ;;
esac
