"""Refinements applied after training, measured on finished cached runs (training split, labels used
only to score): kNN smoothing of the head's probabilities and Lloyd iterations started from the
head's clusters. Both lost (docs/RESULTS.md, "After SCP, and a lower learning rate"); this script
keeps the measurement repeatable. With --ensembles, on multi-head runs instead: other ways to combine
the heads than the product's vote (docs/RESULTS.md, "Five heads by default").

    python benchmarks/posthoc.py runs/digits_seed0 runs/lfw_faces_seed0 [--out results.json]
    python benchmarks/posthoc.py --ensembles runs/animals_lite0_seed0   # a run with head.num_heads=5

- kNN smoothing: P <- a·P0 + (1 - a)·mean of P over each image's k nearest neighbours in the frozen
  feature space (10 iterations of label propagation, k in 5, 10, a in 0.5, 0.2), and a one-shot vote
  P0 + sum of the neighbours' P0.
- Lloyd: k-means iterations on the frozen features started at the means of the head's clusters
  (1, 3, 10, 50 iterations).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

if not __package__:  # `python benchmarks/posthoc.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scp_dist import distributed as D  # noqa: E402
from scp_dist.checkpoint import newest_readable  # noqa: E402
from scp_dist.config import load_config  # noqa: E402
from scp_dist.evaluate import align_clusters, consensus, head_agreement  # noqa: E402
from scp_dist.feature_cache import cache_dir, load_kind  # noqa: E402
from scp_dist.metrics import clustering_scores  # noqa: E402
from scp_dist.neighbors import load_or_build  # noqa: E402
from scp_dist.train import build_head  # noqa: E402


def _acc(labels: np.ndarray, clusters: np.ndarray) -> float:
    return round(100 * clustering_scores(labels, clusters)["acc"], 2)


def _load(run: Path, st: D.DistState):
    """A finished cached run's config, its plain training features, labels and every head's
    probabilities on them, (H, n, K)."""
    cfg = load_config(run / "config.yaml")
    found = newest_readable(run)
    if found is None or cfg.train.mode != "cached":
        raise SystemExit(f"{run}: needs a finished cached run")
    state = found[0]["head"]
    head = build_head(cfg, state["weights.0"].shape[1], st)
    head.load_state_dict(state)
    head.eval()
    plain = load_kind(cache_dir(cfg), cfg.data.train_split, "plain")
    x = torch.from_numpy(np.asarray(plain.feats[0], dtype=np.float32))
    with torch.no_grad():
        probs = head(x).softmax(-1).double().numpy()
    return cfg, x, plain.labels, probs


def ensembles(run: Path, st: D.DistState) -> dict:
    """The product's vote over all heads and over every 3 of them, k-means on the heads'
    concatenated probabilities, and the argmax of the aligned mean probability."""
    from itertools import combinations

    from scp_dist.kmeans import kmeans_fit, nearest_centroid

    cfg, _, y, probs = _load(run, st)
    k, clusters, conf = cfg.head.num_clusters, probs.argmax(-1), probs.max(-1)

    def vote(idx: list[int]) -> np.ndarray:
        ref = idx[int(np.argmax(head_agreement(clusters[idx])))]
        maps = np.stack([align_clusters(clusters[ref], clusters[i], k) for i in idx])
        return consensus(clusters[idx], conf[idx], maps, k)[0]

    heads = list(range(len(probs)))
    out: dict = {"run": run.name, "heads": [_acc(y, c) for c in clusters], "vote": _acc(y, vote(heads)),
                 "vote_of_3": [_acc(y, vote(list(s))) for s in combinations(heads, 3)]}
    z = np.concatenate(list(probs), 1).astype(np.float32)
    out["kmeans_on_probabilities"] = _acc(y, nearest_centroid(kmeans_fit(z, k, seed=0, niter=50, nredo=5).centroids, z))
    ref = int(np.argmax(head_agreement(clusters)))
    mean = sum(p[:, np.argsort(align_clusters(clusters[ref], c, k))] for p, c in zip(probs, clusters, strict=True))
    out["aligned_mean_probability"] = _acc(y, mean.argmax(1))
    return out


def refine(run: Path, st: D.DistState) -> dict:
    cfg, x, y, probs = _load(run, st)
    p0 = probs[0]
    root = cache_dir(cfg)
    out: dict = {"run": run.name, "head": _acc(y, p0.argmax(1))}
    table = load_or_build(root, cfg.data.train_split, 10, len(y), st)
    for k in (5, 10):
        nb = table[:, :k]
        for a in (0.5, 0.2):
            p = p0.copy()
            for _ in range(10):
                p = a * p0 + (1 - a) * p[nb].mean(1)
            out[f"knn{k}_a{a}"] = _acc(y, p.argmax(1))
        out[f"knn{k}_vote"] = _acc(y, (p0 + p0[nb].sum(1)).argmax(1))
    clusters = torch.from_numpy(p0.argmax(1))
    for t in range(1, 51):
        centres = torch.stack([x[clusters == c].mean(0) if (clusters == c).any() else x[0]
                               for c in range(cfg.head.num_clusters)])
        clusters = torch.cdist(x, centres).argmin(1)
        if t in (1, 3, 10, 50):
            out[f"lloyd{t}"] = _acc(y, clusters.numpy())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=None, help="also write the rows here as JSON")
    p.add_argument("--ensembles", action="store_true", help="combine the heads of multi-head runs instead")
    args = p.parse_args()
    st = D.init_distributed("cpu", "gloo", 600)
    rows = []
    for run in args.runs:
        rows.append((ensembles if args.ensembles else refine)(run, st))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
