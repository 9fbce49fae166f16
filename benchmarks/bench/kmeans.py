"""`kmeans`: the k-means baseline as every evaluation fits it (scp_dist.kmeans, faiss), timed.

On cached features of CIFAR-10's size (50,000 x 512, K = 10) with output.kmeans_niter, kmeans_nredo
and kmeans_max_points (defaults 100, 10, 1024 per centroid, repeated here). The features are a
K-component Gaussian mixture, so the ACC against the generating labels says the fit is sane, not how
good k-means is on real data. Devices: `gpu` is faiss's GPU index (a faiss built with CUDA that sees
a GPU), `cpu` its CPU one; each timed fit (training) and predict (nearest centroid of every row).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from benchmarks import bench as B
from benchmarks import harness as H
from scp_dist.kmeans import kmeans_fit, kmeans_predict
from scp_dist.metrics import clustering_scores

COLUMNS = [H.Column("device", "device"), H.Column("n", "rows"), H.Column("dim", "D"), H.Column("k", "K"),
           H.Column("train_rows", "rows trained on"), H.Column("fit_s", "fit s", ".2f"),
           H.Column("predict_s", "predict s", ".3f"), H.Column("acc", "ACC vs mixture", ".3f")]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=50_000, help="cached samples")
    p.add_argument("--dim", type=int, default=512, help="feature dimension D")
    p.add_argument("--k", type=int, default=10, help="clusters K")
    p.add_argument("--niter", type=int, default=100, help="as output.kmeans_niter")
    p.add_argument("--nredo", type=int, default=10, help="as output.kmeans_nredo")
    p.add_argument("--max-points", type=int, default=1024,
                   help="as output.kmeans_max_points (rows per centroid trained on); 0 = every row")
    p.add_argument("--devices", nargs="+", default=["auto"], choices=["auto", "cpu", "gpu"],
                   help="auto: faiss's GPU index first when faiss sees a GPU, then the CPU one")


def mixture(n: int, dim: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 rows of a k-component Gaussian mixture (as the head benchmark's view a) and
    the component of each row."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, dim), dtype=np.float32) * 2.0
    labels = rng.integers(0, k, n)
    x = centers[labels] + rng.standard_normal((n, dim), dtype=np.float32)
    return x, labels


def resolve_devices(wanted: list[str], gpus: int) -> tuple[list[str], list[str]]:
    """The devices to run, in order, and a note for each one asked for but not available."""
    out: list[str] = []
    notes = []
    for d in wanted:
        if d == "auto":
            out += (["gpu"] if gpus else []) + ["cpu"]
        elif d == "gpu" and not gpus:
            notes.append("gpu: skipped, faiss sees no GPU (faiss-cpu installed, or no CUDA device)")
        else:
            out.append(d)
    return list(dict.fromkeys(out)), notes


def time_fit(x: np.ndarray, labels: np.ndarray, args: argparse.Namespace, gpu: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    km = kmeans_fit(x, args.k, seed=0, niter=args.niter, nredo=args.nredo, max_points_per_centroid=args.max_points,
                    use_gpu=gpu)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = kmeans_predict(km, x)
    predict_s = time.perf_counter() - t0
    per_centroid = args.max_points or x.shape[0] // args.k + 1
    return {"fit_s": fit_s, "predict_s": predict_s, "acc": clustering_scores(labels, pred)["acc"],
            "train_rows": min(x.shape[0], per_centroid * args.k), "objective": float(km.obj[-1])}


def run(args: argparse.Namespace) -> B.BenchResult:
    import faiss

    gpus = H.faiss_gpus()
    devices, notes = resolve_devices(args.devices, gpus)
    x, labels = mixture(args.n, args.dim, args.k)
    rows: list[dict[str, Any]] = []
    params = {"n": args.n, "dim": args.dim, "k": args.k, "niter": args.niter, "nredo": args.nredo,
              "max_points": args.max_points, "faiss": getattr(faiss, "__version__", "?"), "faiss_gpus": gpus}
    for d in devices:
        res = time_fit(x, labels, args, gpu=d == "gpu")
        rows.append({"device": d, "n": args.n, "dim": args.dim, "k": args.k, **res})
        print(f"  {d}: fit {res['fit_s']:.2f} s, predict {res['predict_s']:.3f} s, ACC {res['acc']:.3f}", flush=True)
        B.save_partial(args, B.BenchResult("kmeans", params, COLUMNS, list(rows), list(notes)), f"device {d}")
    notes.append(f"{args.n} x {args.dim} Gaussian-mixture rows, K={args.k}; scp_dist.kmeans.kmeans_fit with "
                 f"niter={args.niter}, nredo={args.nredo}, max_points_per_centroid={args.max_points} (the "
                 "evaluation's defaults); fit includes faiss's sampling and, on the GPU, the upload")
    return B.BenchResult("kmeans", params, COLUMNS, rows, notes)
