"""Refinements applied after training, measured on finished cached runs (training split, labels used
only to score): kNN smoothing of the head's probabilities and Lloyd iterations started from the
head's clusters. Both lost (docs/RESULTS.md, "After SCP, and a lower learning rate"); this script
keeps the measurement repeatable. With --ensembles, on multi-head runs instead: other ways to combine
the heads than the product's vote (docs/RESULTS.md, "Five heads by default"); --choices, --independent,
--gate and --errors: docs/RESULTS.md, "The current code, rerun".

    python benchmarks/posthoc.py runs/digits_seed0 runs/lfw_faces_seed0 [--out results.json]
    python benchmarks/posthoc.py --ensembles runs/animals_lite0_seed0   # a run with head.num_heads=5
    python benchmarks/posthoc.py --choices RUN...          # each head's modularity on the neighbour graph
    python benchmarks/posthoc.py --independent 5 RUN...    # the vote of head 0 of 5 consecutive runs
    python benchmarks/posthoc.py --errors RUN...           # where the reported clustering errs, and why
    python benchmarks/posthoc.py --gate RUN...             # the vote of the heads near the lowest loss
    python benchmarks/posthoc.py --consistency RUN...      # each head's view consistency, and votes it gates

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
from scp_dist.evaluate import align_clusters, consensus, head_agreement, vote_alignment, vote_weights  # noqa: E402
from scp_dist.feature_cache import cache_dir, load_kind, pair_kind, pairs_dir, pairs_to_extract  # noqa: E402
from scp_dist.metrics import clustering_scores  # noqa: E402
from scp_dist.neighbors import load_or_build  # noqa: E402
from scp_dist.train import build_head  # noqa: E402


def _acc(labels: np.ndarray, clusters: np.ndarray) -> float:
    return round(100 * clustering_scores(labels, clusters)["acc"], 2)


def _load(run: Path, st: D.DistState):
    """A finished cached run's config, its plain training features, labels and every head's
    probabilities on them, (H, n, K)."""
    cfg, _, x, labels, probs = _load_with_head(run, st)
    return cfg, x, labels, probs


def _load_with_head(run: Path, st: D.DistState):
    """_load's values and the trained heads (eval mode) that gave the probabilities."""
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
    return cfg, head, x, plain.labels, probs


def vote(probs: np.ndarray, k: int) -> np.ndarray:
    """evaluate.consensus of (H, n, K) probabilities, every head voting (head.vote_margin large)."""
    clusters, conf = probs.argmax(-1), probs.max(-1)
    maps = vote_alignment(clusters, head_agreement(clusters), np.ones(len(clusters)), k)
    return consensus(clusters, conf, maps, k)[0]


def _vote_of(y: np.ndarray, probs: np.ndarray, keep: np.ndarray, k: int) -> float:
    """ACC of the vote of the heads `keep` (indices) selects; one head kept is that head alone."""
    return _acc(y, vote(probs[keep], k) if len(keep) > 1 else probs[keep[0]].argmax(-1))


def ensembles(run: Path, st: D.DistState) -> dict:
    """The product's vote over all heads and over every 3 of them, k-means on the heads'
    concatenated probabilities, and the argmax of the aligned mean probability."""
    from itertools import combinations

    from scp_dist.kmeans import kmeans_fit, nearest_centroid

    cfg, _, y, probs = _load(run, st)
    k, clusters = cfg.head.num_clusters, probs.argmax(-1)
    heads = list(range(len(probs)))
    out: dict = {"run": run.name, "heads": [_acc(y, c) for c in clusters], "vote": _acc(y, vote(probs, k)),
                 "vote_of_3": [_acc(y, vote(probs[list(s)], k)) for s in combinations(heads, 3)]}
    z = np.concatenate(list(probs), 1).astype(np.float32)
    out["kmeans_on_probabilities"] = _acc(y, nearest_centroid(kmeans_fit(z, k, seed=0, niter=50, nredo=5).centroids, z))
    maps = vote_alignment(clusters, head_agreement(clusters), np.ones(len(clusters)), k)
    mean = sum(p[:, np.argsort(m)] for p, m in zip(probs, maps, strict=True))
    out["aligned_mean_probability"] = _acc(y, mean.argmax(1))
    return out


