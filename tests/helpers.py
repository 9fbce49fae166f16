"""Helpers shared by the test modules (which no longer import each other): config overrides for short
runs, the CLI runner, checkpoint readers, a data set of bad samples. Fixtures and hooks are in conftest.py."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch

from scp_dist.shards.sources import encode_png
from scp_dist.shards.writer import Sample, write_shards

REPO = Path(__file__).resolve().parent.parent


def overrides(tmp: Path, data_root: Path, **kw) -> list[str]:
    base = {
        "data.root": str(data_root),
        "output.dir": str(tmp / "runs"),
        "train.epochs": 2,
        "train.global_batch": 256,
        "train.log_every": 1,
        "data.num_workers": 0,
        "data.loader": "torch",
        "train.mode": "stream",  # the demo config's recipe is cached; these tests exercise streaming
        # The HTML report (t-SNE, figures: 10-30 s a run) is tested in tests/test_report.py, which turns it on.
        "output.report": "false",
    }
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


def run_cli(args: list[str], torchrun: int = 0) -> subprocess.CompletedProcess:
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    else:
        cmd = [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, "-m", "scp_dist.train", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def last_checkpoint(run: Path) -> dict:
    from scp_dist.checkpoint import list_checkpoints

    return torch.load(list_checkpoints(run)[-1], weights_only=False)


def head_params(run: Path) -> dict[str, torch.Tensor]:
    return last_checkpoint(run)["head"]


def bad_dataset(root: Path) -> Path:
    """Three shards: one with a corrupt PNG and a sample with no image, one truncated, one intact."""
    good = encode_png(np.full((8, 8, 3), 100, np.uint8))
    items = [Sample(f"k{i:03d}", good, "png", 0) for i in range(30)]
    items[3] = Sample("k003", b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, "png", 0)
    write_shards(items, root, source="t", split="train", classes=["a"], max_count=10, progress=False)
    # rewrite shard 0 so that sample k005 has a label but no image (same sample count)
    tar0 = root / "shard-000000.tar"
    with tarfile.open(tar0) as t:
        members = [(m.name, t.extractfile(m).read()) for m in t]
    with tarfile.open(tar0, "w") as t:
        for name, data in members:
            if name != "k005.png":
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    from scp_dist.shards.writer import write_index

    write_index(tar0, tar0.with_suffix(".idx"))
    tar1 = root / "shard-000001.tar"
    tar1.write_bytes(tar1.read_bytes()[:2048])  # truncated: most of shard 1 is gone
    return root


def tiny_run(tmp: Path, data_root: Path, name: str, **kw) -> Path:
    """A small finished run of the digits (pixels backbone, a narrow head, a few epochs, fast k-means),
    trained in this process in seconds, for the tools that use a finished run (predict, search)."""
    from dataclasses import fields

    from scp_dist.config import OutputConfig, load_config
    from scp_dist.distributed import DistState
    from scp_dist.train import train

    base = {"output.run_name": name, "train.epochs": 2, "optim.lr": 0.005, "head.hidden": "[64,32]",
            "output.kmeans_nredo": 1, "output.kmeans_niter": 10}
    if "report" in {f.name for f in fields(OutputConfig)}:
        base["output.report"] = "false"  # the HTML page costs more than this whole run
    base.update(kw)
    train(load_config("demo_digits", overrides(tmp, data_root, **base)), DistState())
    return tmp / "runs" / name


def split_to_files(split_dir: Path, out: Path) -> dict[str, Path]:
    """Every image of a shard split as a file `<key>.<ext>` in `out`, bytes as stored: key -> path."""
    from scp_dist.data.reader import SampleReader
    from scp_dist.shards.manifest import read_manifest

    reader = SampleReader(read_manifest(split_dir))
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for i in range(len(reader)):
        s = reader.read(i)
        files[s.key] = out / f"{s.key}.{s.ext}"
        files[s.key].write_bytes(s.image)
    return files
