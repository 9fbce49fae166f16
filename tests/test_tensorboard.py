"""TensorBoard event files (output.tensorboard=true), read back with TensorBoard's own reader: the
same step scalars as metrics.jsonl (the last record per step), the epoch and evaluation scalars, the
stage times and the report's figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scp_dist.config import load_config
from scp_dist.distributed import DistState
from scp_dist.report import read_metrics, step_records
from scp_dist.runlog import JsonlLog, close_mirror, mirror_metrics
from scp_dist.train import train
from tests.helpers import overrides

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                        reason="tensorboard not installed (the report extra)")
STEP_TERMS = ("loss", "l_e", "l_con", "entropy", "lr", "img_per_s")


def read_events(log_dir: Path):
    ea = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    return ea


def scalars(ea, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in ea.Scalars(tag)]


def assert_same(got: list[tuple[int, float]], want: list[tuple[int, float]], what: str = "") -> None:
    assert [s for s, _ in got] == [s for s, _ in want], what
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), what  # float32 in events


def test_a_resume_repeats_steps_and_tensorboard_keeps_the_last(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    mirror_metrics(metrics, tmp_path / "tb")
    log = JsonlLog(metrics)
    for s in range(1, 11):
        log.write(kind="step", step=s, epoch=0, lr=0.1, img_per_s=10.0, loss=float(s))
    log.close()
    close_mirror(metrics)
    # The job died after step 10; its last checkpoint was step 6: steps 7.. are logged again.
    mirror_metrics(metrics, tmp_path / "tb", purge_step=7)
    log = JsonlLog(metrics)
    log.write(kind="resume", step=6, epoch=0, world_size=1)
    for s in range(7, 13):
        log.write(kind="step", step=s, epoch=0, lr=0.1, img_per_s=10.0, loss=100.0 + s)
    log.close()
    close_mirror(metrics)
    want = [(r["step"], r["loss"]) for r in step_records(read_metrics(metrics))]
    assert want == [(s, float(s)) for s in range(1, 7)] + [(s, 100.0 + s) for s in range(7, 13)]
    assert_same(scalars(read_events(tmp_path / "tb"), "train/loss"), want)


@pytest.mark.slow
def test_a_run_mirrors_metrics_jsonl_into_tensorboard(tmp_path, digits_root):
    cfg = load_config("demo_digits", overrides(tmp_path, digits_root, **{
        "output.run_name": "tb", "train.epochs": 2, "output.tensorboard": "true", "output.report": "true"}))
    train(cfg, DistState())
    run = tmp_path / "runs" / "tb"
    records = read_metrics(run / "metrics.jsonl")
    steps = step_records(records)
    assert len(steps) == 2 * (1797 // 256)
    ea = read_events(run / "tensorboard")
    tags = ea.Tags()["scalars"]
    for term in STEP_TERMS:
        assert_same(scalars(ea, f"train/{term}"), [(r["step"], float(r[term])) for r in steps], term)
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert_same(scalars(ea, "epoch/loss"), [(r["step"], r["loss"][0]) for r in epochs])
    ev = json.loads((run / "eval.json").read_text())
    last = steps[-1]["step"]
    for method, key in (("scp", "scores"), ("kmeans", "kmeans")):
        for m in ("acc", "nmi", "ari"):
            assert_same(scalars(ea, f"eval/train/{method}/{m}"), [(last, ev["splits"]["train"][key][m])])
    stage_names = {r["stage"] for r in records if r["kind"] == "stage"}
    assert {"backbone", "train", "predict", "report", "report_html", "evaluate"} <= stage_names
    assert {f"stage/{n}/seconds" for n in stage_names} <= set(tags)
    # The report's figures, at the end.
    images = set(ea.Tags()["images"])
    assert {"report/training_curves", "report/feature_map", "report/confusion_train",
            "report/cluster_sizes"} <= images
    img = ea.Images("report/training_curves")[-1]
    assert img.step == last and img.width > 100 and img.height > 100


def test_tensorboard_without_the_package_fails_at_start_naming_the_key(monkeypatch):
    import importlib.util

    from scp_dist.config import ConfigError
    from scp_dist.train import check_tensorboard

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    check_tensorboard(load_config("demo_digits"))  # off by default: nothing to check
    with pytest.raises(ConfigError, match=r"output\.tensorboard.*scp_dist\[report\]"):
        check_tensorboard(load_config("demo_digits", ["output.tensorboard=true"]))
