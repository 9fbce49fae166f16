"""Never lose work: step checkpoints, stop signals, killed ranks, another world size, an interrupted
feature extraction and kills during checkpoint writes, each compared with an uninterrupted run of
the same seed; and the run directory's guards (refused resumes, overwrite, lock)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from scp_dist.checkpoint import CheckpointError, list_checkpoints, load_latest, save_checkpoint
from scp_dist.config import config_fingerprint, load_config
from scp_dist.distributed import DistState
from scp_dist.rundir import RunDirError, lock
from scp_dist.signals import EXIT_REQUEUE
from scp_dist.train import train
from tests.helpers import REPO, head_params, last_checkpoint, overrides

STEPS = 1797 // 64  # steps per epoch at a global batch of 64
# lr 5e-4 and fp32 features: the comparisons across world sizes hold to float rounding (test_world_size.py).
SHORT = {"train.epochs": 3, "train.global_batch": 64, "optim.lr": 5e-4, "output.kmeans": "false",
         "train.checkpoint_minutes": 0}


def _cfg(tmp: Path, data: Path, **kw):
    return load_config("demo_digits", overrides(tmp, data, **{**SHORT, **kw}))


def _steps(run: Path) -> dict[int, float]:
    """The loss of every logged step; a step logged twice (before a crash and after the resume) keeps
    the later record, as the resume marker tells a reader to."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "step":
            out[rec["step"]] = rec["loss"]
    return out


def _kinds(run: Path) -> list[str]:
    """The run's records in order, less the per-stage timings."""
    kinds = [json.loads(x)["kind"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [k for k in kinds if k != "stage"]


def _assert_same_head(a: Path, b: Path, rtol: float = 0.0, atol: float = 0.0) -> None:
    pa, pb = head_params(a), head_params(b)
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=rtol, atol=atol)


def _assert_same_run(a: Path, b: Path) -> None:
    """The same run on another world size, to float rounding: the sums of a global batch are added
    in another order on another world size, and Adam turns the rounding of near-zero gradients into
    lr-sized steps, so differences grow with the steps (measured: at most 5.6e-4 relative over these
    84 steps, and 1e-4 over 27 in test_world_size.py). A resume that lost or repeated batches
    differs by far more (the counter-test above: a restarted epoch)."""
    ref, got = _steps(a), _steps(b)
    assert got.keys() == ref.keys()
    torch.testing.assert_close(torch.tensor([got[s] for s in ref]), torch.tensor(list(ref.values())), rtol=2e-3, atol=0)
    sa = json.loads((a / "eval.json").read_text())["splits"]["train"]["scores"]
    sb = json.loads((b / "eval.json").read_text())["splits"]["train"]["scores"]
    assert sb["acc"] == pytest.approx(sa["acc"], abs=0.01)
    _assert_same_head(a, b, rtol=0, atol=5e-3)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, digits_root) -> Path:
    """The uninterrupted reference: one process, 3 epochs of 28 steps."""
    tmp = tmp_path_factory.mktemp("straight")
    train(_cfg(tmp, digits_root, **{"output.run_name": "ref"}), DistState())
    return tmp / "runs" / "ref"


@pytest.mark.slow
def test_a_mid_epoch_resume_continues_with_the_next_global_batch(tmp_path, digits_root, straight):
    st = DistState()
    stop = STEPS + 13  # inside epoch 2
    train(_cfg(tmp_path, digits_root, **{"output.run_name": "r", "train.max_steps": stop}), st)
    ck = last_checkpoint(tmp_path / "runs" / "r")
    assert (ck["epoch"], ck["step_in_epoch"], ck["step"], ck["reason"]) == (1, 13, stop, "max_steps")
    train(_cfg(tmp_path, digits_root, **{"output.run_name": "r"}), st)  # train.resume=auto
    run = tmp_path / "runs" / "r"
    _assert_same_head(straight, run)  # same process, same batches: bit for bit
    assert _steps(run) == _steps(straight)  # every step after the resume point too
    assert _kinds(run).count("resume") == 1 and _kinds(run)[0] == "start"
    assert json.loads((run / "eval.json").read_text())["splits"] == json.loads(
        (straight / "eval.json").read_text())["splits"]


