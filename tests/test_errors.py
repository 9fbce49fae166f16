"""Faults a user can fix, each reported by the CLI as one line naming the cause (exit 2), found by a
fault-injection run (issue 19): a full or read-only disk while writing, more clusters than images,
a malformed config file, a data set none of whose samples reads, and a rank stopped because
another one failed, which must not read as a resumable preemption."""

from __future__ import annotations

import errno
import io
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scp_dist import distributed as D
from scp_dist import fileio
from scp_dist.checkpoint import CheckpointError, list_checkpoints, load_latest, save_checkpoint
from scp_dist.config import ConfigError, load_config
from scp_dist.data.batch import DataError
from scp_dist.distributed import DistState
from scp_dist.evaluate import predict
from scp_dist.shards.sources import encode_png
from scp_dist.shards.writer import Sample, write_shards
from scp_dist.signals import EXIT_REQUEUE, Preempted, StopSignals
from scp_dist.train import check_data, check_some_read, exit_code_for, train
from tests.helpers import REPO, overrides

GARBAGE_PNG = b"\x89PNG\r\n\x1a\n" + b"garbage" * 9


def dataset(root: Path, n: int, bad: tuple[int, ...] = (), split: str = "train") -> Path:
    """n labelled 8x8 images in shards of 10; the samples numbered in `bad` do not decode."""
    rng = np.random.default_rng(0)
    items = [Sample(f"k{i:03d}", GARBAGE_PNG if i in bad else encode_png(rng.integers(0, 256, (8, 8, 3), np.uint8)),
                    "png", i % 2) for i in range(n)]
    write_shards(items, root / split, source="t", split=split, classes=["a", "b"], max_count=10, progress=False)
    return root


def small(tmp: Path, data: Path, **kw) -> list[str]:
    return overrides(tmp, data, **{"data.prepare": "", "train.global_batch": 10, "head.num_clusters": 2,
                                   "output.kmeans": "false", "train.epochs": 1, **kw})


