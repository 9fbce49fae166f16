"""The training job end to end, as a user runs it: one process, and torchrun with 2 CPU processes
(train a few steps, checkpoint, resume, evaluate). Data: the embedded digits, written to shards."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from scp_dist.checkpoint import CheckpointError
from scp_dist.config import ConfigError, load_config
from scp_dist.distributed import DistState
from scp_dist.train import train
from tests.helpers import REPO, head_params, last_checkpoint, overrides, run_cli

pytestmark = pytest.mark.slow  # several processes or whole jobs: tens of seconds


@pytest.mark.multiprocess
def test_single_process_run_writes_everything(tmp_path, digits_root):
    args = ["--config", "demo_digits", *overrides(tmp_path, digits_root, **{"output.run_name": "single"})]
    proc = run_cli(args)
    run = tmp_path / "runs" / "single"
    assert "ACC" in proc.stdout and "NMI" in proc.stdout and "ARI" in proc.stdout
    ev = json.loads((run / "eval.json").read_text())
    scores = ev["splits"]["train"]["scores"]
    assert scores["n"] == 1797 and 0.0 <= scores["acc"] <= 1.0
    rows = list(csv.DictReader((run / "assignments_train.csv").open()))
    assert len(rows) == 1797 and len({r["key"] for r in rows}) == 1797
    assert all(0 <= int(r["cluster"]) < 10 and 0 < float(r["probability"]) <= 1 for r in rows)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x["kind"] == "step"]
    assert len(steps) == 2 * (1797 // 256)  # every step logged, 7 steps per epoch
    assert {"loss", "l_e", "l_con", "entropy", "lr", "img_per_s"} <= steps[0].keys()
    assert steps[-1]["lr"] < steps[0]["lr"]  # cosine annealing
    resolved = load_config(run / "config.yaml")
    assert resolved.train.epochs == 2 and resolved.data.root == str(digits_root)


@pytest.mark.multiprocess
def test_torchrun_two_processes_checkpoint_resume_evaluate(tmp_path, digits_root):
    # (a) two epochs straight; (b) stop after epoch 1 (max_steps), then resume for epoch 2.
    straight = overrides(tmp_path, digits_root, **{"output.run_name": "straight"})
    run_cli(["--config", "demo_digits", *straight], torchrun=2)
    steps_per_epoch = 1797 // 256
    first = overrides(tmp_path, digits_root, **{"output.run_name": "resumed", "train.max_steps": steps_per_epoch})
    run_cli(["--config", "demo_digits", *first], torchrun=2)
    ckpt = last_checkpoint(tmp_path / "runs" / "resumed")
    assert ckpt["epoch"] == 1 and ckpt["step_in_epoch"] == 0 and ckpt["step"] == steps_per_epoch
    second = overrides(tmp_path, digits_root, **{"output.run_name": "resumed", "train.resume": "true"})
    proc = run_cli(["--config", "demo_digits", *second], torchrun=2)
    assert "resumed at epoch 2, step 7" in proc.stderr
    a, b = head_params(tmp_path / "runs" / "straight"), head_params(tmp_path / "runs" / "resumed")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    ev = json.loads((tmp_path / "runs" / "resumed" / "eval.json").read_text())
    assert ev["splits"]["train"]["num_samples"] == 1797


def test_resume_refuses_a_different_config(tmp_path, digits_root):
    st = DistState()
    cfg = load_config("demo_digits", overrides(tmp_path, digits_root, **{"output.run_name": "r", "train.max_steps": 1}))
    train(cfg, st)
    # Speed-only backbone keys (chunking) do not block a resume ...
    train(load_config("demo_digits", overrides(tmp_path, digits_root, **{
        "output.run_name": "r", "train.resume": "true", "train.max_steps": 2, "backbone.max_batch": 5})), st)
    # ... a different model does.
    bad = load_config("demo_digits", overrides(tmp_path, digits_root, **{
        "output.run_name": "r", "train.resume": "true", "head.num_clusters": 12}))
    with pytest.raises(CheckpointError, match="head"):
        train(bad, st)


def test_same_seed_same_result(tmp_path, digits_root):
    st = DistState()
    outs = []
    for name in ("s1", "s2"):
        cfg = load_config("demo_digits", overrides(tmp_path, digits_root, **{"output.run_name": name, "train.max_steps": 3}))
        outs.append(train(cfg, st)["predictions"]["train"].clusters)
    assert (outs[0] == outs[1]).all()
    for k, v in head_params(tmp_path / "runs" / "s1").items():
        assert torch.equal(v, head_params(tmp_path / "runs" / "s2")[k])


def test_missing_shards_fail_clearly(tmp_path):
    cfg = load_config("demo_digits", overrides(tmp_path, tmp_path / "nowhere", **{"data.prepare": ""}))
    from scp_dist.shards.manifest import ShardError

    with pytest.raises(ShardError, match="does not exist"):
        train(cfg, DistState())


@pytest.mark.multiprocess
def test_cli_reports_user_errors_in_one_line(tmp_path, digits_root):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "scp_dist.train", "--config", "demo_digits", *args], cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)

    typo = cli("train.epoch=3")
    assert typo.returncode == 2 and "Traceback" not in typo.stderr
    assert "error: config key 'train.epoch'" in typo.stderr
    # A mistyped data.root with the demo config (data.prepare=digits) is an error naming the path:
    # the built-in digits are only ever written into their own folder.
    missing = cli(f"data.root={tmp_path / 'nowhere'}", f"output.dir={tmp_path / 'runs'}")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "error (rank 0):" in missing.stderr and "nowhere" in missing.stderr
    assert not (tmp_path / "nowhere").exists()
    small = cli(f"data.root={digits_root}", "train.global_batch=5000", f"output.dir={tmp_path / 'runs'}")
    assert small.returncode == 2 and "train.global_batch" in small.stderr and "1797" in small.stderr
    assert "Traceback" not in small.stderr and not (tmp_path / "runs").exists()  # refused before anything ran
    no_test = cli(f"data.root={digits_root}", "data.test_split=test", f"output.dir={tmp_path / 'runs'}")
    assert no_test.returncode == 2 and "data.test_split" in no_test.stderr and "Traceback" not in no_test.stderr
    model = cli(f"data.root={digits_root}", "backbone.name=timm", "backbone.model=resnet_nope",
                f"output.dir={tmp_path / 'runs'}")
    assert model.returncode == 2 and "Traceback" not in model.stderr
    assert "error (rank 0): backbone.model: timm has no model 'resnet_nope'" in model.stderr


@pytest.mark.multiprocess
def test_a_run_with_no_config_finishes_and_names_itself_from_the_data(tmp_path):
    """`python -m scp_dist.train` with nothing but a short schedule, from any directory: the schema's
    defaults write the built-in digits into ./data/digits, train, evaluate, and name the run."""
    proc = subprocess.run([sys.executable, "-m", "scp_dist.train", "train.epochs=1", "train.global_batch=256"],
                          cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[digits/train] SCP" in proc.stdout and "[digits/train] k-means" in proc.stdout
    ev = json.loads((tmp_path / "runs" / "digits_seed0" / "eval.json").read_text())
    assert ev["splits"]["train"]["num_samples"] == 1797 and "kmeans" in ev["splits"]["train"]
    # One progress bar for the run (its start and end lines off a terminal), not one per epoch.
    bars = [line for line in re.split(r"[\r\n]", proc.stderr) if line.startswith("train:")]
    assert 1 <= len(bars) <= 3 and "epoch=1/1" in bars[-1]


def test_resume_auto_starts_fresh_then_continues_with_the_head_losses(tmp_path, digits_root):
    st = DistState()
    args = overrides(tmp_path, digits_root, **{"output.run_name": "auto", "train.resume": "auto",
                                                "output.kmeans": "false"})
    first = train(load_config("demo_digits", args), st)  # no checkpoint yet: starts
    # Resumed after its last epoch (as a job preempted during evaluation would be): no step runs, and
    # the head choice sees the saved final losses, not zeros.
    again = train(load_config("demo_digits", args), st)
    assert again["head_losses"] == first["head_losses"] and min(first["head_losses"]) < 0
    assert again["splits"]["train"]["scores"] == first["splits"]["train"]["scores"]
    strict = overrides(tmp_path, digits_root, **{"output.run_name": "fresh", "train.resume": "true"})
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(load_config("demo_digits", strict), st)
    with pytest.raises(ConfigError, match="train.resume"):
        load_config("demo_digits", ["train.resume=maybe"])