@pytest.mark.slow
def test_counter_a_resume_that_restarts_the_epoch_is_detected(tmp_path, digits_root, straight):
    """The comparison above can fail: resuming mid-epoch from the epoch's first batch (what an
    epoch-granular checkpoint does) trains on 13 batches twice and gives another head."""
    st = DistState()
    train(_cfg(tmp_path, digits_root, **{"output.run_name": "r", "train.max_steps": STEPS + 13}), st)
    run = tmp_path / "runs" / "r"
    path = list_checkpoints(run)[-1]
    state = torch.load(path, weights_only=False)
    state["step_in_epoch"] = 0
    torch.save(state, path)
    train(_cfg(tmp_path, digits_root, **{"output.run_name": "r"}), st)
    with pytest.raises(AssertionError):
        _assert_same_head(straight, run, rtol=1e-4, atol=1e-6)
    ref, got = _steps(straight), _steps(run)
    rel = max(abs(got[s] - ref[s]) / abs(ref[s]) for s in ref)
    assert rel > 1e-2  # far outside the tolerance of the cross-world-size comparisons below


@pytest.mark.slow
def test_last_k_are_kept_and_a_corrupt_newest_falls_back(tmp_path, digits_root, caplog):
    cfg = _cfg(tmp_path, digits_root, **{"output.run_name": "k", "train.checkpoint_every": 10,
                                         "train.keep_checkpoints": 2, "train.epochs": 1})
    train(cfg, DistState())
    run = tmp_path / "runs" / "k"
    files = list_checkpoints(run)
    assert [p.name for p in files] == ["step-000000020.pt", "step-000000028.pt"]
    files[-1].write_bytes(files[-1].read_bytes()[:1000])  # a truncated newest file
    state, path = load_latest(run, config_fingerprint(cfg))
    assert path == files[0] and state["step"] == 20
    assert "cannot be read" in caplog.text


@pytest.mark.parametrize("key,value", [("loss.alpha", 2.0), ("optim.lr", 1e-3), ("train.seed", 3),
                                       ("augment.crop_p", 0.9), ("loss.ce_reduction", "sum"),
                                       ("head.num_clusters", 12)])
@pytest.mark.slow
def test_a_resume_refuses_a_change_of_result_and_names_it(tmp_path, digits_root, key, value):
    name = {"output.run_name": "x"}
    train(_cfg(tmp_path, digits_root, **name, **{"train.max_steps": 3}), DistState())
    saved = (tmp_path / "runs" / "x" / "config.yaml").read_bytes()
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        train(_cfg(tmp_path, digits_root, **name, **{key: value}), DistState())
    assert (tmp_path / "runs" / "x" / "config.yaml").read_bytes() == saved  # untouched by the refusal


@pytest.mark.slow
def test_the_same_data_by_another_path_and_speed_keys_resume(tmp_path, digits_root):
    name = {"output.run_name": "p"}
    train(_cfg(tmp_path, digits_root, **name, **{"train.max_steps": 3}), DistState())
    link = tmp_path / "link"
    link.symlink_to(digits_root)
    train(_cfg(tmp_path, Path(f"{link}/"), **name, **{"train.max_steps": 5, "train.log_every": 2,
                                                      "output.kmeans": "true"}), DistState())
    assert last_checkpoint(tmp_path / "runs" / "p")["step"] == 5


@pytest.mark.slow
def test_a_fresh_start_never_overwrites_a_run_unless_asked(tmp_path, digits_root):
    name = {"output.run_name": "f", "train.epochs": 1}
    train(_cfg(tmp_path, digits_root, **name), DistState())
    run = tmp_path / "runs" / "f"
    with pytest.raises(RunDirError, match="already holds a run"):
        train(_cfg(tmp_path, digits_root, **name, **{"train.resume": "false"}), DistState())
    assert _kinds(run) == ["start", *["step"] * STEPS, "epoch", "eval"]  # nothing touched
    train(_cfg(tmp_path, digits_root, **name, **{"train.resume": "false", "output.overwrite": "true",
                                                  "train.max_steps": 2}), DistState())
    assert _kinds(run) == ["start", "step", "step", "eval"]  # the old run is gone, not mixed in


