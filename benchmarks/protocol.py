"""The label-free protocol: seeds 0..N-1 of one config through the product's own job (scp_dist.demo's
seed loop: train, evaluate, k-means on the same frozen features), then a report of the mean ± std over
seeds for the reported clustering, for k-means, and for every label-free way of choosing among the
heads of a multi-head run (the lowest loss, the most agreement, the consensus vote), against the goal
(ACC std <= 1.5 points; SCP >= 5 points over k-means in ACC, NMI and ARI, or where k-means is at 90
or more at most 0.7 x its ACC error).

    python benchmarks/protocol.py --config animals_lite0 --seeds 5 [key=value ...]
    python benchmarks/protocol.py --render benchmarks/results/protocol-animals_lite0.json   # markdown only

Writes benchmarks/results/protocol-<config>[-<tag>].json (the raw rows) and
benchmarks/protocol_<config>[-<tag>].md (the tables, with the command that produced them).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

if not __package__:  # `python benchmarks/protocol.py`: the repository root makes `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness as H  # noqa: E402

METRICS = ("acc", "nmi", "ari")
# The goal of issue "Dependable clusters": a seed spread of at most 1.5 ACC points, and 5 points over
# k-means in ACC, NMI and ARI; where k-means is at 90 or more, at most 0.7 x its ACC error instead.
GOAL_STD, GOAL_MARGIN, GOAL_HIGH_KMEANS, GOAL_ERROR_SHARE = 1.5, 5.0, 90.0, 0.7
KMEANS = "k-means on the same features"
COLUMNS = [H.Column("name", "clustering"), *(H.Column(m, m.upper()) for m in METRICS), H.Column("seeds", "ACC per seed")]
Stats = dict[str, tuple[float, float]]
# The moonshot bar, the one row that uses labels: per seed, the head with the highest ACC.
BEST_BY_LABELS = "best head, chosen with labels (the moonshot's bar)"


def _stats(rows: list[dict], pick: Callable[[dict], dict[str, float]]) -> Stats:
    vals = [pick(r) for r in rows]
    return {m: (100 * float(np.mean([v[m] for v in vals])), 100 * float(np.std([v[m] for v in vals])))
            for m in METRICS}


def choices(rows: list[dict]) -> dict[str, Stats]:
    """Mean ± std over seeds of each way to report a clustering (the last: what the config chose)."""
    out = {KMEANS: _stats(rows, lambda r: r["kmeans"])}
    heads = rows[0].get("all_heads")
    if heads:
        out["head 0 alone (a one-head run)"] = _stats(rows, lambda r: r["all_heads"][0])
        out["mean over heads"] = _stats(rows, lambda r: {m: np.mean([h[m] for h in r["all_heads"]]) for m in METRICS})
        out["lowest final loss"] = _stats(rows, lambda r: r["all_heads"][int(np.argmin(r["head_losses"]))])
        out["most agreement"] = _stats(rows, lambda r: r["all_heads"][int(np.argmax(r["head_agreement"]))])
        out[BEST_BY_LABELS] = _stats(rows, lambda r: max(r["all_heads"], key=lambda h: h["acc"]))
    name = f"reported (head.select={rows[0]['select']})" if heads else "reported (one head)"
    out[name] = _stats(rows, lambda r: r["scp"])
    return out


def render(record: dict[str, Any]) -> str:
    rows, table = record["rows"], choices(record["rows"])
    rep_name = next(k for k in table if k.startswith("reported"))
    km, rep = table[KMEANS], table[rep_name]
    std_ok = rep["acc"][1] <= GOAL_STD
    margins = {m: rep[m][0] - km[m][0] for m in METRICS}
    if km["acc"][0] >= GOAL_HIGH_KMEANS:  # little room above k-means: a share of its error instead of 5 points
        acc_goal = 100 - GOAL_ERROR_SHARE * (100 - km["acc"][0])
        margin_ok = rep["acc"][0] >= acc_goal and margins["nmi"] >= 0 and margins["ari"] >= 0
        margin_text = (f"k-means is at {km['acc'][0]:.1f} ≥ {GOAL_HIGH_KMEANS:.0f}, so ACC ≥ {acc_goal:.1f} "
                       f"(≤ {GOAL_ERROR_SHARE} × k-means' error) and NMI, ARI not below k-means")
    else:
        margin_ok = all(v >= GOAL_MARGIN for v in margins.values())
        margin_text = f"≥ {GOAL_MARGIN:.0f} points over k-means in ACC, NMI and ARI"
    per_seed = {KMEANS: [r["kmeans"]["acc"] for r in rows], rep_name: [r["scp"]["acc"] for r in rows]}
    cells = [{"name": name, **{m: f"{s[m][0]:.1f} ± {s[m][1]:.1f}" for m in METRICS},
              "seeds": " ".join(f"{100 * a:.1f}" for a in per_seed.get(name, []))} for name, s in table.items()]
    lines = [
        f"# Protocol: `{record['config']}`, {len(rows)} seeds", "",
        *H.provenance(record, "benchmarks/protocol.py", "rows", record["results_file"]),
        f"Scored on {rows[0]['num_samples']} `{rows[0]['split']}` images, in %, mean ± std over seeds "
        "(population std). No labels are used to choose anything but the row that says so.", "",
        H.table(COLUMNS, cells), "",
        f"**Goal** (reported clustering): ACC std ≤ {GOAL_STD} — {'met' if std_ok else 'NOT met'} "
        f"({rep['acc'][1]:.1f}); {margin_text} — {'met' if margin_ok else 'NOT met'} (" + ", ".join(f"{m.upper()} {v:+.1f}" for m, v in margins.items())
        + ").", "",
    ]
    if BEST_BY_LABELS in table:
        gap = rep["acc"][0] - table[BEST_BY_LABELS]["acc"][0]
        lines += [f"**Moonshot** (reported ≥ the best head chosen with labels, mean ACC): "
                  f"{'met' if gap >= 0 else 'NOT met'} ({gap:+.1f}).", ""]
    lines += [
        "Wall time per seed: " + ", ".join(f"{r['wall_s']:.0f} s" for r in rows) + ".", "",
    ]
    return "\n".join(lines)


def write_report(record: dict[str, Any]) -> Path:
    md = H.REPO / record["markdown_file"]
    md.write_text(render(record))
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a config name or path (animals_lite0, fashion_mnist_lite0, demo_digits_lite0)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--tag", default="", help="suffix of the result files (a variant)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON and markdown here instead of benchmarks/")
    p.add_argument("--render", type=Path, default=None, help="only re-render the markdown of a stored JSON")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if args.render:
        print(f"updated {write_report(H.load_json(args.render))}")
        return 0
    if not args.config:
        p.error("--config is required")

    from scp_dist import distributed as D
    from scp_dist.demo import run_seeds
    from scp_dist.runlog import setup_logging

    stem = Path(args.config).stem + (f"-{args.tag}" if args.tag else "")
    json_path = (args.out or H.RESULTS) / f"protocol-{stem}.json"
    md_path = (args.out or H.REPO / "benchmarks") / f"protocol_{stem}.md"
    st = D.init_distributed("cpu")
    setup_logging(True)
    t0 = time.perf_counter()
    try:
        _, rows = run_seeds(args.config, args.seeds, args.overrides, st)
    finally:
        D.teardown()
    argv_used = ["--config", args.config, "--seeds", str(args.seeds), *(["--tag", args.tag] if args.tag else []),
                 *args.overrides]
    record = {"config": args.config, "overrides": args.overrides, "seeds": args.seeds, "rows": rows,
              "command": H.command("python benchmarks/protocol.py", argv_used), "machine": H.machine(),
              "created": H.now(), "wall_s": time.perf_counter() - t0, "results_file": H.rel(json_path),
              "markdown_file": H.rel(md_path)}
    H.save_json(json_path, record)
    write_report(record)
    print(render(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
