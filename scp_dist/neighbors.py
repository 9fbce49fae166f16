"""Nearest neighbours in the frozen feature space as extra positive pairs (cached mode).

The paper pairs two augmented views of the same image. With a strong pre-trained backbone the
images nearest to x in feature space are mostly of x's class, and a far richer source of
"these belong together" than a crop or a blur (SCAN's and TEMI's observation). With
`neighbors.k > 0`, view b of sample i is, with probability `neighbors.p`, view b of one of i's k
nearest training neighbours instead of i's own: y^a_i and y^b_j are pushed to agree, the loss is
otherwise the paper's.

The table is computed once per feature cache (it depends on the backbone and the data, not on the
seed): cosine similarity of the plain (unaugmented) training features, searched with faiss through
the package's one index (faiss_index.py: exact up to 10^5 images, IVF above, on a GPU if faiss sees one),
stored next to the features as `<cache>/<split>/knn-<k>.npy`, indexed by global sample index
(rows of samples absent from the cache are -1). Which neighbour a sample takes in an epoch is a
function of (seed, epoch, sample) only, drawn over the whole data set, so the batches are the
same on any world size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scp_dist import distributed as D
from scp_dist.faiss_index import build_index, normalise, on_gpu
from scp_dist.fileio import atomic_write

_CHUNK = 4096  # query rows per faiss call: bounds the (chunk, N) similarity block's memory


def knn_table(feats: np.ndarray, k: int) -> np.ndarray:
    """(N, k) row indices of each row's k most cosine-similar other rows, nearest first (exact below
    faiss_index.IVF_MIN_ROWS rows; approximate above, where exact search is quadratic)."""
    x = normalise(feats)
    k = min(k, len(x) - 1)
    index = on_gpu(build_index(x))  # exact up to faiss_index.IVF_MIN_ROWS rows, IVF above: the search's index
    out = np.empty((len(x), k), dtype=np.int64)
    for lo in range(0, len(x), _CHUNK):
        _, idx = index.search(x[lo:lo + _CHUNK], k + 1)
        # Drop the query itself: usually first, but an exact duplicate can tie with it, so it is
        # found by index, and a row where it is absent keeps its first k (a stable sort keeps order).
        is_self = idx == np.arange(lo, lo + len(idx))[:, None]
        keep = np.argsort(is_self, axis=1, kind="stable")[:, :k]
        out[lo:lo + len(idx)] = np.take_along_axis(idx, keep, axis=1)
    return out


def neighbor_count(k: int, num_samples: int, num_clusters: int) -> int:
    """The neighbours to draw from: `neighbors.k`, but at most a quarter of a cluster's expected size
    (N / K images), 0 (none) below 4. A neighbour list longer than the class must reach into other
    classes: with 10 images per class (300 images, K = 30) the 10 nearest are 35 % of the image's class
    and SCP scored 6 points under k-means with them, 6 over it with the 2 nearest (docs/RESULTS.md,
    "Many clusters on real images")."""
    return min(k, num_samples // (4 * num_clusters))


def neighbor_path(root: Path, split: str, k: int) -> Path:
    return root / split / f"knn-{k}.npy"


def load_or_build(root: Path, split: str, k: int, num_samples: int, st: D.DistState) -> np.ndarray:
    """The (num_samples, k) neighbour table of global sample indices (-1 where a sample is absent),
    built by rank 0 on first use from the cached plain features, read by every rank."""
    path = neighbor_path(root, split, k)
    if st.is_main and not path.is_file():
        from scp_dist.feature_cache import load_kind

        plain = load_kind(root, split, "plain", with_keys=False)
        rows = knn_table(plain.feats[0].float().numpy(), k)
        table = np.full((num_samples, rows.shape[1]), -1, dtype=np.int64)
        table[plain.index] = plain.index[rows]
        atomic_write(path, lambda f: np.save(f, table))
    D.barrier()
    return np.load(path)


def epoch_partners(table: np.ndarray, p: float, seed: int, epoch: int) -> np.ndarray:
    """(N,) the sample whose view b each sample is paired with in this epoch: itself or, with
    probability p, one of its neighbours, uniformly. Drawn for the whole data set from (seed,
    epoch), so every rank, at any world size, gives a sample the same partner."""
    rng = np.random.default_rng([seed, epoch, 0x6E6E])
    n, k = table.shape
    own = np.arange(n)
    cand = table[own, rng.integers(0, k, size=n)]
    return np.where((rng.random(n) < p) & (cand >= 0), cand, own)
