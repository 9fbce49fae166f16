"""Clustering metrics: ACC (best one-to-one cluster->class map, Hungarian), NMI and ARI.

All three are computed from one contingency table, so K (clusters) may differ from C (classes):
with K > C, clusters left without a class count as errors in ACC.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


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


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mutual information normalised by the arithmetic mean of the two entropies (sklearn's default)."""
    table = contingency(y_true, y_pred).astype(np.float64)
    n = table.sum()
    h_true, h_pred = _entropy(table.sum(1)), _entropy(table.sum(0))
    if h_true == 0 or h_pred == 0:
        # One side is a single cluster: identical labelings score 1, anything else 0 (as sklearn).
        return 1.0 if h_true == h_pred else 0.0
    nz = table > 0
    outer = np.outer(table.sum(1), table.sum(0))
    mi = float((table[nz] / n * np.log(table[nz] * n / outer[nz])).sum())
    return float(mi / ((h_true + h_pred) / 2))


def ari(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    table = contingency(y_true, y_pred).astype(np.float64)
    n = table.sum()

    def pairs(x: np.ndarray | float) -> np.ndarray | float:
        return x * (x - 1) / 2

    sum_cells = pairs(table).sum()
    sum_rows = pairs(table.sum(1)).sum()
    sum_cols = pairs(table.sum(0)).sum()
    expected = sum_rows * sum_cols / pairs(n)
    max_index = (sum_rows + sum_cols) / 2
    if max_index == expected:  # both labelings trivial (all one cluster, or all singletons)
        return 1.0
    return float((sum_cells - expected) / (max_index - expected))


def clustering_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """ACC/NMI/ARI over samples that carry a label (label >= 0)."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    keep = y_true >= 0
    if not keep.any():
        return {"n": 0}
    t, p = y_true[keep], y_pred[keep]
    return {"acc": cluster_acc(t, p), "nmi": nmi(t, p), "ari": ari(t, p), "n": int(keep.sum())}
