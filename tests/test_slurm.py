"""The SLURM path for real: `sbatch slurm/imagenet.sh` on a two-node Slurm 22.05 cluster that the
tests start (tests/slurm_cluster.py: network namespaces, one slurmd each), the time-limit signal and
requeue, `scontrol requeue`, two torchrun agents in two namespaces without Slurm, and how the
launchers count processes (CPU-only allocations, GPU allocations, a fake nvidia-smi).

The cluster tests need root and Debian's `slurmctld slurmd slurm-client munge` (.ci/run installs
them) and skip with the reason elsewhere; `-m slurm` selects them, `-m "not slurm"` leaves them out.
Every job is the demo config (raw-pixel digits, 2 epochs of 14 global batches of 128) on two
nodes of one gloo process each; data.order=global makes it the same run as one process."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, head_params, overrides, run_cli
from tests.slurm_cluster import FINAL, SlurmCluster, unavailable

IMAGENET_SH = REPO / "slurm" / "imagenet.sh"
# The jobs run the interpreter running the tests (launch.sh runs $SCP_VENV/bin/python), not REPO/.venv's.
VENV = Path(sys.executable).parent.parent
STEPS_PER_EPOCH = 1797 // 128


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slurm")


@pytest.fixture(scope="module")
def cluster():
    reason = unavailable()
    if reason:
        pytest.skip(f"no test Slurm cluster on this machine: {reason}")
    with SlurmCluster() as c:
        yield c


@pytest.fixture(scope="module")
def args(work, digits_root) -> list[str]:
    # lr 5e-4 as in tests/test_world_size.py: Adam turns rounding into visible steps at 1e-3. A
    # checkpoint at every epoch end: the requeue tests stop a job after its first epoch's checkpoint.
    return overrides(work, digits_root, **{"train.global_batch": 128, "optim.lr": 5e-4, "output.kmeans": "false",
                                           "train.checkpoint_min_seconds": 0})


def _submit(cluster: SlurmCluster, work: Path, args: list[str], *sbatch: str, script: Path | str = IMAGENET_SH,
            env: dict | None = None) -> int:
    """sbatch from a directory that is not the repository, with OMP_NUM_THREADS unset (the script
    must set it) and the demo config in place of ImageNet's."""
    submit = work / "submit"
    submit.mkdir(exist_ok=True)
    (work / "tmp").mkdir(exist_ok=True)
    base = {k: v for k, v in cluster.env.items() if k not in ("OMP_NUM_THREADS", "SCP_HOME")}
    return cluster.sbatch(*sbatch, str(script), *args, cwd=submit, inherit=False,
                          env={**base, "SCP_CONFIG": "demo_digits", "SCP_VENV": str(VENV), "TMPDIR": str(work / "tmp"),
                               **(env or {})})


def _log(work: Path, job: int) -> str:
    return (work / "submit" / f"slurm-scp-imagenet-{job}.out").read_text()


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line being written
            out.append(json.loads(line))
    return out


def _step_losses(run: Path) -> list[float]:
    """The loss of every step; a resumed run logs some steps twice: the last record counts."""
    by_step = {r["step"]: r["loss"] for r in _records(run) if r["kind"] == "step"}
    return [by_step[s] for s in sorted(by_step)]


def _scores(run: Path) -> dict:
    return json.loads((run / "eval.json").read_text())["splits"]["train"]["scores"]


def _assert_same_run(run: Path, ref: Path, exact: bool) -> None:
    losses, ref_losses = _step_losses(run), _step_losses(ref)
    assert len(losses) == len(ref_losses) == 2 * STEPS_PER_EPOCH
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=0)
    assert _scores(run)["acc"] == pytest.approx(_scores(ref)["acc"], abs=1e-9)
    assert _scores(run)["nmi"] == pytest.approx(_scores(ref)["nmi"], abs=1e-6)
    if exact:  # same world size, resumed from a checkpoint: the same head, not just close
        heads, ref_heads = head_params(run), head_params(ref)
        for k in ref_heads:
            torch.testing.assert_close(heads[k], ref_heads[k], rtol=1e-6, atol=1e-7, msg=k)


