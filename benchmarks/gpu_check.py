"""GPU acceptance in one run: every GPU measurement and GPU test, each against its goal, in one
summary. `bash launch/gpu_check.sh` runs this (after installing missing packages from --wheels);
`bash launch/gpu_check.sh --dry-run` runs the same parts at tiny sizes on the CPU, so CI keeps it
from rotting while no GPU is there.

Parts, most valuable first (GPU time is scarce and a run may be cut short):
  data_dali     the data benchmark through DALI's mixed (nvJPEG) decode + GPU views, torch workers beside
  step_vit_b32  training step vs backbone forward, CLIP ViT-B/32, random weights, bf16 (goal >= 0.9)
  step_vit_l14  the same with CLIP ViT-L/14
  head          30 epochs of head training on 50,000 x 512 cached features, 1 and 5 heads (goal < 10 s)
  kmeans        faiss k-means (scp_dist.kmeans) on 50,000 x 512, on the GPU when faiss sees one
  gpu_tests     pytest -m gpu tests/test_gpu.py (DALI mixed vs CPU decode, bf16, compile, faiss, NCCL)
  scaling_nccl  the training job under torchrun, one rank per GPU over NCCL (2+ GPUs only)

Each part is a subprocess in its own process group with a time budget (killed at the budget; the
benchmarks write their rows as they go, so what was measured is kept) and all parts share one
deadline. A part whose packages do not import is skipped with the reason; one that cannot run on
this host (too few GPUs, no time left) too. After every part: the benchmark JSON under the results
dir, BENCHMARKS.md re-rendered, the summary (gpu_check-<host>.json / .md) rewritten and, where $OUT
is set, the summary, the log and a tarball of all of it copied there, so a run killed from outside
still returns what it measured.

Testing aids (environment variables, used by tests/test_gpu_check.py):
  SCP_GPU_CHECK_HIDE="faiss nvidia.dali"  those modules fail to import in every part (shadow packages
                                          first on PYTHONPATH), as on a host that lacks them
  SCP_GPU_CHECK_FAIL="head"               that part runs a command that fails instead
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.bench import common as C
from scp_dist.fileio import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
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

    @property
    def bench(self) -> list[str]:
        return ["-m", "benchmarks.bench"]

    def io(self) -> list[str]:
        return ["--results-dir", str(self.results_dir), "--markdown", str(self.markdown), "--save-partial"]


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


# --- reading results ----------------------------------------------------------------------------


def load_result(ctx: Ctx, name: str, tag: str = "") -> C.BenchResult | None:
    """This run's result of a benchmark (also a partial one), or None: a file from before the part
    started is a previous run's and is not this part's measurement."""
    path = C.result_path(ctx.results_dir, name, ctx.host, tag)
    if not path.is_file() or path.stat().st_mtime < ctx.part_start - 1:
        return None
    return C.BenchResult.from_json(json.loads(path.read_text()))


def _partial(r: C.BenchResult) -> str:
    return " (partial)" if any(n.startswith("partial:") for n in r.notes) else ""


def _missing(what: str) -> list[Check]:
    return [Check(what, NO_RESULT, NOT_MET)]


def judge_data(ctx: Ctx) -> list[Check]:
    want = "dali-cpu" if ctx.dry else "dali-cuda"
    goal = f"DALI {'CPU-mode' if ctx.dry else 'mixed (nvJPEG)'} decode + two views run through the train loader"
    r = load_result(ctx, "data")
    if r is None:
        return _missing(goal)
    rows = [x for x in r.rows if x.get("backend") == want]
    if not rows:
        why = "; ".join(n for n in r.notes if want.split("-")[0] in n) or "no row"
        return [Check(goal, f"no {want} rows: {why}"[:200], NOT_MET)]
    best = max(rows, key=lambda x: x["img_per_s"])
    value = f"{want} {best['img_per_s']:.0f} images/s (workers {best['workers']})"
    torch_rows = [x for x in r.rows if x.get("backend") == "torch"]
    if torch_rows:
        t = max(torch_rows, key=lambda x: x["img_per_s"])
        value += f"; torch workers {t['img_per_s']:.0f} (workers {t['workers']})"
    return [Check(goal, value + _partial(r), MET)]


def judge_step(tag: str) -> Judge:
    def judge(ctx: Ctx) -> list[Check]:
        goal = "step/forward >= 0.9"
        r = load_result(ctx, "step", tag)
        if r is None:
            return _missing(goal)
        row = r.rows[0]
        value = (f"{row['ratio']:.3f} ({row['backbone']} {row['precision']}, forward {row['fwd_img_per_s']:.0f} "
                 f"images/s, step {row['step_img_per_s']:.0f})")
        return [Check(goal, value, MET if row["ratio"] >= 0.9 else NOT_MET)]
    return judge


def judge_head(ctx: Ctx) -> list[Check]:
    device = "cpu" if ctx.dry else "cuda"
    r = load_result(ctx, "head")
    if r is None:
        return _missing("30 epochs under 10 s")
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
        return _missing(goal)
    rows = {x["device"]: x for x in r.rows}
    parts = [f"{d} fit {x['fit_s']:.2f} s, ACC {x['acc']:.3f}" for d, x in rows.items()]
    if device not in rows:
        return [Check(goal, f"faiss sees {r.params.get('faiss_gpus', 0)} GPU(s); " + "; ".join(parts), NOT_MET)]
    return [Check(goal, "; ".join(parts) + _partial(r), MET)]


def judge_scaling(ctx: Ctx) -> list[Check]:
    goal = "ratio to linear >= 0.9 at the most ranks"
    r = load_result(ctx, "scaling")
    if r is None:
        return _missing(goal)
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


def _fresh(path: Path, ctx: Ctx) -> bool:
    return path.is_file() and path.stat().st_mtime >= ctx.part_start - 1


def judge_pytest(ctx: Ctx) -> list[Check]:
    goal = "GPU tests pass" + (" (dry run: on the CPU)" if ctx.dry else "")
    junit, log = ctx.work / "junit-gpu.xml", ctx.work / "gpu_tests.out"
    if _fresh(junit, ctx):
        n = junit_counts(junit)
    elif _fresh(log, ctx) and (n := verbose_counts(log.read_text()))["tests"]:
        goal += " (the tests that finished)"  # stopped at its budget: no junit XML, only the -v lines
    else:
        return _missing(goal)
    ran = n["tests"] - n["skipped"]
    value = f"{ran - n['failures'] - n['errors']} passed, {n['failures'] + n['errors']} failed, {n['skipped']} skipped"
    if n["failed"]:
        value += ": " + ", ".join(n["failed"][:4])
    ok = n["failures"] + n["errors"] == 0 and ran > 0
    return [Check(goal, value, MET if ok else NOT_MET)]


# --- the parts ----------------------------------------------------------------------------------


def _step(ctx: Ctx, tag: str, clip: str, timm_model: str, small: str) -> list[Variant]:
    """The step benchmark on a CLIP tower (random weights); timm's same architecture where
    open_clip is missing. Dry run: a small ViT at 32 px, fp32, on the CPU."""
    if ctx.dry:
        size = ["--device", "cpu", "--precision", "fp32", "--image-size", "32", "--batch", "2", "--steps", "1",
                "--warmup", "1"]
        models = (small, "vit_small_patch32_224")
    else:
        size = ["--device", "cuda", "--precision", "bf16", "--image-size", "224", "--batch", "256", "--steps", "15",
                "--warmup", "3"]
        models = (clip, timm_model)
    base = [*ctx.bench, "step", *size, "--tag", tag, *ctx.io()]
    return [Variant(("omegaconf", "open_clip"), [*base, "--backbone", "open_clip", "--model", models[0]]),
            Variant(("omegaconf", "timm"), [*base, "--backbone", "timm", "--model", models[1]],
                    f"open_clip missing: timm's {models[1]} (same architecture)")]


def build_parts(ctx: Ctx) -> list[Part]:
    d = ctx.dry
    cache = ["--cache-dir", str(ctx.work / "bench_data")]
    if d:
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
             [Variant(("omegaconf", "nvidia.dali"), [*ctx.bench, "data", "--backends", "dali", "torch", "--keep-going", *data,
                                                      *cache, *ctx.io()])], judge_data),
        Part("step_vit_b32", "step vs forward, CLIP ViT-B/32 bf16", 70,
             _step(ctx, "vit-b-32", "ViT-B-32", "vit_base_patch32_clip_224", "ViT-S-32"), judge_step("vit-b-32")),
        Part("step_vit_l14", "step vs forward, CLIP ViT-L/14 bf16", 80,
             _step(ctx, "vit-l-14", "ViT-L-14", "vit_large_patch14_clip_224", "ViT-S-32"), judge_step("vit-l-14")),
        Part("head", "head training, 1 and 5 heads", 70,
             [Variant(("omegaconf",), [*ctx.bench, "head", "--heads", "1", "5", *head, *ctx.io()])], judge_head),
        Part("kmeans", "faiss k-means", 45,
             [Variant(("faiss", "scipy", "sklearn"), [*ctx.bench, "kmeans", *kmeans, *ctx.io()])], judge_kmeans),
        Part("gpu_tests", "pytest -m gpu", 130, [Variant(("pytest", "scp_dist"), pytest_argv)], judge_pytest,
             env={"SCP_GPU_TESTS_ON_CPU": "1"} if d else {}, judged_rcs=(0, 1)),
        Part("scaling_nccl", "training job, 1 rank vs one per GPU (NCCL)" if not d else
             "training job under torchrun (gloo, 1 rank)", 120,
             [Variant(("omegaconf", "open_clip", "nvidia.dali"), [*ctx.bench, "scaling", *scaling, "--loader", "dali",
                                                                  *cache, *ctx.io()]),
              Variant(("omegaconf", "open_clip"), [*ctx.bench, "scaling", *scaling, *cache, *ctx.io()],
                      "DALI missing: torch loader")],
             judge_scaling, min_gpus=2),
    ]
    for part in parts:
        part.min_gpus = 0 if d else part.min_gpus
    return parts


# --- the probe: what imports on this host ---------------------------------------------------------


def _version(module: str, dist: str | None) -> str:
    import importlib.metadata

    if dist:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(dist)
    mod = sys.modules.get(module)
    return str(getattr(mod, "__version__", "")) or "?"


def probe() -> dict[str, Any]:
    """Import every module a part needs and describe the GPUs (run in a subprocess: the parts'
    environment, shadowed modules included)."""
    import importlib

    import torch

    mods: dict[str, dict[str, Any]] = {}
    for name, dist in PROBED.items():
        try:
            importlib.import_module(name)
            mods[name] = {"ok": True, "version": _version(name, dist)}
        except Exception as e:  # a broken install raises more than ImportError
            mods[name] = {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}
    cuda = torch.cuda.is_available()
    out: dict[str, Any] = {
        "modules": mods, "python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": cuda, "gpus": torch.cuda.device_count() if cuda else 0,
        "gpu_names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "host": C.host_kind(), "dali": C.dali_version(),
    }
    if mods["faiss"]["ok"]:
        import faiss

        out["faiss_gpus"] = int(getattr(faiss, "get_num_gpus", lambda: 0)())
    return out


def run_probe(python: str, env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run([python, "-m", "benchmarks.gpu_check", "--probe"], cwd=REPO, env=env, capture_output=True,
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


# --- running one part ---------------------------------------------------------------------------


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the part's process group (its DataLoader workers and torchrun ranks too), SIGKILL
    whatever is left after a grace period."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_command(cmd: list[str], env: dict[str, str], budget_s: float,
                output: Path) -> tuple[int | None, list[str]]:
    """Run `cmd` with its output streamed to ours and to `output` (what a judge can still read
    after a timeout); (return code or None at the budget, last lines)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, errors="replace", start_new_session=True)
    tail: deque[str] = deque(maxlen=80)

    def pump() -> None:
        assert proc.stdout is not None
        with output.open("w") as f:
            for line in proc.stdout:
                sys.stdout.write("  | " + line)
                sys.stdout.flush()
                f.write(line)
                f.flush()
                tail.append(line.rstrip())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc: int | None = proc.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        rc = None
    reader.join(timeout=10)  # a grandchild outside the group may hold the pipe: do not wait for it
    return rc, list(tail)


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
    out = Outcome(part.name, part.title, SKIPPED)
    reason = skip_reason(part, ctx, missing, left_s)
    if reason:
        out.detail = reason
        return out
    assert variant is not None
    out.variant = variant.label
    out.budget_s = min(part.budget_s, left_s)
    cmd = [python, *variant.argv]
    if forced_fail:  # testing aid: the same plumbing with a command that fails
        cmd = [python, "-c", f"raise SystemExit('RuntimeError: {part.name} forced to fail (SCP_GPU_CHECK_FAIL)')"]
    print(f"\n=== {part.name}: {part.title} (budget {out.budget_s:.0f} s){' [' + variant.label + ']' if variant.label else ''}",
          flush=True)
    print("    $ " + " ".join(cmd), flush=True)
    ctx.part_start = time.time()
    t0 = time.perf_counter()
    rc, tail = run_command(cmd, {**env, **part.env}, out.budget_s, ctx.work / f"{part.name}.out")
    out.seconds = round(time.perf_counter() - t0, 1)
    try:  # also after a timeout or crash: the rows written so far still count
        checks = part.judge(ctx)
    except Exception as e:  # a half-written or foreign result must not stop the other parts
        checks = [Check(part.title, f"result unreadable: {type(e).__name__}: {e}"[:200], NOT_MET)]
    if rc is None:
        out.status, out.detail = TIMED_OUT, f"stopped at its {out.budget_s:.0f} s budget"
        out.checks = [c for c in checks if c.value != NO_RESULT]
    elif rc not in part.judged_rcs:
        out.status, out.detail = FAILED, f"rc={rc}: {error_line(tail)}"
        out.checks = [c for c in checks if c.value != NO_RESULT]
    else:
        out.checks = checks
        out.status = MET if all(c.status == MET for c in checks) else NOT_MET
    return out


