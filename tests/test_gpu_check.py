"""launch/gpu_check.sh before a GPU is there: its dry run end to end on the CPU (every part listed
with a status, a part whose package is hidden skipped with the reason, the committed results
untouched, $OUT filled), a forced failure and a timeout that make it fail, and its verdicts on
made-up results (a goal missed is `not met`, a stale file is not this run's)."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from benchmarks import bench as C
from benchmarks import gpu_check as G
from benchmarks import harness as H
from tests.helpers import REPO

PARTS = ["data_dali", "step_vit_b32", "step_vit_l14", "head", "kmeans", "gpu_tests", "scaling_nccl"]
STATUSES = {G.MET, G.NOT_MET, G.SKIPPED, G.FAILED, G.TIMED_OUT}


def gpu_check(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, dict]:
    work, out = tmp_path / "work", tmp_path / "out"
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "SCP_GPU_CHECK_WORK": str(work), "OUT": str(out), **env}
    proc = subprocess.run(["bash", "launch/gpu_check.sh", "--dry-run", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=400)
    summary = work / "results" / f"gpu_check-{H.host_kind()}.json"
    assert summary.is_file(), f"rc={proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    return proc, json.loads(summary.read_text())


@pytest.mark.slow
@pytest.mark.multiprocess
def test_dry_run_end_to_end_lists_every_part_and_skips_a_missing_package(tmp_path):
    committed = {p: p.stat().st_mtime for p in (REPO / "benchmarks" / "results").glob("*.json")}
    t0 = time.perf_counter()
    proc, summary = gpu_check(tmp_path, SCP_GPU_CHECK_HIDE="faiss")
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-4000:]
    parts = {p["part"]: p for p in summary["parts"]}
    assert list(parts) == PARTS and all(p["status"] in STATUSES for p in parts.values())
    assert parts["kmeans"]["status"] == G.SKIPPED and "missing faiss" in parts["kmeans"]["detail"]
    assert not [p for p in parts.values() if p["status"] in (G.FAILED, G.TIMED_OUT)], parts
    assert parts["gpu_tests"]["status"] == G.MET  # the GPU tests ran on the CPU and passed
    assert parts["data_dali"]["checks"][0]["value"].startswith(("dali-cpu", "no result"))
    table = proc.stdout[proc.stdout.index("GPU check summary"):]
    for name in PARTS:
        assert name in table
    assert "skipped: missing faiss" in table and "DRY RUN" in table
    # Results went to the scratch dir; the committed ones were not touched.
    assert {p: p.stat().st_mtime for p in committed} == committed
    results = tmp_path / "work" / "results"
    assert (results / f"step-{H.host_kind()}-vit-b-32.json").is_file()
    assert "### `head`" in (tmp_path / "work" / "BENCHMARKS.md").read_text()
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"gpu_check_results.tar.gz", "gpu_check.log", "gpu_check_summary.md",
                                               "gpu_check_summary.json"}
    with tarfile.open(out / "gpu_check_results.tar.gz") as tar:
        names = tar.getnames()
    assert f"results/head-{H.host_kind()}.json" in names and "gpu_check.log" in names
    assert "GPU check summary" in (out / "gpu_check.log").read_text()
    print(f"dry run: {wall:.0f} s")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_failed_or_timed_out_part_fails_the_check(tmp_path):
    proc, summary = gpu_check(tmp_path, "--only", "head", "kmeans", "--budget", "kmeans=1",
                              SCP_GPU_CHECK_FAIL="head")
    assert proc.returncode == 1, proc.stdout[-3000:]
    parts = {p["part"]: p for p in summary["parts"]}
    assert list(parts) == ["head", "kmeans"]
    assert parts["head"]["status"] == G.FAILED and "forced to fail" in parts["head"]["detail"]
    assert parts["kmeans"]["status"] == G.TIMED_OUT
    assert "1 failed, 1 timed out" in summary["totals"]


# --- verdicts on made-up results (no subprocess) -------------------------------------------------


def ctx(tmp_path: Path, dry: bool = False) -> G.Ctx:
    probe = {"modules": {}, "gpus": 1, "gpu_names": ["H"], "torch": "t", "cuda": "c", "python": "p"}
    return G.Ctx(dry, tmp_path, tmp_path / "B.md", tmp_path, "h100", 1, probe, part_start=time.time())


def save(c: G.Ctx, name: str, rows: list[dict], tag: str = "", **params) -> Path:
    r = C.BenchResult(name, params, [], rows, host_kind=c.host, tag=tag)
    return C.save_result(r, c.results_dir)


def test_step_ratio_below_goal_is_not_met_and_a_stale_file_is_no_result(tmp_path):
    c = ctx(tmp_path)
    row = {"ratio": 0.85, "backbone": "open_clip:ViT-B-32", "precision": "bf16", "fwd_img_per_s": 100.0,
           "step_img_per_s": 85.0}
    path = save(c, "step", [row], tag="vit-b-32")
    assert [x.status for x in G.judge_step("vit-b-32")(c)] == [G.NOT_MET]
    save(c, "step", [{**row, "ratio": 0.93}], tag="vit-b-32")
    assert [x.status for x in G.judge_step("vit-b-32")(c)] == [G.MET]
    os.utime(path, (time.time() - 3600,) * 2)  # written before this part started: an old run's
    assert G.judge_step("vit-b-32")(c)[0].value == G.NO_RESULT


def test_head_goal_per_head_count(tmp_path):
    c = ctx(tmp_path)
    rows = [{"heads": 1, "device": "cuda", "est_paper_s": 7.5, "epochs": 30, "precision": "bf16", "vs_h_runs": 1.0},
            {"heads": 5, "device": "cuda", "est_paper_s": 12.0, "epochs": 30, "precision": "bf16", "vs_h_runs": 0.32}]
    save(c, "head", rows)
    checks = G.judge_head(c)
    assert [x.status for x in checks] == [G.MET, G.NOT_MET] and "0.32 of 5 separate runs" in checks[1].value


def test_kmeans_on_cpu_only_is_not_met_on_a_gpu_host(tmp_path):
    c = ctx(tmp_path)
    save(c, "kmeans", [{"device": "cpu", "fit_s": 3.0, "acc": 1.0}], faiss_gpus=0)
    (check,) = G.judge_kmeans(c)
    assert check.status == G.NOT_MET and "sees 0 GPU" in check.value


def test_fallback_variant_and_skip_reasons(tmp_path):
    c = ctx(tmp_path)
    parts = {p.name: p for p in G.build_parts(c)}
    mods = {"omegaconf": {"ok": True}, "timm": {"ok": True}, "open_clip": {"ok": False, "error": "ImportError"}}
    variant, missing = G.pick_variant(parts["step_vit_l14"], mods)
    assert variant is not None and "--model" in variant.argv and "vit_large_patch14_clip_224" in variant.argv
    assert "open_clip missing" in variant.label and not missing
    c.probe["modules"] = {"omegaconf": {"ok": False, "error": "No module named 'omegaconf'"}}
    variant, missing = G.pick_variant(parts["head"], c.probe["modules"])
    reason = G.skip_reason(parts["head"], c, missing, 100)
    assert variant is None and reason.startswith("missing omegaconf (hard requirement); install omegaconf")
    assert G.skip_reason(parts["scaling_nccl"], c, [], 100) == "needs 2+ GPUs, this host has 1"
    assert G.skip_reason(parts["kmeans"], c, [], 3).startswith("no time left")


def test_junit_counts_and_error_line(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
                   '<testcase name="a"/><testcase name="b"><failure message="x"/></testcase>'
                   '<testcase name="c"><skipped/></testcase></testsuite></testsuites>')
    n = G.junit_counts(xml)
    assert (n["tests"], n["failures"], n["skipped"], n["failed"]) == (3, 1, 1, ["b"])
    verbose = ("tests/test_gpu.py::test_a[x-1] PASSED   [ 10%]\ntests/test_gpu.py::test_b FAILED   [ 20%]\n"
               "tests/test_gpu.py::test_c SKIPPED (no GPU)   [ 30%]\nFAILED tests/test_gpu.py::test_b - boom\n")
    v = G.verbose_counts(verbose)
    assert (v["tests"], v["failures"], v["skipped"], v["failed"]) == (3, 1, 1, ["test_b"])
    tail = ["Traceback (most recent call last):", '  File "x.py", line 1', "ValueError: bad --n", "", "done?"]
    assert G.error_line(tail) == "ValueError: bad --n"


def test_timed_out_part_keeps_the_verdicts_of_its_partial_rows():
    o = G.Outcome("head", "head training", G.TIMED_OUT, "stopped at its 60 s budget",
                  [G.Check("1 head: under 10 s", "7.00 s (partial)", G.MET)], 60.0)
    (row,) = G.summary_rows([o])
    assert row["status"] == "timed out: stopped at its 60 s budget (its rows: met)"
    assert G.totals([o]).endswith("1 timed out")