def _wait_for(cond, timeout: float, what: str, cluster: SlurmCluster, job: int) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise TimeoutError(f"{what}: {cluster.job(job)}\n{cluster.logs()}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def reference(work, args) -> Path:
    """The same config as one process, no Slurm."""
    run_cli(["--config", "demo_digits", *args, "output.run_name=one"])
    return work / "runs" / "one"


@pytest.fixture(scope="module")
def two_nodes(cluster, work, args) -> tuple[int, Path, float]:
    """`sbatch --nodes 2 slurm/imagenet.sh`, uninterrupted: the job id, its run, its wall time."""
    t0 = time.monotonic()
    job = _submit(cluster, work, args, "--nodes", "2")
    state = cluster.wait_done(job)
    took = time.monotonic() - t0
    assert state["JobState"] == "COMPLETED", f"{state}\n{_log(work, job)}"
    return job, work / "runs" / f"scp-imagenet-{job}", took


@pytest.mark.slurm
@pytest.mark.slow
def test_imagenet_sh_on_two_nodes_equals_one_process(two_nodes, reference, work):
    job, run, took = two_nodes
    log = _log(work, job)
    print(f"2-node job {job}: {took:.1f} s")
    # one gloo process per node, its thread count set by the script (the submit shell had none)
    for node in ("node1", "node2"):
        assert f"{node}: 1 CPU (gloo) process(es), 1 CPU(s), OMP_NUM_THREADS=1" in log, log
    first = next(r for r in _records(run) if r["kind"] == "start")
    assert first["world_size"] == 2
    _assert_same_run(run, reference, exact=False)


@pytest.mark.slurm
@pytest.mark.slow
def test_time_limit_signal_checkpoints_requeues_and_continues(cluster, work, args, two_nodes):
    """What Slurm does before the time limit (#SBATCH --signal=B:USR1@300: USR1 to the batch shell
    only), sent mid-epoch: the ranks stop after the same step, rank 0 checkpoints it, the script
    requeues the job, and the job finishes with the head of an uninterrupted job."""
    t0 = time.monotonic()
    job = _submit(cluster, work, args, "--nodes", "2")
    run = work / "runs" / f"scp-imagenet-{job}"
    _wait_for(lambda: any(r["kind"] == "step" and r["step"] >= 3 for r in _records(run)), 120,
              "step 3", cluster, job)
    cluster.run("scancel", "--batch", "--signal=USR1", str(job))
    state = cluster.wait_done(job)
    print(f"signalled and requeued job {job}: {time.monotonic() - t0:.1f} s")
    log = _log(work, job)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", f"{state}\n{log}"
    stopped = [r for r in _records(run) if r["kind"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["signal"] == 10, stopped
    assert 3 <= stopped[0]["step"] < 2 * STEPS_PER_EPOCH
    resumed = [r for r in _records(run) if r["kind"] == "resume"]
    assert [r["step"] for r in resumed] == [stopped[0]["step"]]
    # one log for both attempts (--open-mode=append), the requeue said in it
    assert "attempt 1:" in log and "attempt 2:" in log and "requeueing job" in log, log
    _assert_same_run(run, two_nodes[1], exact=True)


@pytest.mark.slurm
@pytest.mark.slow
def test_a_real_time_limit_signals_the_script(cluster, work, args):
    """Slurm's own timer, not the test, sends the warning: a long job (100 epochs) is given a
    one-minute limit once it trains, so its USR1@58 is due at once and comes with slurmctld's next
    time-limit check (every 30 s). The job checkpoints at the current step and requeues itself;
    the test then cancels it (resuming from such a checkpoint is the test above)."""
    t0 = time.monotonic()
    long = [a for a in args if not a.startswith("train.epochs=")] + ["train.epochs=100"]
    job = _submit(cluster, work, long, "--nodes", "2", "--time=10", "--signal=B:USR1@58")
    run = work / "runs" / f"scp-imagenet-{job}"
    _wait_for(lambda: any(r["kind"] == "step" for r in _records(run)), 120, "the first step", cluster, job)
    cluster.scontrol("update", f"JobId={job}", "TimeLimit=1")
    state = cluster.wait_job(job, lambda j: j["Restarts"] == "1" or j["JobState"] in FINAL, timeout=120)
    print(f"time-limit job {job}: requeued after {time.monotonic() - t0:.1f} s")
    cluster.run("scancel", str(job))
    log = _log(work, job)
    assert state["Restarts"] == "1", f"{state}\n{log}"
    assert "USR1: time limit near" in log and "requeueing job" in log, log
    stopped = [r for r in _records(run) if r["kind"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["signal"] == 10 and stopped[0]["step"] >= 1, f"{stopped}\n{log}"
    from scp_dist.checkpoint import list_checkpoints

    assert list_checkpoints(run)[-1].name == f"step-{stopped[0]['step']:09d}.pt"


@pytest.mark.slurm
@pytest.mark.slow
def test_scontrol_requeue_before_and_after_the_first_checkpoint(cluster, work, args, two_nodes):
    """`scontrol requeue` (what an admin or a preemption does) while the trainer prepares, before
    any checkpoint: the job starts again from the beginning (it used to fail: "train.resume=true
    but there is no checkpoint"); then after the first epoch's checkpoint: SIGTERM, a checkpoint at
    the current step, and the job continues from it to the uninterrupted job's result."""
    from scp_dist.checkpoint import list_checkpoints

    t0 = time.monotonic()
    job = _submit(cluster, work, args, "--nodes", "2")
    run = work / "runs" / f"scp-imagenet-{job}"
    # config.yaml: the trainer has its signal handlers and has not reached its first step
    _wait_for(lambda: (run / "config.yaml").exists(), 120, "the trainer's start", cluster, job)
    assert not list_checkpoints(run)
    cluster.scontrol("requeue", str(job))
    cluster.wait_job(job, lambda j: j["JobState"] == "RUNNING" and j["Restarts"] == "1")
    assert not list_checkpoints(run), "attempt 1 was to be stopped before its first checkpoint"
    _wait_for(lambda: len(list_checkpoints(run)) >= 1, 120, "the first checkpoint", cluster, job)
    cluster.scontrol("requeue", str(job))
    state = cluster.wait_done(job)
    print(f"job {job} requeued twice: {time.monotonic() - t0:.1f} s")
    log = _log(work, job)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "2", f"{state}\n{log}"
    records = _records(run)
    marks = [(r["kind"], r["step"], r.get("signal")) for r in records if r["kind"] in ("start", "resume", "stopped")]
    # attempt 2 starts at step 0 (nothing to resume), is stopped by SIGTERM after the first
    # checkpoint and writes one at that step; attempt 3 resumes there
    assert len(marks) == 3 and marks[0] == ("start", 0, None), f"{marks}\n{log}"
    assert marks[1][:1] == ("stopped",) and marks[1][1] >= STEPS_PER_EPOCH and marks[1][2] == 15, f"{marks}\n{log}"
    assert marks[2] == ("resume", marks[1][1], None), f"{marks}\n{log}"
    assert "train.resume=true but" not in log
    _assert_same_run(run, two_nodes[1], exact=True)


@pytest.mark.slurm
@pytest.mark.slow
def test_two_torchrun_agents_in_two_namespaces(cluster, work, args, reference):
    """Multi-node torchrun without Slurm: one agent per "machine" (--nnodes 2, c10d rendezvous on
    the first), each in its own network namespace with its own hostname."""
    port = 29411
    procs = {}
    t0 = time.monotonic()
    for node in ("node1", "node2"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"node1:{port}", "--rdzv_id", "agents",
               "-m", "scp_dist.train", "--config", "demo_digits", *args, "output.run_name=agents"]
        procs[node] = subprocess.Popen(cluster.nodes.wrap(node, cmd), cwd=REPO, text=True,
                                       env={**os.environ, "OMP_NUM_THREADS": "1"},
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    outs = {node: p.communicate(timeout=300)[0] for node, p in procs.items()}
    print(f"two agents: {time.monotonic() - t0:.1f} s")
    for node, p in procs.items():
        assert p.returncode == 0, f"{node}: rc={p.returncode}\n{outs[node][-4000:]}"
    _assert_same_run(work / "runs" / "agents", reference, exact=False)


def _dry_run(cluster: SlurmCluster, work: Path, *sbatch: str, env: dict | None = None,
             script: Path | str = IMAGENET_SH) -> tuple[int, str]:
    job = _submit(cluster, work, ["train.epochs=1"], *sbatch, script=script, env={"SCP_DRY_RUN": "1", **(env or {})})
    state = cluster.wait_done(job, timeout=60)
    log = _log(work, job)
    assert state["JobState"] == "COMPLETED", f"{state}\n{log}"
    return job, log


@pytest.fixture(scope="module")
def fake_nvidia_smi(work) -> Path:
    """An nvidia-smi that lists 8 GPUs: the node's, not the job's; the scripts must not count them."""
    d = work / "fakebin"
    d.mkdir(exist_ok=True)
    smi = d / "nvidia-smi"
    smi.write_text("#!/bin/sh\nfor i in 0 1 2 3 4 5 6 7; do echo \"GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-$i)\"; done\n")
    smi.chmod(0o755)
    return d


@pytest.mark.slurm
@pytest.mark.slow
def test_cpu_only_allocation_runs_gloo_processes(cluster, work, fake_nvidia_smi):
    """No GPU in the allocation: CPU processes with gloo, threads = CPUs per process, whatever
    nvidia-smi or an inherited CUDA_VISIBLE_DEVICES say. Submitted by a relative path from
    elsewhere (the script finds the repository itself), the port from the job id."""
    env = {"PATH": f"{fake_nvidia_smi}:{os.environ['PATH']}", "CUDA_VISIBLE_DEVICES": "0,1,2,3",
           "SCP_CPU_PROCS_PER_NODE": "2"}
    rel = os.path.relpath(IMAGENET_SH, work / "submit")
    job, log = _dry_run(cluster, work, "--nodes", "2", "--cpus-per-task", "2", env=env, script=rel)
    for node in ("node1", "node2"):
        assert f"{node}: 2 CPU (gloo) process(es), 2 CPU(s), OMP_NUM_THREADS=1" in log, log
    lines = [x for x in log.splitlines() if "dry run:" in x]
    assert len(lines) == 2
    for line in lines:
        assert "--nnodes 2 --nproc_per_node 2" in line and "--signals_to_handle SIGINT\\,SIGHUP\\,SIGQUIT" in line and "train.device=cpu dist.backend=gloo" in line
        assert f"--rdzv_endpoint node1:{20000 + job % 10000} --rdzv_id {job}" in line
        assert f"slurm/worker.py --config demo_digits output.run_name=scp-imagenet-{job} train.resume=auto" in line
        assert line.rstrip().endswith("train.epochs=1") and f"{VENV}/bin/python" in line
    # one process per node gets both CPUs
    _, log = _dry_run(cluster, work, "--nodes", "2", "--cpus-per-task", "2", env={"CUDA_VISIBLE_DEVICES": "0"})
    assert log.count("1 CPU (gloo) process(es), 2 CPU(s), OMP_NUM_THREADS=2") == 2, log


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("gpus", [1, 2])
def test_gpu_count_comes_from_the_allocation(cluster, work, fake_nvidia_smi, gpus):
    """One process per GPU the job holds on the node (fake GPUs: gres.conf over device files without a driver), not
    per GPU nvidia-smi lists (8), and SCP_HOME in place of the submitted path."""
    env = {"PATH": f"{fake_nvidia_smi}:{os.environ['PATH']}", "SCP_HOME": str(REPO)}
    _, log = _dry_run(cluster, work, "--nodes", "2", f"--gpus-per-node={gpus}", "--cpus-per-task", "2", env=env)
    visible = ",".join(str(i) for i in range(gpus))
    for node in ("node1", "node2"):
        assert (f"{node}: {gpus} GPU (CUDA_VISIBLE_DEVICES={visible}) process(es), 2 CPU(s), "
                f"OMP_NUM_THREADS={2 // gpus}") in log, log
    lines = [x for x in log.splitlines() if "dry run:" in x]
    assert len(lines) == 2 and all(f"--nproc_per_node {gpus} " in x and "train.device=cpu" not in x for x in lines)


@pytest.mark.slurm
@pytest.mark.slow
def test_generic_script_takes_the_config_first(cluster, work):
    """slurm/scp.sbatch is the same launcher for any config (imagenet.sh is it for imagenet1k)."""
    env = {"SCP_DRY_RUN": "1"}
    job = _submit(cluster, work, ["configs/demo_digits.yaml", "train.epochs=1"], "--nodes", "2",
                  script=REPO / "slurm" / "scp.sbatch", env=env)
    state = cluster.wait_done(job, timeout=60)
    log = (work / "submit" / f"slurm-scp-{job}.out").read_text()
    assert state["JobState"] == "COMPLETED", log
    assert log.count("--config configs/demo_digits.yaml output.run_name=scp-") == 2, log
    job = _submit(cluster, work, [], "--nodes", "1", script=REPO / "slurm" / "scp.sbatch", env=env)
    state = cluster.wait_done(job, timeout=60)
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "2:0"
    assert "usage: sbatch" in (work / "submit" / f"slurm-scp-{job}.out").read_text()


# -- launch/train.sh (one node, no Slurm): GPUs from CUDA_VISIBLE_DEVICES or nvidia-smi -------------

def _train_sh(path_dir: Path | None, **env: str) -> tuple[int, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "NPROC", "OMP_NUM_THREADS")}
    e["PATH"] = f"{path_dir}:/usr/bin:/bin" if path_dir else "/usr/bin:/bin"
    e.update(env, SCP_DRY_RUN="1")
    p = subprocess.run(["bash", str(REPO / "launch" / "train.sh"), "demo_digits", "train.epochs=1"], env=e,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    nproc = p.stdout.split("--nproc_per_node ")[1].split()[0]
    return int(nproc), p.stderr


@pytest.fixture
def failing_nvidia_smi(tmp_path) -> Path:
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA "
                   "driver.'\nexit 9\n")
    smi.chmod(0o755)
    return tmp_path


@pytest.mark.multiprocess
def test_train_sh_counts_visible_gpus(fake_nvidia_smi):
    assert _train_sh(fake_nvidia_smi)[0] == 8
    assert _train_sh(fake_nvidia_smi, CUDA_VISIBLE_DEVICES="1,3")[0] == 2  # what we were given, not the node
    assert _train_sh(fake_nvidia_smi, CUDA_VISIBLE_DEVICES="")[0] == 1  # none given: one CPU process
    assert _train_sh(fake_nvidia_smi, NPROC="3")[0] == 3


@pytest.mark.multiprocess
def test_train_sh_runs_on_cpu_without_a_working_nvidia_smi(failing_nvidia_smi):
    nproc, err = _train_sh(failing_nvidia_smi)  # used to exit here (set -e, pipefail)
    assert nproc == 1 and "0 GPU(s) visible" in err
    assert _train_sh(None)[0] == 1  # no nvidia-smi at all
    nproc, err = _train_sh(None, NPROC="2")
    assert nproc == 2 and f"OMP_NUM_THREADS={max(1, len(os.sched_getaffinity(0)) // 2)}" in err