# --- the summary --------------------------------------------------------------------------------


def header(ctx: Ctx) -> list[str]:
    p = ctx.probe
    mods = p["modules"]

    def ver(m: str) -> str:
        return mods[m]["version"] if mods.get(m, {}).get("ok") else "MISSING"

    gpus = ", ".join(p["gpu_names"]) or "none"
    dali = (p.get("dali") or ver("nvidia.dali")) if mods.get("nvidia.dali", {}).get("ok") else "MISSING"
    faiss_gpus = f" (sees {p['faiss_gpus']} GPU)" if "faiss_gpus" in p else ""
    lines = [
        f"host {ctx.host}: {p['gpus']} GPU(s) [{gpus}], torch {p['torch']} (CUDA {p['cuda']}), python {p['python']}",
        f"DALI {dali}, open_clip {ver('open_clip')}, omegaconf {ver('omegaconf')}, timm {ver('timm')}, "
        f"faiss {ver('faiss')}{faiss_gpus}, triton {ver('triton')}",
    ]
    if not ctx.dry and not p["gpus"]:
        lines.append("NO CUDA DEVICE visible to torch (driver older than this torch's CUDA, or CUDA_VISIBLE_DEVICES?): "
                     "the GPU parts are skipped; on a CPU host use --dry-run")
    hard = [m for m in HARD if not mods.get(m, {}).get("ok")]
    if hard:
        lines.append("HARD REQUIREMENT MISSING: " + ", ".join(f"{m} ({mods[m].get('error')})" for m in hard)
                     + ": every benchmark part needs it; pass --wheels DIR with its wheel")
    if ctx.dry:
        lines.append("DRY RUN: CPU, tiny sizes; the verdicts test the plumbing, not the goals")
    return lines


