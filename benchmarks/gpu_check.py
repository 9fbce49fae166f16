"""GPU acceptance in one run: every GPU measurement and GPU test against its goal, in one summary
(the parts: `--list`, and BENCHMARKS.md). `bash launch/gpu_check.sh` runs it; with `--dry-run` the
same parts run at tiny sizes on the CPU, so CI keeps it from rotting while no GPU is there.

Each part is a subprocess in its own process group with a time budget (killed at the budget; the
benchmarks write their rows as they go, so what was measured is kept); all parts share one deadline.
A part whose packages do not import, or that cannot run on this host, is skipped with the reason.
After every part the results, BENCHMARKS.md, the summary (gpu_check-<host>.json and the .md
rendered from it, again with `--render FILE.json`) and, where $OUT is set, copies of all of it are
rewritten, so a run killed from outside still returns what it measured.

Testing aids (tests/test_gpu_check.py): SCP_GPU_CHECK_HIDE="faiss nvidia.dali" makes those modules
fail to import in every part (shadow packages first on PYTHONPATH), as on a host that lacks them;
SCP_GPU_CHECK_FAIL="head" makes that part run a command that fails instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import bench as B
from benchmarks import harness as H
from scp_dist.fileio import atomic_write_text

MET, NOT_MET, SKIPPED, FAILED, TIMED_OUT = "met", "not met", "skipped", "failed", "timed out"
# Modules the parts import, probed once at the start (name -> distribution, for the version).
PROBED = {
    "scp_dist": None, "omegaconf": "omegaconf", "open_clip": "open_clip_torch", "timm": "timm",
    "nvidia.dali": None, "faiss": None, "pytest": "pytest", "scipy": "scipy", "sklearn": "scikit-learn",
    "PIL": "pillow", "webdataset": "webdataset", "triton": None,
}
# Every benchmark part loads the job's config: without omegaconf none of them can run.
HARD = ("scp_dist", "omegaconf")
INSTALL_HINT = {
    "omegaconf": "omegaconf (+ PyYAML)", "open_clip": "open_clip_torch (+ ftfy, regex, wcwidth)",
    "nvidia.dali": "nvidia-dali-cuda130 (+ nvidia-nvimgcodec-cu13, nvidia-nvjpeg)",
    "faiss": "faiss-gpu (CUDA build; faiss-cpu runs k-means on the CPU only)",
}
RESERVE_S = 8  # kept back from the deadline for the last summary and tarball
MIN_START_S = 15  # a part is not started with less time than this left
NO_RESULT = "no result file written"
PROBE_TIMEOUT_S = 120
SCHEMA = "scp_dist.gpu_check/v1"


# --- what a part is and what it gave ------------------------------------------------------------


@dataclass
class Variant:
    """One way to run a part: the modules it needs and its command after `python`."""

    requires: tuple[str, ...]
    argv: list[str]
    label: str = ""  # said in the summary when a fallback variant ran


@dataclass
class Check:
    goal: str
    value: str
    status: str  # met | not met


@dataclass
class Outcome:
    part: str
    title: str
    status: str  # met | not met | skipped | failed | timed out
    detail: str = ""  # the reason or one line of the error
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0
    budget_s: float = 0.0
    variant: str = ""


@dataclass
class Ctx:
    """What the parts' commands and judges need to know about this run."""

    dry: bool
    results_dir: Path
    markdown: Path
    work: Path
    host: str
    gpus: int
    probe: dict[str, Any]
    part_start: float = 0.0  # result files older than this are a previous run's

    def bench(self, name: str, *argv: str) -> list[str]:
        """A micro-benchmark's command, writing into this run's results and markdown as it goes."""
        return ["-m", "benchmarks.bench", name, *argv, "--results-dir", str(self.results_dir), "--markdown",
                str(self.markdown), "--save-partial"]


Judge = Callable[[Ctx], list[Check]]


