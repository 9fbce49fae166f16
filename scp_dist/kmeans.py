"""k-means on frozen features with faiss: the baseline SCP's head has to beat on the same features."""

from __future__ import annotations

import numpy as np


def kmeans_assign(features: np.ndarray, k: int, seed: int = 0, niter: int = 100, nredo: int = 10,
                  use_gpu: bool | None = None) -> np.ndarray:
    """Cluster index per row. nredo restarts keep the best objective, as sklearn's n_init does."""
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss is a declared dependency
        raise ImportError("k-means needs faiss: pip install 'scp_dist[cpu]' (or [gpu])") from e
    x = np.ascontiguousarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < k:
        raise ValueError(f"k-means needs at least k={k} rows of 2-d features, got shape {x.shape}")
    gpu = faiss.get_num_gpus() > 0 if use_gpu is None else use_gpu
    km = faiss.Kmeans(x.shape[1], k, niter=niter, nredo=nredo, seed=seed, gpu=gpu, verbose=False,
                      max_points_per_centroid=max(256, x.shape[0] // k + 1))
    km.train(x)
    _, idx = km.index.search(x, 1)
    return idx[:, 0].astype(np.int64)
