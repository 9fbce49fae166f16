"""`checkpoint`: what a step checkpoint costs, and what the epoch-end interval saves a small set.

Part 1 ("write") writes the checkpoint of H heads (D -> hidden -> K) and their Adam state through the
job's own writer (TrainState.save: torch.save into a temporary file, fsync, rename, the newest 3 kept)
a few times, and reports its size and the median seconds per write. Part 2 ("job") runs the job
itself (`python -m scp_dist.train`, a child process) on a small set twice with one seed: with
train.checkpoint_min_seconds=0 (a checkpoint at every epoch end, as before the interval existed) and
at the config's own value, and reports the train stage's seconds (metrics.jsonl) and the ACC of each;
the ACC must be equal, since the interval changes no step. The lite0 configs' sets are small: an
epoch of the 200 faces is one step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import bench as B
from benchmarks import harness as H
from scp_dist.config import load_config
from scp_dist.models.head import SCPHead
from scp_dist.train import build_optimizer
from scp_dist.train_state import TrainState

COLUMNS = [H.Column("part", "part"), H.Column("what", "what"), H.Column("mib", "MiB", ".0f"),
           H.Column("seconds", "seconds", ".3f"), H.Column("steps", "steps"), H.Column("acc", "ACC", ".1f"),
           H.Column("vs_every", "time vs every epoch end", ".2f")]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--heads", nargs="+", type=int, default=[1, 5], help="head counts whose checkpoint is written")
    p.add_argument("--dim", type=int, default=1280, help="feature dimension D (EfficientNet-Lite0: 1280)")
    p.add_argument("--hidden", nargs="+", type=int, default=[1024, 786, 512, 1024])
    p.add_argument("--clusters", type=int, default=10)
    p.add_argument("--writes", type=int, default=5, help="writes per head count (the median is reported)")
    p.add_argument("--config", default="lfw_faces_lite0", help="the job of part 2 ('' skips it)")
    p.add_argument("--work", type=Path, default=None, help="run folders (default: a temporary folder)")
    p.add_argument("job_overrides", nargs="*", help="key=value for both runs of part 2")


def write_cost(heads: int, dim: int, hidden: list[int], k: int, writes: int, folder: Path) -> dict[str, Any]:
    head = SCPHead(dim, hidden, k, num_heads=heads, seed=0)
    opt = build_optimizer(load_config(None, [f"head.num_clusters={k}"]), head)
    head(torch.randn(4, dim)).sum().backward()
    opt.step()  # Adam's moments exist from the first step on: a checkpoint holds three copies of the head
    state = TrainState(head, opt, torch.amp.GradScaler("cpu", enabled=False), None, heads, torch.device("cpu"), 1)
    times = []
    for i in range(writes):
        state.step = i
        t0 = time.perf_counter()
        path = state.save(folder, "bench", {}, keep=3)
        times.append(time.perf_counter() - t0)
    return {"part": "write", "what": f"{heads} head(s), D {dim}, K {k}", "mib": path.stat().st_size / 2**20,
            "seconds": statistics.median(times)}


def job_run(config: str, folder: Path, min_seconds: float | None, overrides: list[str]) -> dict[str, Any]:
    name = "every_epoch_end" if min_seconds == 0 else "config_interval"
    keys = [*overrides, f"output.dir={folder}", f"output.run_name={name}", "output.report=false",
            "train.resume=false", "output.overwrite=true", *([f"train.checkpoint_min_seconds={min_seconds:g}"]
                                                             if min_seconds is not None else [])]
    rc, tail = H.run([sys.executable, "-m", "scp_dist.train", "--config", config, *keys])
    if rc != 0:
        raise RuntimeError(f"the job ({config}, {name}) exited {rc}:\n" + "\n".join(tail[-20:]))
    records = H.read_jsonl(folder / name / "metrics.jsonl")
    stage = next(r for r in records if r.get("kind") == "stage" and r.get("stage") == "train")
    ev = next(r for r in records if r.get("kind") == "eval")
    steps = max(r["step"] for r in records if r.get("kind") in ("step", "epoch"))
    cfg = load_config(config, keys)
    what = ("a checkpoint at every epoch end (checkpoint_min_seconds=0)" if min_seconds == 0 else
            f"at most one per {cfg.train.checkpoint_min_seconds:g} s (the config's)")
    return {"part": "job", "what": f"{config}: {what}", "seconds": stage["seconds"], "steps": steps,
            "acc": 100 * ev["splits"][cfg.data.train_split]["scores"]["acc"]}


def run(args: argparse.Namespace) -> B.BenchResult:
    rows: list[dict[str, Any]] = []
    params = {"heads": args.heads, "dim": args.dim, "hidden": args.hidden, "clusters": args.clusters,
              "writes": args.writes, "config": args.config, "job_overrides": args.job_overrides}
    notes = ["write: the median of the writes, each torch.save + fsync + rename of the head, its Adam "
             "moments and the run's position, as the job writes them"]
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for h in args.heads:
            rows.append(write_cost(h, args.dim, args.hidden, args.clusters, args.writes, Path(tmp) / f"w{h}"))
            print(f"  write, {h} head(s): {rows[-1]['mib']:.0f} MiB, {rows[-1]['seconds']:.3f} s", flush=True)
        if args.config:
            # Untimed: the built-in set's shards and the feature extraction, which both runs then share.
            job_run(args.config, Path(tmp), None, [*args.job_overrides, "train.max_steps=1"])
            every = job_run(args.config, Path(tmp), 0, args.job_overrides)
            interval = job_run(args.config, Path(tmp), None, args.job_overrides)
            for r in (every, interval):
                r["vs_every"] = r["seconds"] / every["seconds"]
            rows += [every, interval]
            notes.append("job: the train stage's seconds of one seed, both runs in this process's order on one "
                         "machine; equal ACC says the interval changed no step")
    return B.BenchResult("checkpoint", params, COLUMNS, rows, notes)