def summary_rows(outcomes: list[Outcome]) -> list[dict[str, str]]:
    rows = []
    for o in outcomes:
        label = o.status + (f": {o.detail}" if o.detail else "")
        if o.variant:
            label += f" [{o.variant}]"
        if not o.checks:
            rows.append({"part": o.part, "s": f"{o.seconds:.0f}", "status": label, "goal": o.title, "result": "-"})
        for i, c in enumerate(o.checks):
            # A timed-out or failed part keeps the verdicts of what it wrote before it stopped.
            status = c.status if o.status in (MET, NOT_MET) else f"{label} (its rows: {c.status})"
            rows.append({"part": o.part if i == 0 else "", "s": f"{o.seconds:.0f}" if i == 0 else "",
                         "status": status, "goal": c.goal, "result": c.value})
    return rows


SUMMARY_COLUMNS = [C.Column("part", "part"), C.Column("s", "s"), C.Column("status", "status"),
                   C.Column("goal", "goal"), C.Column("result", "result")]


def text_table(rows: list[dict[str, str]]) -> str:
    """Left-aligned (the cells are sentences), status before the long columns."""
    cells = [[c.header for c in SUMMARY_COLUMNS]] + [[r[c.key] for c in SUMMARY_COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(SUMMARY_COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def totals(outcomes: list[Outcome]) -> str:
    counts = {s: sum(o.status == s for o in outcomes) for s in (MET, NOT_MET, SKIPPED, FAILED, TIMED_OUT)}
    return ", ".join(f"{n} {s}" for s, n in counts.items())


def text_summary(ctx: Ctx, outcomes: list[Outcome], wall_s: float) -> str:
    rows = summary_rows(outcomes)
    lines = ["", "=" * 30 + " GPU check summary " + "=" * 30, *header(ctx), "", text_table(rows),
             "", f"parts: {totals(outcomes)}; wall {wall_s:.0f} s; results in {ctx.results_dir}"]
    return "\n".join(lines)


def markdown_summary(ctx: Ctx, outcomes: list[Outcome], wall_s: float) -> str:
    lines = [f"# GPU check on {ctx.host}", "", *[f"- {h}" for h in header(ctx)], "",
             C.markdown_table(SUMMARY_COLUMNS, summary_rows(outcomes)), "",
             f"Parts: {totals(outcomes)}; wall {wall_s:.0f} s.", ""]
    return "\n".join(lines)


def write_outputs(ctx: Ctx, outcomes: list[Outcome], pending: list[str], t_start: float, log: Path | None,
                  out_dir: Path | None) -> None:
    """Everything a killed run should still leave behind: markdown, summary, and the $OUT copies."""
    wall = time.time() - t_start
    C.update_markdown(ctx.results_dir, ctx.markdown)
    record = {"schema": "scp_dist.gpu_check/v1", "host": ctx.host, "dry_run": ctx.dry, "probe": ctx.probe,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_s": round(wall, 1), "totals": totals(outcomes),
              "parts": [asdict(o) for o in outcomes], "not_run_yet": pending}
    stem = ctx.results_dir / f"gpu_check-{ctx.host}"
    atomic_write_text(stem.with_suffix(".json"), json.dumps(record, indent=2, default=str) + "\n")
    atomic_write_text(stem.with_suffix(".md"), markdown_summary(ctx, outcomes, wall))
    if out_dir is not None:
        copy_to_out(ctx, t_start, log, out_dir, stem)


def copy_to_out(ctx: Ctx, t_start: float, log: Path | None, out_dir: Path, stem: Path) -> None:
    """$OUT gets at most a few flat files: the summary, the log and one tarball of this run's files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [p for p in sorted(ctx.results_dir.glob("*")) if p.is_file() and p.stat().st_mtime >= t_start - 1]
    extra = [ctx.markdown, ctx.work / "junit-gpu.xml"] + ([log] if log else [])
    tmp = out_dir / "gpu_check_results.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for p in files:
            tar.add(p, arcname=f"results/{p.name}")
        for p in extra:
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
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child_env(hide: list[str], work: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    path = [str(REPO), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    if hide:
        path.insert(0, str(shadow_modules(hide, work / "hidden")))
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # never join an outer job's process group
    return env


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
    t_start = args.started or time.time()
    deadline = t_start + (args.total_s or (300.0 if args.dry_run else 390.0))
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    results_dir = args.results_dir or (work / "results" if args.dry_run else C.DEFAULT_RESULTS_DIR)
    markdown = args.markdown or (work / "BENCHMARKS.md" if args.dry_run else C.DEFAULT_MARKDOWN)
    results_dir.mkdir(parents=True, exist_ok=True)
    hide = os.environ.get("SCP_GPU_CHECK_HIDE", "").replace(",", " ").split()
    fail = set(os.environ.get("SCP_GPU_CHECK_FAIL", "").replace(",", " ").split())
    env = child_env(hide, work)
    python = sys.executable
    info = run_probe(python, env)
    ctx = Ctx(args.dry_run, results_dir, markdown, work, info["host"], info["gpus"], info)
    parts = select_parts(build_parts(ctx), args)
    if args.list:
        for p in parts:
            print(f"{p.name:<14} {p.budget_s:>4} s  {p.title}")
        return 0
    print("\n".join(header(ctx)), flush=True)
    if hide:
        print(f"hidden from every part (SCP_GPU_CHECK_HIDE): {', '.join(hide)}")
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    outcomes: list[Outcome] = []
    for i, part in enumerate(parts):
        left = deadline - time.time() - RESERVE_S
        o = run_part(part, ctx, python, env, left, part.name in fail)
        outcomes.append(o)
        print(f"--- {o.part}: {o.status}{': ' + o.detail if o.detail else ''} ({o.seconds:.0f} s)", flush=True)
        write_outputs(ctx, outcomes, [p.name for p in parts[i + 1:]], t_start, args.log, out_dir)
    print(text_summary(ctx, outcomes, time.time() - t_start), flush=True)
    bad = {FAILED, TIMED_OUT} | ({NOT_MET} if args.strict else set())
    return 1 if any(o.status in bad for o in outcomes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
