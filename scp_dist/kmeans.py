"""k-means on frozen features with faiss: the baseline SCP's head has to beat on the same features."""

from __future__ import annotations

from typing import Any

import numpy as np


def kmeans_fit(features: np.ndarray, k: int, seed: int = 0, niter: int = 100, nredo: int = 10,
               max_points_per_centroid: int = 0, use_gpu: bool | None = None) -> Any:
    """A trained faiss.Kmeans. nredo restarts keep the best objective, as sklearn's n_init does;
    max_points_per_centroid > 0 trains on a seeded sample of k times that many rows (faiss's own
    sampling), which keeps ImageNet-size baselines to seconds; 0 uses every row."""
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss is a declared dependency
        raise ImportError("k-means needs faiss: pip install 'scp_dist[cpu]' (or [gpu])") from e
    x = np.ascontiguousarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < k:
        raise ValueError(f"k-means needs at least k={k} rows of 2-d features, got shape {x.shape}")
    gpu = faiss.get_num_gpus() > 0 if use_gpu is None else use_gpu
    per_centroid = max_points_per_centroid or x.shape[0] // k + 1
    km = faiss.Kmeans(x.shape[1], k, niter=niter, nredo=nredo, seed=seed, gpu=gpu, verbose=False,
                      max_points_per_centroid=per_centroid)
    km.train(x)
    return km


def kmeans_predict(km: Any, features: np.ndarray) -> np.ndarray:
    """Nearest centroid of each row."""
    _, idx = km.index.search(np.ascontiguousarray(features, dtype=np.float32), 1)
    return idx[:, 0].astype(np.int64)


def nearest_centroid(centroids: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Nearest of the given (K, D) centroids for each row: what kmeans_predict does, from the
    centroids alone, so every rank can assign its own rows after rank 0 fitted."""
    import faiss

    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    _, idx = index.search(np.ascontiguousarray(features, dtype=np.float32), 1)
    return idx[:, 0].astype(np.int64)


def kmeans_assign(features: np.ndarray, k: int, seed: int = 0, niter: int = 100, nredo: int = 10,
                  use_gpu: bool | None = None) -> np.ndarray:
    """Cluster index per row, fitted on the same rows."""
    return kmeans_predict(kmeans_fit(features, k, seed, niter, nredo, use_gpu=use_gpu), features)