@dataclass
class Part:
    name: str
    title: str
    budget_s: int
    variants: list[Variant]
    judge: Judge
    min_gpus: int = 1  # the dry run sets 0
    env: dict[str, str] = field(default_factory=dict)
    judged_rcs: tuple[int, ...] = (0,)  # exit codes that mean "ran, now judge it" (pytest: 1 = tests failed)


# --- judging results ----------------------------------------------------------------------------


def _fresh(path: Path, ctx: Ctx) -> bool:
    """A file from before the part started is a previous run's, not this part's measurement."""
    return path.is_file() and path.stat().st_mtime >= ctx.part_start - 1


def load_result(ctx: Ctx, name: str, tag: str = "") -> B.BenchResult | None:
    """This run's result of a benchmark (also a partial one), or None."""
    path = B.result_path(ctx.results_dir, name, ctx.host, tag)
    return B.BenchResult.from_json(H.load_json(path)) if _fresh(path, ctx) else None


def _partial(r: B.BenchResult) -> str:
    return " (partial)" if any(n.startswith("partial:") for n in r.notes) else ""


def judge_data(ctx: Ctx) -> list[Check]:
    want = "dali-cpu" if ctx.dry else "dali-cuda"
    goal = f"DALI {'CPU-mode' if ctx.dry else 'mixed (nvJPEG)'} decode + two views run through the train loader"
    r = load_result(ctx, "data")
    if r is None:
        return [Check(goal, NO_RESULT, NOT_MET)]
    rows = {b: [x for x in r.rows if x.get("backend") == b] for b in (want, "torch")}
    if not rows[want]:
        why = "; ".join(n for n in r.notes if want.split("-")[0] in n) or "no row"
        return [Check(goal, f"no {want} rows: {why}"[:200], NOT_MET)]
    best = max(rows[want], key=lambda x: x["img_per_s"])
    value = f"{want} {best['img_per_s']:.0f} images/s (workers {best['workers']})"
    if rows["torch"]:
        t = max(rows["torch"], key=lambda x: x["img_per_s"])
        value += f"; torch workers {t['img_per_s']:.0f} (workers {t['workers']})"
    return [Check(goal, value + _partial(r), MET)]


def judge_step(tag: str) -> Judge:
    def judge(ctx: Ctx) -> list[Check]:
        goal = "step/forward >= 0.9"
        r = load_result(ctx, "step", tag)
        if r is None:
            return [Check(goal, NO_RESULT, NOT_MET)]
        row = r.rows[0]
        value = (f"{row['ratio']:.3f} ({row['backbone']} {row['precision']}, forward {row['fwd_img_per_s']:.0f} "
                 f"images/s, step {row['step_img_per_s']:.0f})")
        return [Check(goal, value, MET if row["ratio"] >= 0.9 else NOT_MET)]
    return judge


def judge_head(ctx: Ctx) -> list[Check]:
    device = "cpu" if ctx.dry else "cuda"
    r = load_result(ctx, "head")
    if r is None:
        return [Check("30 epochs under 10 s", NO_RESULT, NOT_MET)]
    checks = []
    for row in (x for x in r.rows if x["device"] == device):
        # est_paper_s is s/epoch x 30: the measured total when the run had 30 epochs (the GPU run).
        value = f"{row['est_paper_s']:.2f} s ({row['epochs']} epochs measured, {row['precision']})"
        if row["heads"] > 1 and row.get("vs_h_runs") is not None:
            value += f", {row['vs_h_runs']:.2f} of {row['heads']} separate runs"
        goal = f"{row['heads']} head{'s in one pass' if row['heads'] > 1 else ''}: 30 epochs of 50,000 x 512 under 10 s"
        checks.append(Check(goal, value + _partial(r), MET if row["est_paper_s"] < 10 else NOT_MET))
    return checks or [Check("30 epochs under 10 s", f"no {device} rows", NOT_MET)]


