"""Clustering metrics: ACC (best one-to-one cluster->class map, Hungarian), NMI and ARI.

ACC is computed from the contingency table, so K (clusters) may differ from C (classes): with
K > C, clusters left without a class count as errors. NMI and ARI are scikit-learn's.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def contingency(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """(C, K) counts of (true class, predicted cluster); labels are relabelled to 0..C-1 / 0..K-1."""
    y_true = np.asarray(y_true).ravel()
    y_pred = np.asarray(y_pred).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"label arrays differ in length: {y_true.size} vs {y_pred.size}")
    if y_true.size == 0:
        raise ValueError("no samples to score")
    _, t = np.unique(y_true, return_inverse=True)
    _, p = np.unique(y_pred, return_inverse=True)
    table = np.zeros((t.max() + 1, p.max() + 1), dtype=np.int64)
    np.add.at(table, (t, p), 1)
    return table


def cluster_acc(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    table = contingency(y_true, y_pred)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / table.sum())


def nmi(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mutual information normalised by the arithmetic mean of the two entropies."""
    return float(normalized_mutual_info_score(np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()))


def ari(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(adjusted_rand_score(np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()))


def clustering_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """ACC/NMI/ARI over samples that carry a label (label >= 0)."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    keep = y_true >= 0
    if not keep.any():
        return {"n": 0}
    t, p = y_true[keep], y_pred[keep]
    return {"acc": cluster_acc(t, p), "nmi": nmi(t, p), "ari": ari(t, p), "n": int(keep.sum())}
