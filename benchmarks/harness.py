"""What every benchmark and study shares: the machine a result came from, its JSON, its markdown,
and the subprocesses that measure the job from outside.

A result is a JSON file under benchmarks/results/. Every report (BENCHMARKS.md's generated section,
each study's .md, the GPU check's summary) is rendered from those files and never edited by hand,
so a report cannot drift from its numbers, and it prints the command that reproduces them. Each
entry point re-renders without measuring: `python -m benchmarks.bench report`, `--render` on the
studies and on benchmarks/gpu_check.py.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scp_dist.fileio import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


# --- the machine ------------------------------------------------------------------------------


def usable_cores() -> int:
    """Cores this process may run on (a container or taskset can allow fewer than cpu_count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def version(dist: str) -> str | None:
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version(dist)
    return None


def dali_version() -> str | None:
    """DALI's version without importing it (slow); the distribution's name says its CUDA build."""
    for d in importlib.metadata.distributions():
        name = (d.metadata.get("Name") or "").lower()
        if name.startswith("nvidia-dali"):
            return f"{d.version} ({name})"
    return None


def dali_importable() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def faiss_gpus() -> int:
    """GPUs faiss can use: 0 for faiss-cpu (which lacks get_num_gpus in some builds)."""
    import faiss

    return int(getattr(faiss, "get_num_gpus", lambda: 0)())


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def host_kind() -> str:
    """'cpu', or the first GPU's name as a slug: the key that keeps results of different hosts apart."""
    import torch

    return slug(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else "cpu"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    import torch  # here, not at the top: a stage measured for its memory must not pay for torch

    gpu = torch.cuda.is_available()
    return {
        "cpu": _cpu_model(), "cores": usable_cores(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "dali": dali_version(), "timm": version("timm"),
        "open_clip": version("open_clip_torch"), "gpu": torch.cuda.get_device_name(0) if gpu else None,
        "gpu_count": torch.cuda.device_count() if gpu else 0, "cuda": torch.version.cuda,
        # Other jobs on a shared machine make numbers noisy; the load at the start says how much.
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def describe_machine(m: dict[str, Any] | str) -> str:
    if isinstance(m, str):  # studies from before this harness stored a sentence...
        return m
    if "cpu" not in m:  # ... or a few keys of their own
        return ", ".join(f"{k} {v}" for k, v in m.items())
    parts = [f"CPU {m['cpu']} ({m.get('cores')} cores usable)", f"torch {m.get('torch')}"]
    parts.append(f"GPU {m['gpu']} x{m.get('gpu_count', 1)} (CUDA {m.get('cuda')})" if m.get("gpu") else "no GPU")
    parts.append(f"DALI {m.get('dali') or 'not installed'}")
    if m.get("load_avg_1m") is not None:
        parts.append(f"load {m['load_avg_1m']}")
    return ", ".join(parts)


# --- result files -----------------------------------------------------------------------------


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def command(prog: str, argv: list[str]) -> str:
    """The command line that reproduces a result, with the thread count it ran under."""
    threads = os.environ.get("OMP_NUM_THREADS")
    return (f"OMP_NUM_THREADS={threads} " if threads else "") + shlex.join([*prog.split(), *argv])


def save_json(path: Path, record: dict[str, Any]) -> Path:
    atomic_write_text(path, json.dumps(record, indent=1, default=str) + "\n")
    return Path(path)


def load_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def rel(path: Path) -> str:
    """A path as a report names it: from the repository root when it lies inside."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def provenance(record: dict[str, Any], script: str, what: str, results_file: str) -> list[str]:
    """A study report's first lines: where and when it ran, where its numbers are, how to rerun it."""
    # `host` and `date`: the keys of studies written before this harness.
    m = describe_machine(record.get("machine") or record.get("host") or "an unrecorded machine")
    when = [record.get("created") or record.get("date"), record.get("wall_s") and f"{record['wall_s']:.0f} s"]
    when_text = ", ".join(w for w in when if w)
    return [f"_Generated by `{script}` on {m}{f' ({when_text})' if when_text else ''}; raw {what} in "
            f"`{results_file}`._", "", "```bash", record["command"], "```", ""]


# --- markdown ---------------------------------------------------------------------------------


@dataclass
class Column:
    key: str
    header: str
    fmt: str = ""  # format spec for numbers, e.g. ".1f"


def fmt_value(v: Any, fmt: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return format(v, fmt) if fmt else f"{v:.4g}"
    return str(v)


def table(columns: list[Column], rows: list[dict[str, Any]], text: bool = False) -> str:
    """A markdown table, or (text) the same cells in aligned columns for a terminal."""
    cells = [[c.header for c in columns]] + [[fmt_value(r.get(c.key), c.fmt) for c in columns] for r in rows]
    if not text:
        lines = ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join([lines[0], "|" + "|".join("---" for _ in columns) + "|", *lines[1:]])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def write_section(md: Path, body: str, begin: str, end: str, preamble: str) -> Path:
    """Put `body` between the markers of `md`, keeping the hand-written text around them (a file
    without the markers gets them at its end; a missing file starts with `preamble`)."""
    md = Path(md)
    text = md.read_text() if md.is_file() else preamble
    head, found, rest = text.partition(begin)
    tail = rest.partition(end)[2] if found and end in rest else "\n"
    if not found:
        head = head.rstrip("\n") + "\n\n"
    atomic_write_text(md, f"{head}{begin}\n\n{body}\n{end}{tail}")
    return md


# --- the job from outside ---------------------------------------------------------------------


def child_env(**extra: str) -> dict[str, str]:
    """Our environment without an outer torchrun's variables: a child must never join its group."""
    outer = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return {**{k: v for k, v in os.environ.items() if k not in outer}, "PYTHONUNBUFFERED": "1", **extra}


def torchrun(nprocs: int, overrides: list[str]) -> list[str]:
    """The training job under torchrun on this host."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nprocs}",
            "-m", "scp_dist.train", *overrides]


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
            return


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float | None = None,
        log: Path | None = None) -> tuple[int | None, list[str]]:
    """Run `cmd` from the repository root, its output streamed to ours (indented) and to `log`, and
    return (its exit code, None when stopped at `timeout`; its last lines). It gets a process group
    of its own, so the timeout stops torchrun's ranks and the loaders' workers with it."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env or child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, errors="replace", start_new_session=True)
    tail: deque[str] = deque(maxlen=80)

    def pump() -> None:
        assert proc.stdout is not None
        with open(log or os.devnull, "w") as f:
            for line in proc.stdout:
                sys.stdout.write("  | " + line)
                sys.stdout.flush()
                f.write(line)
                f.flush()
                tail.append(line.rstrip())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc: int | None = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        rc = None
    reader.join(timeout=10)  # a grandchild outside the group may hold the pipe: do not wait for it
    return rc, list(tail)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of the job's metrics.jsonl ([] when there is none)."""
    out = []
    with contextlib.suppress(FileNotFoundError):
        for line in Path(path).read_text().splitlines():
            with contextlib.suppress(ValueError):  # a line cut by a crash
                out.append(json.loads(line))
    return out
