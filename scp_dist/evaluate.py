"""Evaluation: cluster every sample of a split once (no augmentation), gather on rank 0, choose
the reported clustering without labels, score it next to k-means on the same features, save."""

from __future__ import annotations

import csv
import ctypes
import io
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from scipy.optimize import linear_sum_assignment

from scp_dist import distributed as D
from scp_dist.data.batch import DataError
from scp_dist.fileio import atomic_write, atomic_write_text
from scp_dist.kmeans import kmeans_fit, nearest_centroid
from scp_dist.metrics import clustering_scores, nmi

log = logging.getLogger("scp_dist")
# What a finished run keeps for scp_dist.predict beside eval.json: the k-means baseline's centroids
# (K, D), so new images get a k-means cluster too.
KMEANS_CENTROIDS = "kmeans_centroids.npy"


class KMeansBaseline(dict):
    """The k-means cluster per sample of each split (a plain dict of split -> (n,) ids, as before),
    carrying the (K, D) centroids it assigned with, which report() saves with the run: train.evaluate
    hands this object from kmeans_baseline to report unchanged, and only report knows the run dir."""

    def __init__(self, clusters: dict[str, np.ndarray], centroids: np.ndarray) -> None:
        super().__init__(clusters)
        self.centroids = centroids


@dataclass
class Predictions:
    keys: list[str]
    labels: np.ndarray  # (n,) int, -1 where unlabeled
    clusters: np.ndarray  # (H, n) int; with head.select=consensus, row H is the heads' consensus
    confidence: np.ndarray  # (H, n) float, the winning cluster's probability

    def scores(self, head: int) -> dict[str, float]:
        return clustering_scores(self.labels, self.clusters[head])


def _return_freed_memory() -> None:
    """glibc keeps the freed (n, K) softmax temporaries of each batch in its heap, pinned there by
    the small arrays the loop keeps between them: at K = 1,000 a rank grew by 8 KB per evaluated
    sample (7.4 GB at 1.28M samples, benchmarks/rehearsal_imagenet1k-shape.md). malloc_trim hands
    the free pages back (about a millisecond per batch). A no-op off glibc."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


try:
    _libc: object | None = ctypes.CDLL(None)
except OSError:  # pragma: no cover - no C library to load (not Linux)
    _libc = None


@torch.no_grad()
def predict(batches: Iterable[tuple[torch.Tensor, list[str], torch.Tensor]], head: torch.nn.Module,
            st: D.DistState, keep_features: bool = False, split: str = ""
            ) -> tuple[Predictions | None, np.ndarray | None]:
    """features -> head for this rank's (features, keys, labels) batches of a split (from either
    feature source). Returns rank 0's Predictions of every rank in canonical order (None on the
    others) and, when asked, THIS rank's features: features never travel to one rank whole (at
    ImageNet scale that is gigabytes); the k-means baseline gathers only the sample it fits on.
    Raises DataError on every rank when no rank could read a single sample of the split."""
    head_was_training = head.training
    head.eval()
    keys: list[str] = []
    labels, clusters, conf, feats = [], [], [], []
    for f, batch_keys, batch_labels in batches:
        c, k = head(f.float()).float().softmax(-1).max(-1)  # (H, n)
        keys.extend(batch_keys)
        labels.append(batch_labels.cpu().numpy())
        clusters.append(k.cpu().numpy())
        conf.append(c.cpu().numpy())
        if keep_features:
            feats.append(f.float().cpu().numpy())
        _return_freed_memory()
    head.train(head_was_training)
    local = (
        keys,
        np.concatenate(labels) if labels else np.zeros(0, np.int64),
        np.concatenate(clusters, axis=1) if clusters else None,
        np.concatenate(conf, axis=1) if conf else None,
    )
    local_feats = (np.concatenate(feats) if feats else np.zeros((0, 1), np.float32)) if keep_features else None
    # Counted on every rank, so all of them raise together rather than one waiting in the next collective.
    if int(D.sum_detached(len(keys), st.collective_device).item()) == 0:
        raise DataError(f"no sample of {split or 'the split'} could be read for evaluation: every one was "
                        "skipped (the warnings above name each and why)")
    parts = D.gather_objects(local)
    if parts is None:
        return None, local_feats
    parts = [p for p in parts if p[0]]  # ranks with an empty eval range
    return Predictions(
        keys=[k for p in parts for k in p[0]],
        labels=np.concatenate([p[1] for p in parts]),
        clusters=np.concatenate([p[2] for p in parts], axis=1),
        confidence=np.concatenate([p[3] for p in parts], axis=1),
    ), local_feats


def kmeans_baseline(cfg: DictConfig, st: D.DistState, local: dict[str, np.ndarray]) -> KMeansBaseline | None:
    """faiss k-means on the frozen features the head saw, fitted on the training split and applied
    to every split: each run carries its own baseline. Collective, and sized for large data: rank 0
    draws a seeded uniform sample of at most K x output.kmeans_max_points training rows (canonical
    order, so the same on any world size), only those rows are gathered, the centroids are
    broadcast, and each rank assigns its own rows. Rank 0 returns the cluster per sample of each
    split in canonical order, with the centroids (report() saves them as KMEANS_CENTROIDS); the
    others None."""
    k = cfg.head.num_clusters
    train = local[cfg.data.train_split]
    n, _, rows = D.gather_sample(train, k * cfg.output.kmeans_max_points, cfg.train.seed, st)
    if n < k:  # train.check_data refuses K > the data set; here samples were skipped on top of that
        if st.is_main:
            log.warning("no k-means baseline: %d readable training samples for %d clusters", n, k)
        return None
    centroids = None
    if st.is_main:
        x = np.concatenate([r for r in rows if len(r)])
        centroids = kmeans_fit(x, k, seed=cfg.train.seed, niter=cfg.output.kmeans_niter,
                               nredo=cfg.output.kmeans_nredo).centroids
    centroids = D.broadcast_object(centroids)
    out = {}
    for split, feats in local.items():
        parts = D.gather_objects(nearest_centroid(centroids, feats) if len(feats) else np.zeros(0, np.int64))
        if parts is not None:
            out[split] = np.concatenate(parts)
    return KMeansBaseline(out, np.asarray(centroids, dtype=np.float32)) if st.is_main else None


# ---------------------------------------------------------------- label-free choice among heads


def head_agreement(clusters: np.ndarray) -> list[float]:
    """(H, n) cluster ids -> per head, the mean NMI of its clustering with each other head's."""
    h = len(clusters)
    pair = np.eye(h)
    for i in range(h):
        for j in range(i + 1, h):
            pair[i, j] = pair[j, i] = nmi(clusters[i], clusters[j])
    return ((pair.sum(1) - 1) / max(h - 1, 1)).tolist()