def cli(args: list[str], preexec_fn=None, wrap: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*wrap, sys.executable, "-m", "scp_dist.train", *args], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600, preexec_fn=preexec_fn)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one line a user error prints (rc 2, no traceback)."""
    assert proc.returncode == 2, f"rc={proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error")]
    assert len(lines) == 1, proc.stderr[-4000:]
    return lines[0]


def listing(d: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))}


# -- a malformed config file --------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_malformed_config_file_is_one_line_with_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 3\n  global_batch: [1, 2\nhead:\n  num_clusters: 4\n")
    line = error_line(cli(["--config", str(bad)]))
    assert line.startswith(f"error: config file {bad}, line 4, column 5: did not find expected ',' or ']'")
    assert "line 3" in line  # where the unclosed list starts


# -- more clusters than images ------------------------------------------------------------------------

def test_more_clusters_than_images_is_refused_at_start_naming_the_key(tmp_path):
    data = dataset(tmp_path / "ds", 30)
    with pytest.raises(ConfigError, match=r"'head\.num_clusters': 31 clusters are more than the 30 samples of .*; "
                                          r"set head\.num_clusters <= 30"):
        check_data(load_config("demo_digits", small(tmp_path, data, **{"head.num_clusters": 31})))
    check_data(load_config("demo_digits", small(tmp_path, data, **{"head.num_clusters": 30})))  # the counter-check


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_cli_refuses_more_clusters_than_images_before_anything_runs(tmp_path):
    data = dataset(tmp_path / "ds", 30)
    line = error_line(cli(["--config", "demo_digits", *small(tmp_path, data, **{"head.num_clusters": 40})]))
    assert "config key 'head.num_clusters': 40 clusters are more than the 30 samples" in line
    assert not (tmp_path / "runs").exists()


# -- no sample of a split can be read ------------------------------------------------------------------

def test_an_epoch_whose_every_sample_was_skipped_stops_the_run(tmp_path):
    data = dataset(tmp_path / "ds", 20, bad=tuple(range(20)))
    cfg = load_config("demo_digits", small(tmp_path, data, **{"train.epochs": 3}))
    with pytest.raises(DataError, match=r"^no sample of train could be read in epoch 1: all 20 were skipped "
                                        r"\(corrupt_image 20\)"):
        train(cfg, DistState())
    assert not list_checkpoints(tmp_path / "runs" / cfg.output.run_name)  # no checkpoint of a head that saw nothing
    check_some_read({"corrupt_image": 19, "truncated": 0}, 20, "train", 1)  # one read sample is enough


def test_an_unreadable_test_split_is_an_error_at_evaluation_not_a_crash(tmp_path):
    data = dataset(tmp_path / "ds", 20)
    dataset(data, 10, bad=tuple(range(10)), split="test")
    cfg = load_config("demo_digits", small(tmp_path, data, **{"data.test_split": "test"}))
    with pytest.raises(DataError, match=r"^no sample of test could be read for evaluation"):
        train(cfg, DistState())


class _OneHead(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)[None]  # (H=1, n, K), as SCPHead gives


def test_predict_names_the_split_that_has_no_sample():
    with pytest.raises(DataError, match="no sample of test could be read"):
        predict(iter([]), _OneHead(), DistState(), split="test")
    batch = (torch.randn(2, 4), ["a", "b"], torch.tensor([0, 1]))
    preds, _ = predict(iter([batch]), _OneHead(), DistState(), split="test")
    assert preds.keys == ["a", "b"] and preds.clusters.shape == (1, 2)


def test_a_k_means_baseline_left_out_for_want_of_samples_says_so(caplog):
    from scp_dist.evaluate import kmeans_baseline

    cfg = load_config(None, ["head.num_clusters=5", "output.kmeans_niter=2", "output.kmeans_nredo=1"])
    rng = np.random.default_rng(0)
    assert kmeans_baseline(cfg, DistState(), {"train": rng.random((4, 3), np.float32)}) is None
    assert "no k-means baseline: 4 readable training samples for 5 clusters" in caplog.text
    caplog.clear()
    assert len(kmeans_baseline(cfg, DistState(), {"train": rng.random((5, 3), np.float32)})["train"]) == 5
    assert "no k-means baseline" not in caplog.text


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_cli_says_no_sample_could_be_read_in_one_line(tmp_path):
    data = dataset(tmp_path / "ds", 20, bad=tuple(range(20)))
    line = error_line(cli(["--config", "demo_digits", *small(tmp_path, data, **{"train.epochs": 2})]))
    assert line == ("error (rank 0): no sample of train could be read in epoch 1: all 20 were skipped "
                    "(corrupt_image 20); the warnings above name each sample")


# -- a full or read-only disk while writing --------------------------------------------------------------

class _FullFile(io.RawIOBase):
    """A file on a disk that fills up after `room` bytes: writes past it fail as the kernel's do."""

    def __init__(self, f: io.BufferedWriter, room: int) -> None:
        self.f, self.room = f, room

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.f.write(b)

    def fileno(self) -> int:
        return self.f.fileno()

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        super().close()  # flushes first
        self.f.close()


class _OsOnAFullDisk:
    """fileio's `os` with files that fill up; everything else is the real module."""

    def __init__(self, room: int) -> None:
        self.room = room

    def __getattr__(self, name: str):
        return getattr(os, name)

    def fdopen(self, fd: int, mode: str) -> _FullFile:
        return _FullFile(os.fdopen(fd, mode), self.room)


def test_a_full_disk_while_checkpointing_names_the_cause_and_keeps_the_checkpoints(tmp_path, monkeypatch):
    state = {"big": torch.zeros(200_000), "fingerprint": {}}
    for step in (1, 2):
        save_checkpoint(tmp_path, {**state, "step": step}, keep=3)
    # The fault, unhandled: torch reports the failed write as a RuntimeError and buries the reason.
    with open(tmp_path / "raw.pt", "wb") as f, pytest.raises(RuntimeError, match="unexpected pos") as raw:
        torch.save(state, _FullFile(f, 100_000))
    assert isinstance(raw.value.__context__, OSError) and raw.value.__context__.errno == errno.ENOSPC
    (tmp_path / "raw.pt").unlink()

    monkeypatch.setattr(fileio, "os", _OsOnAFullDisk(100_000))
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(tmp_path, {**state, "step": 3}, keep=3)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"checkpoint {tmp_path / 'checkpoints' / 'step-000000003.pt'} was not written: "
                          "No space left on device (ENOSPC); the newest checkpoint, step-000000002.pt, is intact")
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000001.pt", "step-000000002.pt"]
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))  # the partial file is gone too
    assert load_latest(tmp_path, {})[0]["step"] == 2