def judge_kmeans(ctx: Ctx) -> list[Check]:
    device = "cpu" if ctx.dry else "gpu"
    goal = f"faiss k-means on the {device.upper()} (scp_dist.kmeans, evaluation defaults)"
    r = load_result(ctx, "kmeans")
    if r is None:
        return [Check(goal, NO_RESULT, NOT_MET)]
    rows = {x["device"]: x for x in r.rows}
    value = "; ".join(f"{d} fit {x['fit_s']:.2f} s, ACC {x['acc']:.3f}" for d, x in rows.items())
    if device not in rows:
        return [Check(goal, f"faiss sees {r.params.get('faiss_gpus', 0)} GPU(s); " + value, NOT_MET)]
    return [Check(goal, value + _partial(r), MET)]


def judge_scaling(ctx: Ctx) -> list[Check]:
    goal = "ratio to linear >= 0.9 at the most ranks"
    r = load_result(ctx, "scaling")
    if r is None:
        return [Check(goal, NO_RESULT, NOT_MET)]
    top = max(r.rows, key=lambda x: x["ranks"])
    ratio = top.get("ratio_to_linear")
    if ratio is None:
        return [Check(goal, f"{top['ranks']} ranks {top['img_per_s']:.0f} images/s, no 1-rank baseline", NOT_MET)]
    value = f"{ratio:.3f} ({top['ranks']} ranks on {top['device']}: {top['img_per_s']:.0f} images/s)"
    return [Check(goal, value + _partial(r), MET if ratio >= 0.9 else NOT_MET)]


