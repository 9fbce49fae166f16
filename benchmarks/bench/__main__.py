"""python -m benchmarks.bench {data,step,scaling,head,checkpoint,kmeans,search,streaming,all,report} [options]

`all` runs every benchmark with its defaults; `report` only rebuilds BENCHMARKS.md from the stored
results. A run writes <results-dir>/<name>-<host kind>[-<tag>].json (host kind: cpu or the GPU's
name) and rebuilds the generated section of BENCHMARKS.md from every result file. All of them on a
GPU host, with goals and a time budget per part: `bash launch/gpu_check.sh` (benchmarks/gpu_check.py).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks import bench as B
from benchmarks import harness as H
from benchmarks.bench import checkpoint, data, head, kmeans, scaling, search, step, streaming

BENCHMARKS = {"data": data, "step": step, "scaling": scaling, "head": head, "checkpoint": checkpoint,
              "kmeans": kmeans, "search": search, "streaming": streaming}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results-dir", type=Path, default=H.RESULTS, help="where the JSON results go")
    p.add_argument("--markdown", type=Path, default=B.MARKDOWN, help="the markdown file to regenerate")
    p.add_argument("--no-markdown", action="store_true", help="write the JSON only")
    p.add_argument("--tag", default="", help="kept apart from untagged runs: <name>-<host>-<tag>.json")
    p.add_argument("--save-partial", action="store_true",
                   help="write the JSON after every row too, so a run killed at a time budget leaves its rows")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="name", required=True)
    for name, module in BENCHMARKS.items():
        sp = sub.add_parser(name, help=module.__doc__.splitlines()[0].split(": ", 1)[1],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_args(sp)
        _common(sp)
    _common(sub.add_parser("all", help="every benchmark with its defaults"))
    _common(sub.add_parser("report", help="rebuild the markdown from the stored results"))
    return p


def run_one(name: str, args: argparse.Namespace) -> B.BenchResult:
    t0 = time.perf_counter()
    print(f"== scp-bench {name} on {H.host_kind()}: {H.describe_machine(H.machine())}", flush=True)
    r = BENCHMARKS[name].run(args)
    r.tag, r.wall_s = args.tag, round(time.perf_counter() - t0, 2)
    print(f"\n== scp-bench {r.name} on {r.host_kind}\nparams: " + ", ".join(f"{k}={v}" for k, v in r.params.items()))
    print(H.table(r.columns, r.rows, text=True))
    print("".join(f"note: {n}\n" for n in r.notes) + f"({r.wall_s:.1f} s)", flush=True)
    print(f"wrote {B.save_result(r, args.results_dir)}")
    if not args.no_markdown:
        print(f"updated {B.update_markdown(args.results_dir, args.markdown)}")
    return r


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.name == "report":
        print(f"updated {B.update_markdown(args.results_dir, args.markdown)}")
    elif args.name == "all":
        io = ["--results-dir", str(args.results_dir), "--markdown", str(args.markdown),
              *(["--no-markdown"] if args.no_markdown else [])]
        for name in BENCHMARKS:
            run_one(name, parser.parse_args([name, *io]))
    else:
        run_one(args.name, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