def test_atomic_write_names_the_target_not_its_temporary_file(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio, "os", _OsOnAFullDisk(10))
    with pytest.raises(OSError) as err:
        fileio.atomic_write_text(tmp_path / "eval.json", "x" * 100)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "eval.json")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_cli_reports_a_file_size_limit_at_a_checkpoint_in_one_line(tmp_path, digits_root):
    """A real refusal by the kernel, without root: RLIMIT_FSIZE makes a write past it fail (EFBIG;
    Python ignores SIGXFSZ) the way a full disk does (ENOSPC, the test above)."""
    args = overrides(tmp_path, digits_root, **{"output.kmeans": "false", "train.checkpoint_minutes": 0,
                                               "output.run_name": "f"})
    train(load_config("demo_digits", [*args, "train.max_steps=2"]), DistState())
    run = tmp_path / "runs" / "f"
    before = torch.load(list_checkpoints(run)[-1], weights_only=False)

    def limit() -> None:  # the small files fit, a checkpoint (tens of MB) does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

    line = error_line(cli(["--config", "demo_digits", *args, "train.max_steps=4"], preexec_fn=limit))
    assert line == (f"error (rank 0): checkpoint {run / 'checkpoints' / 'step-000000004.pt'} was not written: "
                    "File too large (EFBIG); the newest checkpoint, step-000000002.pt, is intact: once the storage "
                    "takes the write, the same command continues from it")
    assert [p.name for p in list_checkpoints(run)] == ["step-000000002.pt"]
    assert not list((run / "checkpoints").glob(".*.tmp"))
    after = torch.load(list_checkpoints(run)[-1], weights_only=False)
    assert all(torch.equal(v, after["head"][k]) for k, v in before["head"].items())


def _read_only(d: Path) -> tuple[str, ...]:
    """A command prefix under which `d` is read-only: chmod for a user; root ignores modes, so a
    read-only bind mount in a private mount namespace (unshare), else skip."""
    if os.geteuid() != 0:
        d.chmod(0o555)
        return ()
    unshare = shutil.which("unshare")
    probe = subprocess.run([unshare or "unshare", "-m", "true"], capture_output=True) if unshare else None
    if probe is None or probe.returncode != 0:
        pytest.skip("as root a directory is read-only only on a read-only mount, and unshare -m is not "
                    f"permitted here ({probe.stderr.decode().strip() if probe else 'no unshare'})")
    return (unshare, "-m", "sh", "-c", f'mount --bind -o ro "{d}" "{d}" && exec "$@"', "sh")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_cli_reports_a_read_only_output_directory_in_one_line_and_touches_nothing(tmp_path, digits_root):
    args = overrides(tmp_path, digits_root, **{"output.kmeans": "false", "train.checkpoint_minutes": 0,
                                               "output.run_name": "r"})
    train(load_config("demo_digits", [*args, "train.max_steps=2"]), DistState())
    runs = tmp_path / "runs"
    before = listing(runs)
    try:
        line = error_line(cli(["--config", "demo_digits", *args, "train.max_steps=4"], wrap=_read_only(runs)))
    finally:
        runs.chmod(0o755)
    assert line in (f"error (rank 0): [Errno 30] Read-only file system: '{runs / 'r' / '.lock'}'",
                    f"error (rank 0): [Errno 13] Permission denied: '{runs / 'r' / '.lock'}'")
    assert listing(runs) == before


# -- a rank stopped because another failed ----------------------------------------------------------------

@pytest.fixture
def two_ranks(monkeypatch):
    """Rank 0 of 2, with the rendezvous store's failure record replaced by a variable."""
    told: dict[str, str | None] = {"peer": None, "reported": None}
    monkeypatch.setattr(D, "peer_failure", lambda: told["peer"])
    monkeypatch.setattr(D, "report_failure", lambda msg: told.__setitem__("reported", msg))
    return DistState(rank=0, world_size=2), told


def _stopped(signum: int | None = None) -> StopSignals:
    stop = StopSignals()
    stop.signum = signum
    return stop