def junit_counts(path: Path) -> dict[str, Any]:
    """tests / failures / errors / skipped and the failed test names from a pytest junit XML file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts: dict[str, Any] = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed"] = [f"{c.get('name')}" for c in root.iter("testcase")
                        if c.find("failure") is not None or c.find("error") is not None]
    return counts


def verbose_counts(text: str) -> dict[str, Any]:
    """The same counts from `pytest -v` lines (`path::test PASSED [ 10%]`): what a pytest stopped at
    its budget leaves, as it writes no junit XML."""
    verdicts = re.findall(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", text, re.MULTILINE)
    failed = [name.split("::", 1)[1] for name, v in verdicts if v in ("FAILED", "ERROR")]
    skipped = sum(v in ("SKIPPED", "XFAIL") for _, v in verdicts)
    return {"tests": len(verdicts), "failures": len(failed), "errors": 0, "skipped": skipped, "failed": failed}


def judge_pytest(ctx: Ctx) -> list[Check]:
    goal = "GPU tests pass" + (" (dry run: on the CPU)" if ctx.dry else "")
    junit, log = ctx.work / "junit-gpu.xml", ctx.work / "gpu_tests.out"
    if _fresh(junit, ctx):
        n = junit_counts(junit)
    elif _fresh(log, ctx) and (n := verbose_counts(log.read_text()))["tests"]:
        goal += " (the tests that finished)"  # stopped at its budget: no junit XML, only the -v lines
    else:
        return [Check(goal, NO_RESULT, NOT_MET)]
    ran = n["tests"] - n["skipped"]
    value = f"{ran - n['failures'] - n['errors']} passed, {n['failures'] + n['errors']} failed, {n['skipped']} skipped"
    if n["failed"]:
        value += ": " + ", ".join(n["failed"][:4])
    ok = n["failures"] + n["errors"] == 0 and ran > 0
    return [Check(goal, value, MET if ok else NOT_MET)]


# --- the parts ----------------------------------------------------------------------------------


def _step(ctx: Ctx, tag: str, clip: str, timm_model: str) -> list[Variant]:
    """The step benchmark on a CLIP tower (random weights); timm's same architecture where
    open_clip is missing. Dry run: a small ViT at 32 px, fp32, on the CPU."""
    if ctx.dry:
        size = ["--device", "cpu", "--precision", "fp32", "--image-size", "32", "--batch", "2", "--steps", "1",
                "--warmup", "1"]
        clip, timm_model = "ViT-S-32", "vit_small_patch32_224"
    else:
        size = ["--device", "cuda", "--precision", "bf16", "--image-size", "224", "--batch", "256", "--steps", "15",
                "--warmup", "3"]
    return [Variant(("omegaconf", "open_clip"), ctx.bench("step", *size, "--tag", tag, "--backbone", "open_clip",
                                                          "--model", clip)),
            Variant(("omegaconf", "timm"), ctx.bench("step", *size, "--tag", tag, "--backbone", "timm",
                                                     "--model", timm_model),
                    f"open_clip missing: timm's {timm_model} (same architecture)")]


def build_parts(ctx: Ctx) -> list[Part]:
    cache = ["--cache-dir", str(ctx.work / "bench_data")]
    if ctx.dry:
        data = ["--dali-devices", "cpu", "--workers", "0", "--n", "24", "--width", "64", "--height", "48",
                "--batch", "8", "--image-size", "32"]
        head = ["--devices", "cpu", "--n", "512", "--dim", "32", "--hidden", "32", "16", "--epochs", "2",
                "--batch", "64"]
        kmeans = ["--n", "600", "--dim", "16", "--niter", "5", "--nredo", "1", "--max-points", "0"]
        # One rank: two torchruns would double the dry run's longest part; the NCCL run is the GPU's.
        scaling = ["--device", "cpu", "--nprocs", "1", "--threads-per-rank", "1", "--backbone", "pixels",
                   "--image-size", "8", "--n", "64", "--width", "32", "--height", "24", "--batch", "16",
                   "--steps", "3", "--log-every", "1", "--timeout", "60"]
    else:
        # DALI on the GPU first (the point of the part), torch workers beside it for scale; DALI's
        # CPU mode is measured on the CPU hosts already.
        data = ["--dali-devices", "cuda", "--workers", "4", "8", "--n", "3072", "--batch", "128"]
        head = ["--devices", "cuda", "--n", "50000", "--dim", "512", "--epochs", "30"]
        kmeans = ["--n", "50000", "--dim", "512", "--devices", "auto"]
        ranks = sorted({1, max(ctx.gpus, 2)})  # two runs: 1 rank, one rank per GPU
        scaling = ["--device", "cuda", "--nprocs", *map(str, ranks), "--backbone", "open_clip", "--model", "ViT-B-32",
                   "--image-size", "224", "--n", "4096", "--width", "500", "--height", "375", "--batch", "512",
                   "--workers", "4", "--steps", "40", "--log-every", "10", "--timeout", "50"]
    pytest_argv = ["-m", "pytest", "tests/test_gpu.py", "-m", "gpu", "-v", "-rA", "-p", "no:cacheprovider",
                   "--junitxml", str(ctx.work / "junit-gpu.xml")]
    parts = [
        Part("data_dali", "data benchmark, DALI mixed decode", 90,
             [Variant(("omegaconf", "nvidia.dali"), ctx.bench("data", "--backends", "dali", "torch", "--keep-going",
                                                              *data, *cache))], judge_data),
        Part("step_vit_b32", "step vs forward, CLIP ViT-B/32 bf16", 70,
             _step(ctx, "vit-b-32", "ViT-B-32", "vit_base_patch32_clip_224"), judge_step("vit-b-32")),
        Part("step_vit_l14", "step vs forward, CLIP ViT-L/14 bf16", 80,
             _step(ctx, "vit-l-14", "ViT-L-14", "vit_large_patch14_clip_224"), judge_step("vit-l-14")),
        Part("head", "head training, 1 and 5 heads", 70,
             [Variant(("omegaconf",), ctx.bench("head", "--heads", "1", "5", *head))], judge_head),
        Part("kmeans", "faiss k-means", 45, [Variant(("faiss", "scipy", "sklearn"), ctx.bench("kmeans", *kmeans))],
             judge_kmeans),
        Part("gpu_tests", "pytest -m gpu", 130, [Variant(("pytest", "scp_dist"), pytest_argv)], judge_pytest,
             env={"SCP_GPU_TESTS_ON_CPU": "1"} if ctx.dry else {}, judged_rcs=(0, 1)),
        Part("scaling_nccl", "training job under torchrun (gloo, 1 rank)" if ctx.dry else
             "training job, 1 rank vs one per GPU (NCCL)", 120,
             [Variant(("omegaconf", "open_clip", "nvidia.dali"), ctx.bench("scaling", *scaling, "--loader", "dali",
                                                                           *cache)),
              Variant(("omegaconf", "open_clip"), ctx.bench("scaling", *scaling, *cache), "DALI missing: torch loader")],
             judge_scaling, min_gpus=2),
    ]
    for part in parts:
        part.min_gpus = 0 if ctx.dry else part.min_gpus
    return parts


# --- the probe: what imports on this host ---------------------------------------------------------


def probe() -> dict[str, Any]:
    """Import every module a part needs and describe the GPUs (run in a subprocess: the parts'
    environment, shadowed modules included)."""
    import importlib

    import torch

    mods: dict[str, dict[str, Any]] = {}
    for name, dist in PROBED.items():
        try:
            mod = importlib.import_module(name)
            mods[name] = {"ok": True, "version": (dist and H.version(dist)) or str(getattr(mod, "__version__", "") or "?")}
        except Exception as e:  # a broken install raises more than ImportError
            mods[name] = {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    out: dict[str, Any] = {
        "modules": mods, "python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": gpus > 0, "gpus": gpus, "gpu_names": [torch.cuda.get_device_name(i) for i in range(gpus)],
        "host": H.host_kind(), "dali": H.dali_version(),
    }
    if mods["faiss"]["ok"]:
        out["faiss_gpus"] = H.faiss_gpus()
    return out


def run_probe(python: str, env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run([python, "-m", "benchmarks.gpu_check", "--probe"], cwd=H.REPO, env=env, capture_output=True,
                          text=True, timeout=PROBE_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"probe failed (rc={proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def shadow_modules(names: list[str], root: Path) -> Path:
    """A directory that, first on PYTHONPATH, makes each named module fail to import (for testing
    what a host without it gets). Parents stay namespace packages, so `nvidia.dali` hides DALI
    only and not the other `nvidia.*` wheels."""
    shutil.rmtree(root, ignore_errors=True)
    for name in names:
        pkg = root.joinpath(*name.split("."))
        pkg.mkdir(parents=True, exist_ok=True)
        (pkg / "__init__.py").write_text(f"raise ModuleNotFoundError('{name} hidden by SCP_GPU_CHECK_HIDE')\n")
    return root


def child_env(hide: list[str], work: Path) -> dict[str, str]:
    """The parts' environment: the repository (not an install) first on PYTHONPATH, shadows before it."""
    path = [str(H.REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    if hide:
        path.insert(0, str(shadow_modules(hide, work / "hidden")))
    return H.child_env(PYTHONPATH=os.pathsep.join(dict.fromkeys(path)))


# --- running one part ---------------------------------------------------------------------------


def error_line(tail: list[str]) -> str:
    """The line that says what went wrong: the last exception line, else the last line."""
    lines = [x.strip() for x in tail if x.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Exit", "Interrupt")) and " " not in head:
            return line[:240]
    return (lines[-1] if lines else "no output")[:240]


def pick_variant(part: Part, modules: dict[str, dict[str, Any]]) -> tuple[Variant | None, list[str]]:
    """The first variant whose modules all import, else None and the first variant's missing ones."""
    first_missing: list[str] = []
    for v in part.variants:
        missing = [m for m in v.requires if not modules.get(m, {}).get("ok")]
        if not missing:
            return v, []
        first_missing = first_missing or missing
    return None, first_missing


def skip_reason(part: Part, ctx: Ctx, missing: list[str], left_s: float) -> str:
    if ctx.gpus < part.min_gpus:
        return f"needs {part.min_gpus}+ GPUs, this host has {ctx.gpus}"
    if missing:  # the import errors themselves are in the summary JSON's probe
        names = ", ".join(m + (" (hard requirement)" if m in HARD else "") for m in missing)
        return f"missing {names}; install " + ", ".join(INSTALL_HINT.get(m, m) for m in missing)
    if left_s < MIN_START_S:
        return f"no time left ({left_s:.0f} s before the deadline)"
    return ""


def run_part(part: Part, ctx: Ctx, python: str, env: dict[str, str], left_s: float, forced_fail: bool) -> Outcome:
    variant, missing = pick_variant(part, ctx.probe["modules"])
    out = Outcome(part.name, part.title, SKIPPED, skip_reason(part, ctx, missing, left_s))
    if out.detail or variant is None:
        return out
    out.variant, out.budget_s = variant.label, min(part.budget_s, left_s)
    cmd = [python, *variant.argv]
    if forced_fail:  # testing aid: the same plumbing with a command that fails
        cmd = [python, "-c", f"raise SystemExit('RuntimeError: {part.name} forced to fail (SCP_GPU_CHECK_FAIL)')"]
    print(f"\n=== {part.name}: {part.title} (budget {out.budget_s:.0f} s){' [' + variant.label + ']' if variant.label else ''}",
          flush=True)
    print("    $ " + " ".join(cmd), flush=True)
    ctx.part_start = time.time()
    t0 = time.perf_counter()
    rc, tail = H.run(cmd, {**env, **part.env}, out.budget_s, ctx.work / f"{part.name}.out")
    out.seconds = round(time.perf_counter() - t0, 1)
    try:  # also after a timeout or crash: the rows written so far still count
        checks = part.judge(ctx)
    except Exception as e:  # a half-written or foreign result must not stop the other parts
        checks = [Check(part.title, f"result unreadable: {type(e).__name__}: {e}"[:200], NOT_MET)]
    if rc is None:
        out.status, out.detail = TIMED_OUT, f"stopped at its {out.budget_s:.0f} s budget"
    elif rc not in part.judged_rcs:
        out.status, out.detail = FAILED, f"rc={rc}: {error_line(tail)}"
    else:
        out.status = MET if all(c.status == MET for c in checks) else NOT_MET
    out.checks = checks if out.status in (MET, NOT_MET) else [c for c in checks if c.value != NO_RESULT]
    return out


# --- the summary --------------------------------------------------------------------------------


def header(probe: dict[str, Any], host: str, dry: bool) -> list[str]:
    mods = probe["modules"]

    def ver(m: str) -> str:
        return mods[m]["version"] if mods.get(m, {}).get("ok") else "MISSING"

    dali = (probe.get("dali") or ver("nvidia.dali")) if mods.get("nvidia.dali", {}).get("ok") else "MISSING"
    faiss_gpus = f" (sees {probe['faiss_gpus']} GPU)" if "faiss_gpus" in probe else ""
    lines = [
        f"host {host}: {probe['gpus']} GPU(s) [{', '.join(probe['gpu_names']) or 'none'}], torch {probe['torch']} "
        f"(CUDA {probe['cuda']}), python {probe['python']}",
        f"DALI {dali}, open_clip {ver('open_clip')}, omegaconf {ver('omegaconf')}, timm {ver('timm')}, "
        f"faiss {ver('faiss')}{faiss_gpus}, triton {ver('triton')}",
    ]
    if not dry and not probe["gpus"]:
        lines.append("NO CUDA DEVICE visible to torch (driver older than this torch's CUDA, or CUDA_VISIBLE_DEVICES?): "
                     "the GPU parts are skipped; on a CPU host use --dry-run")
    hard = [m for m in HARD if not mods.get(m, {}).get("ok")]
    if hard:
        lines.append("HARD REQUIREMENT MISSING: " + ", ".join(f"{m} ({mods[m].get('error')})" for m in hard)
                     + ": every benchmark part needs it; pass --wheels DIR with its wheel")
    if dry:
        lines.append("DRY RUN: CPU, tiny sizes; the verdicts test the plumbing, not the goals")
    return lines


SUMMARY_COLUMNS = [H.Column(k, k) for k in ("part", "s", "status", "goal", "result")]


def summary_rows(outcomes: list[Outcome]) -> list[dict[str, str]]:
    rows = []
    for o in outcomes:
        label = o.status + (f": {o.detail}" if o.detail else "") + (f" [{o.variant}]" if o.variant else "")
        if not o.checks:
            rows.append({"part": o.part, "s": f"{o.seconds:.0f}", "status": label, "goal": o.title, "result": "-"})
        for i, c in enumerate(o.checks):
            # A timed-out or failed part keeps the verdicts of what it wrote before it stopped.
            status = c.status if o.status in (MET, NOT_MET) else f"{label} (its rows: {c.status})"
            rows.append({"part": o.part if i == 0 else "", "s": f"{o.seconds:.0f}" if i == 0 else "",
                         "status": status, "goal": c.goal, "result": c.value})
    return rows


def totals(outcomes: list[Outcome]) -> str:
    counts = {s: sum(o.status == s for o in outcomes) for s in (MET, NOT_MET, SKIPPED, FAILED, TIMED_OUT)}
    return ", ".join(f"{n} {s}" for s, n in counts.items())


def outcomes_of(record: dict[str, Any]) -> list[Outcome]:
    return [Outcome(**{**p, "checks": [Check(**c) for c in p["checks"]]}) for p in record["parts"]]


def render(record: dict[str, Any], text: bool = False) -> str:
    """The summary of a gpu_check-<host>.json: markdown, or (text) the table for the log."""
    outcomes = outcomes_of(record)
    head = header(record["probe"], record["host"], record["dry_run"])
    table = H.table(SUMMARY_COLUMNS, summary_rows(outcomes), text=text)
    if text:
        return "\n".join(["", "=" * 30 + " GPU check summary " + "=" * 30, *head, "", table, "",
                          f"parts: {totals(outcomes)}; wall {record['wall_s']:.0f} s; results in {record['results_dir']}"])
    return "\n".join([f"# GPU check on {record['host']}", "", *[f"- {h}" for h in head], "", table, "",
                      f"Parts: {totals(outcomes)}; wall {record['wall_s']:.0f} s.", ""])


def write_outputs(ctx: Ctx, outcomes: list[Outcome], pending: list[str], t_start: float, log: Path | None,
                  out_dir: Path | None) -> dict[str, Any]:
    """Everything a killed run should still leave behind: markdown, summary, and the $OUT copies."""
    B.update_markdown(ctx.results_dir, ctx.markdown)
    record = {"schema": SCHEMA, "host": ctx.host, "dry_run": ctx.dry, "probe": ctx.probe, "created": H.now(),
              "wall_s": round(time.time() - t_start, 1), "totals": totals(outcomes),
              "parts": [asdict(o) for o in outcomes], "not_run_yet": pending, "results_dir": str(ctx.results_dir)}
    stem = ctx.results_dir / f"gpu_check-{ctx.host}"
    H.save_json(stem.with_suffix(".json"), record)
    atomic_write_text(stem.with_suffix(".md"), render(record))
    if out_dir is not None:
        copy_to_out(ctx, t_start, log, out_dir, stem)
    return record


def copy_to_out(ctx: Ctx, t_start: float, log: Path | None, out_dir: Path, stem: Path) -> None:
    """$OUT gets at most a few flat files: the summary, the log and one tarball of this run's files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [p for p in sorted(ctx.results_dir.glob("*")) if p.is_file() and p.stat().st_mtime >= t_start - 1]
    tmp = out_dir / "gpu_check_results.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for p in files:
            tar.add(p, arcname=f"results/{p.name}")
        for p in [ctx.markdown, ctx.work / "junit-gpu.xml", *([log] if log else [])]:
            if p.is_file():
                tar.add(p, arcname=p.name)
    tmp.replace(out_dir / "gpu_check_results.tar.gz")
    shutil.copyfile(stem.with_suffix(".md"), out_dir / "gpu_check_summary.md")
    shutil.copyfile(stem.with_suffix(".json"), out_dir / "gpu_check_summary.json")
    if log and log.is_file():
        shutil.copyfile(log, out_dir / "gpu_check.log")


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (what CI runs)")
    p.add_argument("--results-dir", type=Path, default=None,
                   help="default: benchmarks/results (dry run: <work>/results, never the committed results)")
    p.add_argument("--markdown", type=Path, default=None, help="default: BENCHMARKS.md (dry run: <work>/BENCHMARKS.md)")
    p.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "scp_gpu_check",
                   help="scratch: synthetic data, junit XML, shadow modules")
    p.add_argument("--total-s", type=float, default=None, help="deadline for all parts, counted from --started (default 390: done within 7 minutes; dry run 300)")
    p.add_argument("--started", type=float, default=None, help="epoch seconds the deadline counts from (the shell's start)")
    p.add_argument("--only", nargs="+", default=None, help="run only these parts (the rest are not listed)")
    p.add_argument("--budget", nargs="+", default=[], metavar="PART=S", help="override a part's time budget")
    p.add_argument("--strict", action="store_true", help="exit 1 also when a goal is not met")
    p.add_argument("--log", type=Path, default=None, help="the log the shell writes (copied to $OUT)")
    p.add_argument("--list", action="store_true", help="list the parts and exit")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="only re-render a stored summary (gpu_check-<host>[-tag].json) into the .md beside it")
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def select_parts(parts: list[Part], args: argparse.Namespace) -> list[Part]:
    names = [p.name for p in parts]
    for want in args.only or []:
        if want not in names:
            raise SystemExit(f"--only: no part {want!r}; parts: {', '.join(names)}")
    for spec in args.budget:
        name, _, secs = spec.partition("=")
        if name not in names or not secs:
            raise SystemExit(f"--budget {spec!r}: expected PART=SECONDS with PART one of {', '.join(names)}")
        next(p for p in parts if p.name == name).budget_s = int(float(secs))
    return [p for p in parts if not args.only or p.name in args.only]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe:
        print(json.dumps(probe()))
        return 0
    if args.render:
        atomic_write_text(args.render.with_suffix(".md"), render(H.load_json(args.render)))
        print(f"updated {args.render.with_suffix('.md')}")
        return 0
    t_start = args.started or time.time()
    deadline = t_start + (args.total_s or (300.0 if args.dry_run else 390.0))
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    results_dir = args.results_dir or (work / "results" if args.dry_run else H.RESULTS)
    markdown = args.markdown or (work / "BENCHMARKS.md" if args.dry_run else B.MARKDOWN)
    results_dir.mkdir(parents=True, exist_ok=True)
    hide = os.environ.get("SCP_GPU_CHECK_HIDE", "").replace(",", " ").split()
    fail = set(os.environ.get("SCP_GPU_CHECK_FAIL", "").replace(",", " ").split())
    env = child_env(hide, work)
    info = run_probe(sys.executable, env)
    ctx = Ctx(args.dry_run, results_dir, markdown, work, info["host"], info["gpus"], info)
    parts = select_parts(build_parts(ctx), args)
    if args.list:
        for p in parts:
            print(f"{p.name:<14} {p.budget_s:>4} s  {p.title}")
        return 0
    print("\n".join(header(ctx.probe, ctx.host, ctx.dry)), flush=True)
    if hide:
        print(f"hidden from every part (SCP_GPU_CHECK_HIDE): {', '.join(hide)}")
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    outcomes: list[Outcome] = []
    record: dict[str, Any] = {}
    for i, part in enumerate(parts):
        o = run_part(part, ctx, sys.executable, env, deadline - time.time() - RESERVE_S, part.name in fail)
        outcomes.append(o)
        print(f"--- {o.part}: {o.status}{': ' + o.detail if o.detail else ''} ({o.seconds:.0f} s)", flush=True)
        record = write_outputs(ctx, outcomes, [p.name for p in parts[i + 1:]], t_start, args.log, out_dir)
    if record:
        print(render(record, text=True), flush=True)
    bad = {FAILED, TIMED_OUT} | ({NOT_MET} if args.strict else set())
    return 1 if any(o.status in bad for o in outcomes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
