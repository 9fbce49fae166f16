"""The benchmark suite at smoke sizes: each benchmark runs end to end through its CLI into a temp
results dir and markdown file. Numbers are never asserted, only that they exist and are positive
and finite, and that the report shows them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import bench as C
from benchmarks import harness as H
from benchmarks.bench.__main__ import main
from benchmarks.bench.scaling import ratios_to_linear, throughput

pytestmark = pytest.mark.bench


@pytest.fixture()
def out(tmp_path: Path) -> dict[str, Path]:
    return {"results": tmp_path / "results", "md": tmp_path / "BENCH.md", "cache": tmp_path / "cache"}


def _io(out: dict[str, Path]) -> list[str]:
    return ["--results-dir", str(out["results"]), "--markdown", str(out["md"])]


def check_result(out: dict[str, Path], name: str, numeric: list[str]) -> dict:
    kind = H.host_kind()
    path = out["results"] / f"{name}-{kind}.json"
    d = json.loads(path.read_text())
    assert d["schema"] == C.SCHEMA and d["name"] == name and d["host_kind"] == kind
    assert {"cpu", "cores", "torch", "gpu", "dali"} <= d["machine"].keys()
    assert d["rows"], "no rows"
    for row in d["rows"]:
        for key in numeric:
            v = row[key]
            assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, f"{name}: {key}={v!r}"
    md = out["md"].read_text()
    assert C.BEGIN_MARK in md and C.END_MARK in md
    assert f"### `{name}`" in md
    assert f"| {kind} |" in md  # the host column of this run's rows
    return d


@pytest.mark.slow
def test_data_benchmark(out):
    backends = ["torch", "dali"] if H.dali_importable() else ["torch"]
    main(["data", "--n", "24", "--width", "64", "--height", "48", "--batch", "8", "--image-size", "32",
          "--workers", "0", "--backends", *backends, "--no-cuda", "--cache-dir", str(out["cache"]), *_io(out)])
    d = check_result(out, "data", ["img_per_s", "views_per_s", "timed_images"])
    assert [r["backend"] for r in d["rows"]] == ["torch", "dali-cpu"][: len(backends)]
    assert all(r["timed_images"] == 16 for r in d["rows"])  # 3 batches of 8, the first is warm-up


@pytest.mark.slow
def test_step_benchmark(out):
    main(["step", "--device", "cpu", "--backbone", "timm", "--model", "tf_efficientnet_lite0", "--image-size", "32",
          "--batch", "2", "--steps", "1", "--warmup", "1", *_io(out)])
    d = check_result(out, "step", ["fwd_img_per_s", "step_img_per_s", "ratio", "fwd_s_median", "step_s_median"])
    row = d["rows"][0]
    assert row["precision"] == "fp32" and row["image_size"] == 32 and row["peak_mem_kind"]
    assert math.isfinite(row["peak_mem_mib"])


def test_head_benchmark(out):
    main(["head", "--devices", "cpu", "--n", "256", "--dim", "16", "--hidden", "32", "16", "--epochs", "2",
          "--batch", "64", "--heads", "3", *_io(out)])
    d = check_result(out, "head", ["epoch_s", "total_s", "est_paper_s", "vs_h1", "vs_h_runs", "steps"])
    assert [r["heads"] for r in d["rows"]] == [1, 3]  # H=1 added for the comparison
    assert d["rows"][0]["vs_h1"] == 1.0 and all(r["steps"] == 8 for r in d["rows"])
    assert all(math.isfinite(r["final_loss"]) for r in d["rows"])


@pytest.mark.slow
def test_checkpoint_benchmark(out, digits_root, tmp_path):
    main(["checkpoint", "--heads", "2", "--dim", "16", "--hidden", "32", "--clusters", "4", "--writes", "2",
          "--config", "demo_digits", "--work", str(tmp_path), *_io(out), "--", f"data.root={digits_root}",
          "data.prepare=", "train.mode=cached", "cache.num_pairs=1", "train.epochs=3", "train.global_batch=512",
          "output.kmeans=false"])
    d = check_result(out, "checkpoint", ["seconds"])
    write, every, interval = d["rows"]
    assert write["part"] == "write" and write["mib"] > 0
    assert every["steps"] == interval["steps"] == 3 * (1797 // 512)
    assert every["acc"] == interval["acc"]  # the interval changes no step
    assert every["vs_every"] == 1.0


@pytest.mark.slow
@pytest.mark.multiprocess
def test_scaling_benchmark_one_torchrun(out):
    main(["scaling", "--nprocs", "1", "--threads-per-rank", "1", "--device", "cpu", "--backbone", "pixels",
          "--image-size", "8", "--n", "64", "--width", "32", "--height", "24", "--batch", "16", "--steps", "3",
          "--log-every", "1", "--cache-dir", str(out["cache"]), *_io(out)])
    d = check_result(out, "scaling", ["img_per_s", "ratio_to_linear", "records", "run_s"])
    assert d["rows"][0]["ranks"] == 1 and d["rows"][0]["records"] == 2  # 3 step records, the first is warm-up


def test_throughput_and_ratio_to_linear():
    recs = [{"kind": "step", "img_per_s": 10.0}, {"kind": "step", "img_per_s": 100.0}, {"kind": "epoch"},
            {"kind": "step", "img_per_s": 300.0}]
    ips, used = throughput(recs, warmup_records=1)
    assert used == 2 and ips == pytest.approx(150.0)  # harmonic mean of 100 and 300
    rows = [{"ranks": 1, "img_per_s": 100.0}, {"ranks": 2, "img_per_s": 150.0}]
    ratios_to_linear(rows)
    assert rows[0]["ratio_to_linear"] == 1.0 and rows[1]["ratio_to_linear"] == pytest.approx(0.75)
    only_two = [{"ranks": 2, "img_per_s": 150.0}]
    ratios_to_linear(only_two)
    assert only_two[0]["ratio_to_linear"] is None


def _fake(name: str, kind: str, value: float) -> C.BenchResult:
    return C.BenchResult(name, {"n": 1}, [H.Column("x", "x value", ".1f")], [{"x": value}], notes=[f"from {kind}"],
                         machine={"cpu": "test cpu", "cores": 1, "torch": "0"}, host_kind=kind)


def test_markdown_keeps_hosts_side_by_side_and_text_around(tmp_path):
    res, md = tmp_path / "results", tmp_path / "B.md"
    md.write_text(f"# Mine\n\nhand-written intro\n\n{C.BEGIN_MARK}\nstale\n{C.END_MARK}\n\nhand-written outro\n")
    C.save_result(_fake("head", "cpu", 1.5), res)
    C.save_result(_fake("head", "nvidia-h100-80gb-hbm3", 0.4), res)
    C.save_result(_fake("data", "cpu", 7.0), res)
    (res / "junk.json").write_text("{not json")  # ignored, not fatal
    C.update_markdown(res, md)
    text = md.read_text()
    assert text.startswith("# Mine\n\nhand-written intro") and text.rstrip().endswith("hand-written outro")
    assert "stale" not in text
    assert "| cpu | 1.5 |" in text and "| nvidia-h100-80gb-hbm3 | 0.4 |" in text and "| cpu | 7.0 |" in text
    assert text.index("### `data`") < text.index("### `head`")  # fixed section order
    C.save_result(_fake("head", "cpu", 2.5), res)  # a rerun replaces that host's result
    C.update_markdown(res, md)
    text = md.read_text()
    assert "| cpu | 2.5 |" in text and "| cpu | 1.5 |" not in text and text.count(C.BEGIN_MARK) == 1


def test_markdown_created_when_missing(tmp_path):
    md = tmp_path / "new" / "B.md"
    C.update_markdown(tmp_path / "none", md)
    text = md.read_text()
    assert text.startswith("# Benchmarks") and "No results yet" in text


@pytest.mark.slow  # the recall part uses the session's tiny runs (trained first, seconds)
def test_search_benchmark(out, tiny_runs):
    main(["search", "--sizes", "500", "--dim", "16", "--queries", "8", "--single", "2", "--mixture-classes", "5",
          "--nprobe", "1", "0", "--runs", str(tiny_runs["stream"]), *_io(out)])
    d = check_result(out, "search", ["n", "dim", "single_ms", "batch_ms", "recall"])
    assert d["rows"][0]["index"] == "flat" and d["rows"][1]["index"].startswith("ivf")
    assert d["rows"][0]["recall"] == 1.0
    rec = json.loads((out["results"] / f"search_recall-{H.host_kind()}.json").read_text())
    assert [r["space"] for r in rec["rows"]] == ["features", "probs"]
    assert all(0 <= r["same_label"] <= 1 for r in rec["rows"]) and "### `search_recall`" in out["md"].read_text()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_streaming_benchmark(out):
    main(["streaming", "--n", "24", "--width", "64", "--height", "48", "--shard-size", "6", "--image-size", "16",
          "--batch", "6", "--workers", "0", "--repeats", "1", "--cache-dir", str(out["cache"]), *_io(out)])
    d = check_result(out, "streaming", ["read_per_s", "img_per_s", "read_vs_local", "loader_vs_local"])
    assert [r["source"] for r in d["rows"]] == ["local", "HTTP, range requests", "HTTP", "HTTP, cached (epoch 2)",
                                                "S3 (moto), ranges", "S3 (moto)"]
    assert all(r["timed_images"] == 18 for r in d["rows"])  # 4 batches of 6, the first is warm-up
