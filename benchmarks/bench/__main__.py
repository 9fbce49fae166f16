"""python -m benchmarks.bench <name> [options]

  data     images/s of decode + two augmented views: torch workers vs DALI (CPU; GPU when present)
  step     full training step vs backbone-only forward (images/s, ratio; goal >= 0.9)
  scaling  images/s of the training job (torchrun) with 1 and 2 ranks, ratio to linear
  head     head training on cached CIFAR-10-sized features (30 epochs), optionally H heads at once
  kmeans   the k-means baseline (faiss, scp_dist.kmeans) on cached CIFAR-10-sized features, CPU and GPU
  all      data, step, scaling, head and kmeans in sequence with their defaults
  report   only rebuild BENCHMARKS.md from the stored results

Results go to <results-dir>/<name>-<host kind>[-<tag>].json (host kind: cpu or the GPU's name)
and the generated section of BENCHMARKS.md is rebuilt from every result file. All of them on a GPU
host, with goals and a time budget per part: `bash launch/gpu_check.sh` (benchmarks/gpu_check.py).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.bench import common as C
from benchmarks.bench import data, head, kmeans, scaling, step

AddArgs = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], C.BenchResult]
BENCHMARKS: dict[str, tuple[AddArgs, Run, str]] = {
    "data": (data.add_args, data.run, "images/s of decode + two views: torch workers vs DALI"),
    "step": (step.add_args, step.run, "training step vs backbone-only forward"),
    "scaling": (scaling.add_args, scaling.run, "training job images/s with 1 and 2 ranks"),
    "head": (head.add_args, head.run, "head training on cached CIFAR-10-sized features"),
    "kmeans": (kmeans.add_args, kmeans.run, "faiss k-means baseline on cached CIFAR-10-sized features"),
}
ALL = ("data", "step", "scaling", "head", "kmeans")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results-dir", type=Path, default=C.DEFAULT_RESULTS_DIR, help="where the JSON results go")
    p.add_argument("--markdown", type=Path, default=C.DEFAULT_MARKDOWN, help="the markdown file to regenerate")
    p.add_argument("--no-markdown", action="store_true", help="write the JSON only")
    p.add_argument("--tag", default="", help="kept apart from untagged runs: <name>-<host>-<tag>.json")
    p.add_argument("--save-partial", action="store_true",
                   help="write the JSON after every row too, so a run killed at a time budget leaves its rows")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="name", required=True)
    for name, (add_args, _, help_text) in BENCHMARKS.items():
        sp = sub.add_parser(name, help=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_args(sp)
        _common(sp)
    _common(sub.add_parser("all", help="every benchmark with its defaults"))
    report = sub.add_parser("report", help="rebuild the markdown from the stored results")
    _common(report)
    return p


def run_one(name: str, args: argparse.Namespace) -> C.BenchResult:
    t0 = time.perf_counter()
    print(f"== scp-bench {name} on {C.host_kind()}: {C.describe_machine(C.machine_info())}", flush=True)
    result = BENCHMARKS[name][1](args)
    result.tag = args.tag
    return C.finish(result, args.results_dir, None if args.no_markdown else args.markdown, t0)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.name == "report":
        print(f"updated {C.update_markdown(args.results_dir, args.markdown)}")
        return 0
    if args.name == "all":
        for name in ALL:
            sub_args = parser.parse_args([name, "--results-dir", str(args.results_dir), "--markdown",
                                          str(args.markdown), *(["--no-markdown"] if args.no_markdown else [])])
            run_one(name, sub_args)
        return 0
    run_one(args.name, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