def align_clusters(reference: np.ndarray, other: np.ndarray, k: int) -> np.ndarray:
    """The relabelling of `other`'s cluster ids that best matches `reference` (Hungarian on the
    K x K co-occurrence table): mapping[c] = the reference id for other's cluster c."""
    table = np.zeros((k, k), dtype=np.int64)
    np.add.at(table, (other, reference), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    mapping = np.arange(k)
    mapping[rows] = cols
    return mapping


def consensus(clusters: np.ndarray, confidence: np.ndarray, mappings: np.ndarray, k: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """Every head's clusters relabelled into the reference's ids (mappings: (H, K)), then a vote per
    sample weighted by each head's confidence. Returns (cluster, share of the vote) per sample.

    A sample's vote has at most H candidates, so it is tallied per head, not per cluster: an (n, K)
    tally would be 10 GB at ImageNet-1K's n and K = 1,000. Ties go to the lowest cluster id."""
    aligned = np.take_along_axis(mappings, clusters, axis=1)  # (H, n) ids in the reference's labels
    votes = np.zeros(clusters.shape)  # votes[i, s]: the weight behind head i's choice for sample s
    for j in range(len(clusters)):
        votes += np.where(aligned == aligned[j], confidence[j], 0.0)
    best = votes.max(0)
    winner = np.where(votes == best, aligned, k).min(0)
    return winner, best / np.maximum(confidence.sum(0), 1e-12)


def vote_weights(head_losses: torch.Tensor, margin: float) -> np.ndarray:
    """(H,) 1 for the heads whose final loss is within `margin` of the lowest, else 0: who votes."""
    losses = head_losses.double().numpy()
    return (losses <= losses.min() + margin).astype(np.float64)


def vote_alignment(clusters: np.ndarray, agreement: list[float], weights: np.ndarray, k: int) -> np.ndarray:
    """(H, K): every head's relabelling into the ids of the voter that agrees most with the others."""
    reference = int(np.argmax(np.where(weights > 0, agreement, -np.inf)))
    return np.stack([align_clusters(clusters[reference], c, k) for c in clusters])


def choose_head(select: str, head_losses: torch.Tensor, agreement: list[float] | None = None) -> int:
    """Label-free choice of one head: the most agreement, else the lowest final training loss."""
    if select == "agreement" and agreement is not None:
        return int(np.argmax(agreement))
    return int(torch.argmin(head_losses))


# ---------------------------------------------------------------- the report


def report(cfg: DictConfig, preds: dict[str, Predictions], head_losses: torch.Tensor, out_dir: Path,
           kmeans: dict[str, np.ndarray] | None = None) -> dict:
    """Rank 0: choose the reported clustering without labels, score it and the k-means baseline,
    write eval.json and the assignments, print one line per split."""
    num_heads = len(head_losses)
    train = preds[cfg.data.train_split]
    agreement = head_agreement(train.clusters) if num_heads > 1 else None
    mappings = weights = None
    if cfg.head.select == "consensus" and num_heads > 1:
        assert agreement is not None
        k = cfg.head.num_clusters
        weights = vote_weights(head_losses, cfg.head.vote_margin)
        # Aligned once on the training split, so every split is voted with the same relabelling.
        mappings = vote_alignment(train.clusters, agreement, weights, k)
        for p in preds.values():
            c, conf = consensus(p.clusters[:num_heads], p.confidence[:num_heads] * weights[:, None], mappings, k)
            p.clusters, p.confidence = np.vstack([p.clusters, c]), np.vstack([p.confidence, conf])
        chosen = num_heads  # the consensus row
    else:
        chosen = choose_head(cfg.head.select, head_losses, agreement)
    baseline = {split: clustering_scores(preds[split].labels, c) for split, c in (kmeans or {}).items()}
    results: dict = {"chosen_head": chosen, "select": cfg.head.select, "head_losses": head_losses.tolist(),
                     "head_agreement": agreement, "splits": {}}
    if mappings is not None:  # scp_dist.predict votes new images with the same relabelling and voters
        results["consensus_mappings"] = mappings.tolist()
        results["consensus_weights"] = weights.tolist()
    centroids = getattr(kmeans, "centroids", None)
    if centroids is not None:
        atomic_write(out_dir / KMEANS_CENTROIDS, lambda f: np.save(f, centroids))
    for split, pred in preds.items():
        per_head = [pred.scores(h) for h in range(num_heads)]
        entry: dict = {"scores": pred.scores(chosen), "num_samples": len(pred.keys)}
        if split in baseline:
            entry["kmeans"] = baseline[split]
        if num_heads > 1 and per_head[0].get("n"):
            accs = np.array([s["acc"] for s in per_head])
            entry["all_heads"] = per_head
            entry["acc_over_heads"] = {"mean": float(accs.mean()), "std": float(accs.std()),
                                       "min": float(accs.min()), "max": float(accs.max())}
        results["splits"][split] = entry
        if cfg.output.save_assignments:
            write_assignments(out_dir / f"assignments_{split}.csv", pred, chosen)
        print(format_scores(f"[{cfg.data.name}/{split}] SCP    ", entry["scores"]), flush=True)
        if split in baseline:
            print(format_scores(f"[{cfg.data.name}/{split}] k-means", baseline[split]), flush=True)
    write_json(out_dir / "eval.json", results)
    return results


def write_assignments(path: Path, pred: Predictions, head: int) -> None:
    """key, cluster, probability, label per sample, written atomically."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["key", "cluster", "probability", "label"])
    for key, c, p, y in zip(pred.keys, pred.clusters[head], pred.confidence[head], pred.labels, strict=True):
        w.writerow([key, int(c), f"{float(p):.6f}", int(y)])
    atomic_write_text(path, buf.getvalue())


def write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def format_scores(name: str, s: dict[str, float]) -> str:
    if not s.get("n"):
        return f"{name}: no labels, clusters only"
    return f"{name}: ACC {100 * s['acc']:.2f}  NMI {100 * s['nmi']:.2f}  ARI {100 * s['ari']:.2f}  (n={s['n']})"