def test_a_stop_caused_by_a_failed_peer_says_so_and_is_not_resumable(two_ranks, capsys, caplog):
    st, told = two_ranks
    told["peer"] = "rank 1 failed: corrupt_image: sample k035"
    sigterm = Preempted(signal.SIGTERM, "outside the training loop", outside_loop=True)
    assert exit_code_for(sigterm, st, _stopped(signal.SIGTERM)) == 1
    assert capsys.readouterr().err == "error (rank 0): stopped because rank 1 failed: corrupt_image: sample k035\n"
    assert "run the same command again" not in caplog.text
    # A collective that lost the failed rank says the same, without a traceback.
    assert exit_code_for(RuntimeError("[pair.cc:561] Connection closed by peer"), st, _stopped()) == 1
    assert capsys.readouterr().err == "error (rank 0): stopped because rank 1 failed: corrupt_image: sample k035\n"
    assert told["reported"] is None  # a consequence is never reported as a cause


def test_a_stop_with_no_failed_peer_is_still_a_resumable_preemption(two_ranks, capsys, caplog):
    st, _ = two_ranks
    in_loop = Preempted(signal.SIGTERM, "at step 12; checkpoint runs/x/checkpoints/step-000000012.pt")
    assert exit_code_for(in_loop, st, _stopped(signal.SIGTERM)) == EXIT_REQUEUE
    assert "run the same command again (train.resume=auto) to continue" in caplog.text
    assert "another rank died" not in caplog.text  # every rank agreed to stop: none had died
    caplog.clear()
    outside = Preempted(signal.SIGTERM, "outside the training loop", outside_loop=True)
    assert exit_code_for(outside, st, _stopped(signal.SIGTERM)) == EXIT_REQUEUE
    assert "another rank died without a word" in caplog.text  # no record, but torchrun may have sent it
    assert capsys.readouterr().err == ""


def test_a_collective_that_fails_after_a_sigterm_blames_no_one_in_particular(two_ranks, capsys):
    st, told = two_ranks
    assert exit_code_for(RuntimeError("gloo: timed out"), st, _stopped(signal.SIGTERM)) == 1
    err = capsys.readouterr().err
    assert err == ("error (rank 0): RuntimeError: gloo: timed out: a peer rank failed or the job was stopped; "
                   "see the other ranks' errors above\n")
    assert told["reported"] is None


def test_a_rank_that_fails_on_its_own_tells_the_others(two_ranks, capsys):
    st, told = two_ranks
    assert exit_code_for(DataError("corrupt_image: sample k035"), st, _stopped()) == 2
    assert capsys.readouterr().err == "error (rank 0): corrupt_image: sample k035\n"
    assert told["reported"] == "rank 0 failed: corrupt_image: sample k035"
    assert exit_code_for(OSError(errno.EROFS, "Read-only file system", "runs/x/.lock"), st, _stopped()) == 2
    assert capsys.readouterr().err == "error (rank 0): [Errno 30] Read-only file system: 'runs/x/.lock'\n"
    # A bug keeps its traceback, and is reported too.
    try:
        1 / 0  # noqa: B018 - a real traceback to print
    except ZeroDivisionError as e:
        assert exit_code_for(e, st, _stopped()) == 1
    assert "Traceback" in capsys.readouterr().err
    assert told["reported"] == "rank 0 failed: ZeroDivisionError: division by zero"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_under_torchrun_the_rank_stopped_by_a_failed_peer_names_it(tmp_path):
    """Rank 1's share of the data holds a corrupt sample (data.on_error=raise); rank 0's does not.
    torchrun SIGTERMs rank 0 once rank 1 has failed: it must not ask to be run again."""
    data = dataset(tmp_path / "ds", 40, bad=(35,))  # extraction: rank 1 reads samples 20..39
    args = small(tmp_path, data, **{"data.on_error": "raise", "train.mode": "cached", "cache.num_pairs": 1})
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "scp_dist.train", "--config", "demo_digits", *args], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    cause = "corrupt_image: sample k035: ValueError: PNG does not start with an IHDR chunk"
    assert f"error (rank 1): {cause}" in out, out[-4000:]
    assert f"error (rank 0): stopped because rank 1 failed: {cause}" in out, out[-4000:]
    assert "run the same command again" not in out and "Connection closed by peer" not in out
