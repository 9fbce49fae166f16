"""Estimate the number of clusters K without labels, from the frozen features a run would train on.

    python -m scp_dist.estimate_k --config demo_digits_lite0 data.root=data/mine [--kmin 2 --kmax 30]

Extracts (or reuses) the run's feature cache exactly as `scp_dist.train` would in cached mode, so
the work is not lost: the training run that follows with the chosen `head.num_clusters` finds its
features there. From the plain (unaugmented) training features it builds the symmetric graph of
each image's 10 nearest neighbours (cosine, the same search `neighbors.k` uses) and takes the
number of groups from the largest gap among the smallest eigenvalues of the graph's normalised
Laplacian (the spectral-clustering eigengap rule; a seeded sample of 20,000 images bounds the
cost). Prints the spectrum and, where labels exist, the true number of classes next to the
estimate: a heuristic, right on 1 of 9 labelled sets (docs/RESULTS.md, "The number of clusters").
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from scp_dist import distributed as D
from scp_dist.config import load_config
from scp_dist.errors import UserError
from scp_dist.neighbors import knn_table
from scp_dist.runlog import setup_logging

GRAPH_K = 10  # neighbours per image in the graph
MAX_ROWS = 20_000  # a seeded sample bounds the eigen-solve on large data sets


def laplacian_spectrum(feats: np.ndarray, num: int, seed: int = 0) -> np.ndarray:
    """The `num` smallest eigenvalues of the normalised Laplacian of the symmetric cosine kNN graph
    of (a seeded sample of) the features, ascending."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import eigsh

    rng = np.random.default_rng(seed)
    x = feats if len(feats) <= MAX_ROWS else feats[np.sort(rng.choice(len(feats), MAX_ROWS, replace=False))]
    n = len(x)
    nn = knn_table(x, GRAPH_K)
    k = nn.shape[1]
    adj = sp.csr_matrix((np.ones(n * k), (np.repeat(np.arange(n), k), nn.ravel())), shape=(n, n))
    adj = ((adj + adj.T) > 0).astype(np.float64)
    inv_sqrt_deg = sp.diags(1.0 / np.sqrt(np.asarray(adj.sum(1)).ravel()))
    lap = sp.eye(n) - inv_sqrt_deg @ adj @ inv_sqrt_deg
    num = min(num, n - 2)
    if n <= 2000:
        return np.linalg.eigvalsh(lap.toarray())[:num]
    # v0 fixed: ARPACK's default start vector is random, and the estimate must not depend on it
    vals = eigsh(lap, k=num, which="SM", tol=1e-6, maxiter=20_000, v0=np.ones(n))[0]
    return np.sort(vals)


def estimate(eigenvalues: np.ndarray, kmin: int, kmax: int) -> int:
    """The K in [kmin, kmax] after which the spectrum jumps most: with K well-separated groups
    the graph has K eigenvalues near 0 and then a gap (the spectral clustering eigengap rule)."""
    gaps = np.diff(eigenvalues)  # gaps[i] = lambda_{i+1} - lambda_i, i.e. the gap after i+1 values
    ks = np.arange(kmin, min(kmax, len(gaps)) + 1)
    return int(ks[np.argmax(gaps[ks - 1])])


def _plain_train_features(cfg) -> tuple[np.ndarray, np.ndarray]:
    """The run's cached plain training features (extracting the cache if needed) and labels."""
    from scp_dist.feature_cache import cache_dir, load_kind
    from scp_dist.features import build_source
    from scp_dist.models.backbones import build_backbone
    from scp_dist.precision import resolve_precision
    from scp_dist.train import prepare_data

    st = D.init_distributed(cfg.train.device)
    try:
        prepare_data(cfg, st)
        backbone = build_backbone(cfg.backbone).to(st.device)
        build_source(cfg, st, backbone, resolve_precision(cfg.train.precision, st.device))
        plain = load_kind(cache_dir(cfg), cfg.data.train_split, "plain")
        return plain.feats[0].float().numpy(), plain.labels
    finally:
        D.teardown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="demo_digits_lite0")
    p.add_argument("--kmin", type=int, default=2)
    p.add_argument("--kmax", type=int, default=30)
    p.add_argument("--json", default="", help="also write the scores here")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (data.root=...)")
    args = p.parse_args(argv)
    setup_logging(True)
    try:
        cfg = load_config(args.config, ["train.mode=cached", *args.overrides])
        feats, labels = _plain_train_features(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.kmin < 2 or args.kmax < args.kmin:
        print(f"error: need 2 <= --kmin <= --kmax, got {args.kmin}, {args.kmax}", file=sys.stderr)
        return 2
    ev = laplacian_spectrum(feats, args.kmax + 1, seed=cfg.train.seed)
    if len(ev) <= args.kmin:
        print(f"error: {len(feats)} images are too few for K >= {args.kmin}", file=sys.stderr)
        return 2
    k = estimate(ev, args.kmin, args.kmax)
    true_k = int(len(np.unique(labels[labels >= 0]))) if (labels >= 0).any() else None
    for i in range(max(args.kmin, 2), min(args.kmax, len(ev) - 1) + 1):
        print(f"K={i:4d}  eigenvalue {ev[i - 1]:.4f}  gap after it {ev[i] - ev[i - 1]:.4f}"
              f"{'  <- estimate' if i == k else ''}")
    print(f"estimated K: {k}" + (f" (the labels have {true_k} classes)" if true_k else "")
          + f"; train with head.num_clusters={k}")
    print("a heuristic: right on 1 of 9 labelled sets, off by one on 2 (docs/RESULTS.md, \"The number of "
          "clusters\"); look for other large gaps above, and prefer too many clusters to too few")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"eigenvalues": ev.tolist(), "estimate": k, "true_k": true_k, "n": len(feats)}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
