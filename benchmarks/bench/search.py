"""`search`: scp_dist.search's neighbour index: query latency and IVF recall, and neighbour quality.

Two parts, two result files:

- `search` (latency): N random vectors of the backbone's dimension (default 1,280, EfficientNet-Lite0's)
  indexed as scp_dist.search indexes a run (L2-normalised, inner product), exact (`IndexFlatIP`) and IVF
  (`IndexIVFFlat`, scp_dist.search.ivf_lists(N) lists, trained on IVF_TRAIN_PER_LIST rows per list),
  timed per query alone and per query in a batch; IVF at several nprobe values, with its recall@k
  against the exact result. Two kinds of vectors: i.i.d. Gaussian (no structure: the worst case for
  an inverted file, whose lists then cut through one uniform cloud) and a Gaussian mixture (clusters,
  as real features have).
- `search_recall` (quality): for each finished run of a labelled built-in data set (default: every
  such run under runs/), the share of each training image's k nearest other training images
  (scp_dist.search.training_neighbours) that carry its label, in both spaces, with chance (the sum of
  squared class shares) beside it.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import bench as B
from benchmarks import harness as H
from scp_dist import faiss_index as FI
from scp_dist import search as S

COLUMNS = [H.Column("vectors", "vectors"), H.Column("n", "N"), H.Column("dim", "D"), H.Column("index", "index"),
           H.Column("nlist", "lists"), H.Column("nprobe", "nprobe"), H.Column("build_s", "build s", ".1f"),
           H.Column("single_ms", "ms/query alone", ".2f"), H.Column("batch_ms", "ms/query in a batch", ".3f"),
           H.Column("recall", "recall@k vs flat", ".3f")]
RECALL_COLUMNS = [H.Column("run", "run"), H.Column("data", "data"), H.Column("backbone", "backbone"),
                  H.Column("n", "N"), H.Column("k", "k"), H.Column("space", "space"),
                  H.Column("same_label", "same-label share of the k nearest", ".3f"),
                  H.Column("chance", "chance", ".3f"), H.Column("run_acc", "run ACC", ".3f")]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parts", nargs="+", default=["latency", "recall"], choices=["latency", "recall"])
    p.add_argument("--sizes", nargs="+", type=int, default=[10_000, 1_000_000], help="indexed vectors N")
    p.add_argument("--dim", type=int, default=1280, help="vector dimension (the backbone's feature dim)")
    p.add_argument("--vectors", nargs="+", default=["random", "mixture"], choices=["random", "mixture"])
    p.add_argument("--mixture-classes", type=int, default=1000, help="components of the mixture")
    p.add_argument("--nprobe", nargs="+", type=int, default=[1, 8, 0, 128],
                   help="IVF lists probed; 0 = scp_dist.search's default (IVF_PROBE_FRACTION of the lists)")
    p.add_argument("--queries", type=int, default=200, help="queries in the batch")
    p.add_argument("--single", type=int, default=20, help="queries timed one by one")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--runs", nargs="*", type=Path, default=None,
                   help="runs for the recall part; default every run under runs/ of a labelled built-in data set")


# --- latency ------------------------------------------------------------------------------------


def vectors(kind: str, n: int, dim: int, classes: int, seed: int = 0) -> np.ndarray:
    """(n, dim) float32 rows, L2-normalised; built in place in chunks (10^6 x 1280 is 5 GB)."""
    rng = np.random.default_rng(seed)
    x = np.empty((n, dim), np.float32)
    centers = rng.standard_normal((classes, dim), dtype=np.float32) if kind == "mixture" else None
    for lo in range(0, n, 65536):
        part = rng.standard_normal((min(65536, n - lo), dim), dtype=np.float32)
        if centers is not None:  # a cloud of half the centres' scale around each: cosine ~0.9 to its centre
            part = centers[rng.integers(0, classes, len(part))] + 0.5 * part
        x[lo:lo + len(part)] = FI.normalise(part)
    return x


def time_queries(index: Any, q: np.ndarray, k: int, single: int) -> tuple[float, float, np.ndarray]:
    """(ms per query alone, ms per query in one batch, the batch's result ids)."""
    index.search(q[:1], k)  # warm-up
    t = []
    for i in range(min(single, len(q))):
        t0 = time.perf_counter()
        index.search(q[i:i + 1], k)
        t.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    _, ids = index.search(q, k)
    batch = time.perf_counter() - t0
    return 1e3 * B.median(t), 1e3 * batch / len(q), ids


def recall_vs(exact: np.ndarray, approx: np.ndarray) -> float:
    k = exact.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(exact, approx, strict=True)]))