@pytest.mark.slow
def test_a_second_run_in_the_same_directory_is_refused(tmp_path, digits_root):
    run = tmp_path / "runs" / "l"
    held = lock(run)  # another job holds the run
    try:
        with pytest.raises(RunDirError, match=f"in use by pid {os.getpid()}"):
            train(_cfg(tmp_path, digits_root, **{"output.run_name": "l"}), DistState())
    finally:
        held.close()
    train(_cfg(tmp_path, digits_root, **{"output.run_name": "l", "train.max_steps": 1}), DistState())


# --- processes: signals, kill -9 under torchrun, another world size, extraction, checkpoint writes --------


def _launch(args: list[str], torchrun: int = 0, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", *extra] \
        if torchrun else [sys.executable]
    return subprocess.Popen([*cmd, "-m", "scp_dist.train", "--config", "demo_digits", *args], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for_step(run: Path, at_least: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, f"finished before step {at_least}:\n{proc.stdout.read()[-3000:]}"
        steps = _steps(run) if (run / "metrics.jsonl").is_file() else {}
        if steps and max(steps) >= at_least:
            return max(steps)
        time.sleep(0.05)
    raise TimeoutError(f"no step {at_least} in {timeout} s")


def _workers(proc: subprocess.Popen) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "scp_dist.train"], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigusr1_mid_epoch_checkpoints_and_resumes_on_two_ranks(tmp_path, digits_root, straight):
    """SLURM's time-limit warning on one process: it stops after the current step with a checkpoint
    at that step and EXIT_REQUEUE; the rerun on 2 ranks continues the same run."""
    args = overrides(tmp_path, digits_root, **{**SHORT, "output.run_name": "s"})
    run = tmp_path / "runs" / "s"
    proc = _launch(args)
    _wait_for_step(run, STEPS + 5, proc)
    proc.send_signal(signal.SIGUSR1)
    rc, out = _finish(proc)
    assert rc == EXIT_REQUEUE, out[-3000:]
    ck = last_checkpoint(run)
    assert ck["reason"] == f"signal {int(signal.SIGUSR1)}" and 0 < ck["step"] < 3 * STEPS
    assert "run the same command again" in out
    rc, out = _finish(_launch(args, torchrun=2))
    assert rc == 0, out[-3000:]
    assert "from a checkpoint of 1 rank(s)" in out
    _assert_same_run(straight, run)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigterm_to_torchrun_stops_both_ranks_at_one_step_then_one_rank_resumes(tmp_path, digits_root, straight):
    args = overrides(tmp_path, digits_root, **{**SHORT, "output.run_name": "t"})
    run = tmp_path / "runs" / "t"
    proc = _launch(args, torchrun=2)
    _wait_for_step(run, 10, proc)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to its workers
    rc, out = _finish(proc)
    assert rc != 0, out[-3000:]
    ck = last_checkpoint(run)
    assert ck["reason"] == f"signal {int(signal.SIGTERM)}" and ck["world_size"] == 2
    rc, out = _finish(_launch(args))
    assert rc == 0, out[-3000:]
    _assert_same_run(straight, run)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_kill_9_of_a_rank_under_torchrun_restarts_and_resumes_by_itself(tmp_path, digits_root):
    """A worker killed at a random moment: the other rank does not hang, torchrun restarts the group
    (--max-restarts 1) and the new group resumes from the last step checkpoint on its own; the head
    equals an uninterrupted 2-rank run."""
    ref_args = overrides(tmp_path, digits_root, **{**SHORT, "output.run_name": "ref2"})
    rc, out = _finish(_launch(ref_args, torchrun=2))
    assert rc == 0, out[-3000:]
    args = overrides(tmp_path, digits_root, **{**SHORT, "output.run_name": "k", "train.checkpoint_every": 8})
    run = tmp_path / "runs" / "k"
    proc = _launch(args, torchrun=2, extra=("--max-restarts", "1"))
    at = int(np.random.default_rng().integers(12, 2 * STEPS))
    _wait_for_step(run, at, proc)
    os.kill(max(_workers(proc)), signal.SIGKILL)
    t0 = time.time()
    rc, out = _finish(proc)
    assert rc == 0, out[-3000:]
    assert "resumed at epoch" in out and time.time() - t0 < 200
    assert _kinds(run).count("resume") == 1
    _assert_same_head(tmp_path / "runs" / "ref2", run, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_an_error_on_one_rank_ends_the_job_in_seconds(tmp_path):
    """No barrier on the error path: the failing rank prints one line and leaves, and the job ends
    long before dist.timeout_s (300 s here) would free a rank waiting in a collective."""
    from tests.helpers import bad_dataset

    data = tmp_path / "bad"
    bad_dataset(data / "train")
    args = overrides(tmp_path, data, **{"data.prepare": "", "data.on_error": "raise", "train.global_batch": 10,
                                        "dist.timeout_s": 300, "output.kmeans": "false"})
    t0 = time.time()
    rc, out = _finish(_launch(args, torchrun=2), timeout=280)
    assert rc != 0 and time.time() - t0 < 120
    assert "error (rank" in out and "data.on_error=raise" in out


@pytest.mark.slow
@pytest.mark.multiprocess
def test_an_extraction_killed_half_way_keeps_finished_kinds(tmp_path, digits_root):
    extra = {**SHORT, "train.mode": "cached", "cache.num_pairs": 3, "cache.dtype": "fp32", "train.epochs": 1}
    ref = overrides(tmp_path, digits_root, **{**extra, "output.run_name": "ref", "cache.dir": str(tmp_path / "c0")})
    rc, out = _finish(_launch(ref))
    assert rc == 0, out[-3000:]
    cache = tmp_path / "c1"
    args = overrides(tmp_path, digits_root, **{**extra, "output.run_name": "x", "cache.dir": str(cache)})
    proc = _launch(args)
    done = cache / "seed0" / "train" / "pair-000.json"
    end = time.time() + 120
    while not done.is_file() and time.time() < end and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    first = {p: p.stat().st_mtime_ns for p in (cache / "seed0" / "train").glob("pair-000.*")}
    assert first, "the first pair was not finished before the kill"
    rc, out = _finish(_launch(args))
    assert rc == 0, out[-3000:]
    assert {p: p.stat().st_mtime_ns for p in first} == first  # finished parts were not redone
    for f in (tmp_path / "c0").glob("**/*.npy"):
        np.testing.assert_array_equal(np.load(f), np.load(cache / f.relative_to(tmp_path / "c0")))


_WRITER = """
import os, sys, time, torch
from pathlib import Path
from scp_dist.checkpoint import save_checkpoint
run, step, block_at = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
big = torch.arange(3_000_000, dtype=torch.float32)
real_fsync = os.fsync
def fsync(fd):
    real_fsync(fd)
    if step == block_at:  # the data is in the temporary file, the rename has not happened
        print("blocked", flush=True)
        time.sleep(3600)
os.fsync = fsync
while True:
    print(f"start {step}", flush=True)
    t0 = time.perf_counter()
    save_checkpoint(run, {"step": step, "big": big + step, "fingerprint": {}}, keep=2)
    print(f"done {step} {time.perf_counter() - t0:.6f}", flush=True)
    step += 1
"""


KILLS = 10  # each restart imports torch again: seconds apiece on a loaded machine


def _line(proc: subprocess.Popen, prefix: str, timeout: float = 300) -> str:
    """The writer's next line that starts with `prefix`: readiness, however loaded the machine."""
    end = time.monotonic() + timeout
    while True:
        left = end - time.monotonic()
        assert left > 0, f"no {prefix!r} line from the writer in {timeout} s"
        if select.select([proc.stdout], [], [], left)[0]:
            line = proc.stdout.readline().decode()  # unbuffered: select sees every byte not yet read
            assert line, f"the writer exited (rc {proc.wait()}) before a {prefix!r} line"
            if line.startswith(prefix):
                return line


@pytest.mark.slow
@pytest.mark.multiprocess
def test_repeated_kills_during_checkpoint_writes_never_leave_a_partial_file(tmp_path):
    """Each writer first finishes a checkpoint (its readiness, and what the kill must not damage),
    then is killed during a later write. Odd rounds kill at a random point of the write (the delay
    after its start line is drawn within the measured length of a write); even rounds hold the
    writer inside the write, between writing the temporary file and renaming it, and kill it
    there, so that some kills certainly land mid-write whatever the load."""
    from scp_dist.checkpoint import remove_stale_temporaries

    rng = np.random.default_rng(0)
    run = tmp_path / "run"
    step, mid_write, held = 1, 0, 0
    for i in range(KILLS):
        victim = step + int(rng.integers(1, 4))  # the 2nd to 4th write of this process
        hold = i % 2 == 0
        p = subprocess.Popen([sys.executable, "-c", _WRITER, str(run), str(step), str(victim if hold else -1)],
                             cwd=REPO, stdout=subprocess.PIPE, bufsize=0)
        try:
            seconds = float(_line(p, "done ").split()[2])
            _line(p, f"start {victim}")
            if hold:
                _line(p, "blocked")
            else:
                time.sleep(float(rng.uniform(0, seconds)))
        finally:
            p.kill()
            p.wait()
            p.stdout.close()
        state, _ = load_latest(run, {})
        assert state["step"] >= step  # the finished write survived the kill
        assert torch.equal(state["big"], torch.arange(3_000_000, dtype=torch.float32) + state["step"])
        for path in list_checkpoints(run):  # every file there is whole, not only the newest
            torch.load(path, weights_only=False)
        interrupted = remove_stale_temporaries(run) > 0
        if hold:  # the counter-check that these kills hit writes: each left its temporary file
            assert interrupted, f"round {i}: the writer held mid-write left no temporary file"
            assert state["step"] == victim - 1  # and the held write never became a checkpoint
            held += 1
        mid_write += interrupted
        assert not list((run / "checkpoints").glob(".*.tmp"))
        step = state["step"] + 1
    assert held == KILLS // 2 and mid_write >= held


def test_save_checkpoint_is_atomic_and_prunes_to_keep(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, {"step": step, "fingerprint": {"a": 1}}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000002.pt", "step-000000003.pt"]
    with pytest.raises(CheckpointError, match=r"a \(1 -> 2\)"):
        load_latest(tmp_path, {"a": 2})


@pytest.mark.slow
def test_the_running_marginal_estimate_is_checkpointed_and_resumed(tmp_path, digits_root):
    """loss.marginal=ema carries state across steps: a mid-epoch resume restores it, so the resumed
    run is the uninterrupted one bit for bit; without it the estimate would restart from zero."""
    ema = {"loss.marginal": "ema", "train.epochs": 2}
    train(_cfg(tmp_path, digits_root, **{**ema, "output.run_name": "ref"}), DistState())
    train(_cfg(tmp_path, digits_root, **{**ema, "output.run_name": "r", "train.max_steps": STEPS + 5}), DistState())
    assert last_checkpoint(tmp_path / "runs" / "r")["marginal"]["steps"] == STEPS + 5
    train(_cfg(tmp_path, digits_root, **{**ema, "output.run_name": "r"}), DistState())
    _assert_same_head(tmp_path / "runs" / "ref", tmp_path / "runs" / "r")
    assert _steps(tmp_path / "runs" / "r") == _steps(tmp_path / "runs" / "ref")


def test_a_key_newer_than_the_checkpoint_is_no_difference_at_its_default(tmp_path):
    # A run written before train.step_budget existed ran without a budget: it resumes (or is
    # re-evaluated) while the key stays at its default, and is refused once the key is set.
    from scp_dist.config import schema_defaults

    save_checkpoint(tmp_path, {"step": 1, "fingerprint": {"a": 1}}, keep=2)
    defaults = schema_defaults()
    assert defaults["train.step_budget"] == 0
    assert load_latest(tmp_path, {"a": 1, "train.step_budget": 0}, defaults)[0]["step"] == 1
    with pytest.raises(CheckpointError, match=r"train.step_budget \(None -> 3000\)"):
        load_latest(tmp_path, {"a": 1, "train.step_budget": 3000}, defaults)
    with pytest.raises(CheckpointError, match="train.step_budget"):  # without the defaults: refused
        load_latest(tmp_path, {"a": 1, "train.step_budget": 0})