def modularity(table: np.ndarray, clusters: np.ndarray, k: int) -> float:
    """Newman's modularity of a partition on the directed nearest-neighbour graph (`table`: each
    image's neighbours): the share of edges inside clusters minus the share that clusters of the same
    sizes and in-degrees would hold at random."""
    n, m = table.shape
    inside = float((clusters[table] == clusters[:, None]).mean())
    out_share = np.bincount(clusters, minlength=k) / n
    in_share = np.bincount(clusters[table].ravel(), minlength=k) / (n * m)
    return inside - float(out_share @ in_share)


def choices(run: Path, st: D.DistState) -> dict:
    """Every head's ACC next to its modularity on the frozen features' 10-nearest-neighbour graph: would
    the most modular head be a label-free choice closer to the best head than the vote?"""
    cfg, _, y, probs = _load(run, st)
    k, clusters = cfg.head.num_clusters, probs.argmax(-1)
    table = load_or_build(cache_dir(cfg), cfg.data.train_split, 10, len(y), st)
    voted = vote(probs, k)
    mod = [round(modularity(table, c, k), 4) for c in clusters]
    return {"run": str(run), "heads": [_acc(y, c) for c in clusters], "modularity": mod,
            "vote": _acc(y, voted), "vote_modularity": round(modularity(table, voted, k), 4),
            "most_modular_head": _acc(y, clusters[int(np.argmax(mod))])}


def gated(run: Path, st: D.DistState, margins: tuple[float, ...] = (0.02, 0.05, 0.1)) -> dict:
    """The vote of only the heads whose final training loss is within a margin of the lowest (the
    heads of a run see the same batches, so their losses compare), next to the product's vote of all
    heads and the lowest-loss head alone. Label-free: the labels only score."""
    cfg, _, y, probs = _load(run, st)
    k, losses = cfg.head.num_clusters, np.asarray(json.loads((run / "eval.json").read_text())["head_losses"])
    lowest = probs[int(np.argmin(losses))].argmax(-1)
    row = {"run": run.name, "heads": [_acc(y, p.argmax(-1)) for p in probs], "losses": losses.round(4).tolist(),
           "vote": _acc(y, vote(probs, k)), "lowest_loss": _acc(y, lowest)}
    for m in margins:
        row[f"vote_within_{m:g}"] = _vote_of(y, probs, np.flatnonzero(vote_weights(torch.as_tensor(losses), m)), k)
    return row


def view_consistency(run: Path, st: D.DistState, margins: tuple[float, ...] = (0.1, 0.3, 1.0)) -> dict:
    """Each head's view consistency (the share of the run's cached view pairs whose two views it puts
    in one cluster, in %) and the vote of the heads within a margin of the most consistent, alone and
    together with the product's loss gate. On the digits the most consistent head was the best head
    on every seed; elsewhere it was not (docs/RESULTS.md, "View consistency as the choice")."""
    cfg, head, _, y, probs = _load_with_head(run, st)
    root, split = pairs_dir(cfg, cache_dir(cfg)), cfg.data.train_split
    same, total = [], 0
    for m in range(pairs_to_extract(cfg, len(y))):
        views = load_kind(root, split, pair_kind(m), with_keys=False)
        for part in views.parts:
            with torch.no_grad():
                a, b = (head(torch.from_numpy(np.asarray(part[:, v], dtype=np.float32))).argmax(-1) for v in (0, 1))
            same.append((a == b).double().sum(-1))
            total += len(part)
    cons = (100 * torch.stack(same).sum(0) / total).numpy()
    k, losses = cfg.head.num_clusters, np.asarray(json.loads((run / "eval.json").read_text())["head_losses"])
    by_loss = np.asarray(vote_weights(torch.as_tensor(losses), cfg.head.vote_margin)) > 0

    def vote_of(keep: np.ndarray) -> float:
        return _vote_of(y, probs, np.flatnonzero(keep), k)

    row = {"run": str(run), "heads": [_acc(y, p.argmax(-1)) for p in probs], "consistency": cons.round(3).tolist(),
           "losses": losses.round(4).tolist(), "product": vote_of(by_loss), "most_consistent": _acc(y, probs[int(np.argmax(cons))].argmax(-1))}
    for m in margins:
        near = cons >= cons.max() - m
        row[f"consistency_within_{m:g}"] = vote_of(near)
        row[f"and_loss_gate_{m:g}"] = vote_of(near & by_loss) if (near & by_loss).any() else vote_of(near)
    return row