def latency(args: argparse.Namespace, notes: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for kind in args.vectors:
        for n in args.sizes:
            x = vectors(kind, n, args.dim, args.mixture_classes)
            # Queries near indexed points (as a real query: an image like some training images).
            rng = np.random.default_rng(1)
            pick = rng.choice(n, args.queries, replace=False)
            q = FI.normalise(x[pick] + rng.standard_normal((args.queries, args.dim), dtype=np.float32) * 0.01)
            base = {"vectors": kind, "n": n, "dim": args.dim}
            t0 = time.perf_counter()
            flat = FI.build_index(x, "flat")
            build = time.perf_counter() - t0
            single, batch, exact = time_queries(flat, q, args.k, args.single)
            rows.append({**base, "index": "flat", "build_s": build, "single_ms": single, "batch_ms": batch,
                         "recall": 1.0})
            print(f"  {kind} N={n}: flat {single:.2f} ms alone, {batch:.3f} ms in a batch", flush=True)
            del flat
            t0 = time.perf_counter()
            ivf = FI.build_index(x, "ivf")
            build = time.perf_counter() - t0
            default = ivf.nprobe
            for nprobe in sorted(dict.fromkeys(p or default for p in args.nprobe)):
                ivf.nprobe = min(nprobe, ivf.nlist)
                single, batch, ids = time_queries(ivf, q, args.k, args.single)
                rows.append({**base, "index": "ivf" + (" (default)" if nprobe == default else ""),
                             "nlist": ivf.nlist, "nprobe": ivf.nprobe, "build_s": build, "single_ms": single,
                             "batch_ms": batch, "recall": recall_vs(exact, ids)})
                print(f"  {kind} N={n}: ivf nprobe {ivf.nprobe}/{ivf.nlist}: {single:.2f} ms alone, "
                      f"{batch:.3f} ms in a batch, recall {rows[-1]['recall']:.3f}", flush=True)
            del ivf, x
            B.save_partial(args, B.BenchResult("search", {}, COLUMNS, list(rows)), f"{kind} N={n}")
    notes.append(f"queries: {args.queries} in a batch (ms/query = batch time / {args.queries}) and {args.single} "
                 f"one by one (median); each an indexed vector plus 1% noise; k={args.k}; build s = add (flat) "
                 "or train + add (IVF)")
    notes.append("random: i.i.d. Gaussian vectors (no neighbourhood structure: the worst case for IVF); mixture: "
                 f"{args.mixture_classes} clusters of equal spread")
    return rows


# --- neighbour quality on real runs ---------------------------------------------------------------


def labelled_builtin_runs(root: Path) -> list[Path]:
    """Finished runs under `root` whose data is a labelled built-in data set."""
    from scp_dist.config import load_config
    from scp_dist.shards.sources import BUILTIN

    out = []
    for run in sorted(p for p in root.glob("*") if (p / "eval.json").is_file() and (p / "config.yaml").is_file()):
        cfg = load_config(run / "config.yaml")
        if cfg.data.prepare in BUILTIN:
            out.append(run)
    return out


def recall(args: argparse.Namespace, notes: list[str]) -> list[dict[str, Any]]:
    import json

    from scp_dist.config import load_config

    runs = args.runs if args.runs is not None else labelled_builtin_runs(H.REPO / "runs")
    if not runs:
        notes.append("recall: no finished run of a labelled built-in data set under runs/ "
                     "(python -m scp_dist.train --config demo_digits_lite0 makes one)")
    rows = []
    for run in runs:
        cfg = load_config(run / "config.yaml")
        with open(run / "assignments_train.csv", newline="") as f:
            labels = np.array([int(r["label"]) for r in csv.DictReader(f)])
        if (labels < 0).all():
            continue
        acc = json.loads((run / "eval.json").read_text())["splits"]["train"]["scores"].get("acc")
        shares = np.bincount(labels[labels >= 0]) / (labels >= 0).sum()
        for space in S.SPACES:
            t0 = time.perf_counter()
            ids, _ = S.training_neighbours(run, np.arange(len(labels)), args.k, space)
            same = labels[ids] == labels[:, None]
            rows.append({"run": H.rel(run), "data": cfg.data.name,
                         "backbone": f"{cfg.backbone.name} {cfg.backbone.model}".strip(), "n": len(labels),
                         "k": args.k, "space": space, "same_label": float(same[ids >= 0].mean()),
                         "chance": float((shares ** 2).sum()), "run_acc": acc,
                         "seconds": time.perf_counter() - t0})
            print(f"  {run.name} {space}: same label {rows[-1]['same_label']:.3f}", flush=True)
    notes.append("recall: every training image's k nearest other training images by "
                 "scp_dist.search.training_neighbours (index built from the run on first use); same-label share "
                 "over all of them; chance = sum of squared class shares")
    return rows


def run(args: argparse.Namespace) -> B.BenchResult:
    import faiss

    params = {"sizes": args.sizes, "dim": args.dim, "k": args.k, "ivf_min_rows": FI.IVF_MIN_ROWS,
              "ivf_probe_fraction": FI.IVF_PROBE_FRACTION, "ivf_train_per_list": FI.IVF_TRAIN_PER_LIST,
              "faiss": getattr(faiss, "__version__", "?"), "faiss_gpus": H.faiss_gpus(),
              "faiss_threads": faiss.omp_get_max_threads()}
    result = None
    if "recall" in args.parts:
        notes: list[str] = []
        rec = B.BenchResult("search_recall", {"k": args.k}, RECALL_COLUMNS, recall(args, notes), notes)
        if "latency" in args.parts:  # run_one saves and prints the latency result; this one is saved here
            rec.tag = args.tag
            print(H.table(rec.columns, rec.rows, text=True))
            print(f"wrote {B.save_result(rec, args.results_dir)}")
        result = rec
    if "latency" in args.parts:
        notes = ["the index scp_dist.search builds: exact below IVF_MIN_ROWS vectors, IVF from there on; "
                 "single-query latency decides the threshold (see docs/USING.md, Search)"]
        result = B.BenchResult("search", params, COLUMNS, latency(args, notes), notes)
    assert result is not None
    return result