def independent(runs: list[Path], window: int, st: D.DistState) -> list[dict]:
    """The vote of head 0 of `window` consecutive runs, for each window: heads that differ in their
    batch order and neighbour draws too, not only in their init. Head 0 of a run of seed s is the head
    of a one-head run of seed s (same init, batches and views), and head h of a five-head run of seed
    s has the init of seed s + h, so the window s..s+4 has the inits of a five-head run of seed s and
    five batch orders where that run has one."""
    loaded = [_load(run, st) for run in runs]
    k, y = loaded[0][0].head.num_clusters, loaded[0][2]
    head0 = np.stack([probs[0] for _, _, _, probs in loaded])
    rows = []
    for s in range(len(runs) - window + 1):
        rows.append({"runs": [r.name for r in runs[s: s + window]], "heads": [_acc(y, p.argmax(-1)) for p in
                                                                          head0[s: s + window]],
                     "vote": _acc(y, vote(head0[s: s + window], k))})
    return rows


def errors(run: Path, st: D.DistState) -> dict:
    """Where the reported clustering errs (the labels say which images): how many of those images'
    10 nearest neighbours share their label, whether k-means errs on them too, and whether a linear
    classifier fitted with the labels separates the classes at all (an upper bound, not a result)."""
    import csv

    from sklearn.linear_model import LogisticRegression

    from scp_dist.kmeans import nearest_centroid

    cfg, x, y, _ = _load(run, st)
    plain = load_kind(cache_dir(cfg), cfg.data.train_split, "plain")
    with open(run / f"assignments_{cfg.data.train_split}.csv") as f:
        by_key = {r["key"]: int(r["cluster"]) for r in csv.DictReader(f)}
    clusters = np.array([by_key[k] for k in plain.keys])
    km = nearest_centroid(np.load(run / "kmeans_centroids.npy"), x.numpy())
    k = cfg.head.num_clusters  # each clustering's ids mapped onto the labels as ACC maps them (Hungarian)
    wrong = np.flatnonzero(align_clusters(y, clusters, k)[clusters] != y)
    km_wrong = np.flatnonzero(align_clusters(y, km, k)[km] != y)
    table = load_or_build(cache_dir(cfg), cfg.data.train_split, 10, len(y), st)
    same = (y[table] == y[:, None]).mean(1)
    return {"run": str(run), "errors": len(wrong), "error_labels": np.bincount(y[wrong]).tolist(),
            "kmeans_errors": len(km_wrong), "kmeans_errors_among_them": len(np.intersect1d(wrong, km_wrong)),
            "knn10_same_label_of_errors": same[wrong].round(2).tolist(),
            "knn10_same_label_mean": round(float(same.mean()), 3),
            "linear_probe_train_acc": round(float(LogisticRegression(max_iter=5000).fit(x, y).score(x, y)), 4)}


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
    p.add_argument("--choices", action="store_true", help="every head's modularity on the neighbour graph instead")
    p.add_argument("--gate", action="store_true", help="the vote of the heads within a loss margin of the lowest")
    p.add_argument("--errors", action="store_true", help="where the reported clustering errs, and why, instead")
    p.add_argument("--consistency", action="store_true", help="each head's view consistency and the votes it gates")
    p.add_argument("--independent", type=int, default=0, metavar="W",
                   help="the vote of head 0 of every W consecutive runs (seeds in order) instead")
    args = p.parse_args()
    st = D.init_distributed("cpu", "gloo", 600)
    rows = independent(args.runs, args.independent, st) if args.independent else []
    for row in rows:
        print(json.dumps(row), flush=True)
    for run in args.runs if not args.independent else []:
        mode = (ensembles if args.ensembles else choices if args.choices else errors if args.errors
                else view_consistency if args.consistency
                else gated if args.gate else refine)
        rows.append(mode(run, st))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
