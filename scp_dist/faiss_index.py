"""The faiss index over L2-normalised vectors (cosine as inner product) that every nearest-neighbour
search of the package builds: a run's search index (search.py) and the neighbour-pair table
(neighbors.py). Exact below IVF_MIN_ROWS vectors, an inverted file above, on the GPU when faiss
sees one."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

log = logging.getLogger("scp_dist")

# Exact search up to here, IVF from here on. Measured (benchmarks/bench/search.py, results in
# benchmarks/results/search-cpu.json; one thread of a loaded 2-core CPU, 1,280-d vectors as the
# EfficientNet-Lite0 demo's): one exact query costs about 1-2 us per indexed vector (9-19 ms at 10^4,
# 1.0-1.5 s at 10^6), so up to 10^5 an exact query stays near 0.1-0.2 s with exact results, and an
# IVF index (minutes to train at 10^6) buys little; at 10^6 IVF at the default probe answers in
# 0.09-0.12 s, 9-17x faster than exact.
IVF_MIN_ROWS = 100_000
IVF_TRAIN_PER_LIST = 64  # training rows per inverted list (faiss warns below 39)
# Lists probed per query, as a fraction of the lists. Measured at 10^6 (1,000 lists): on clustered
# vectors (a 1,000-component mixture) recall@10 against exact search is 1.000 from 8 lists on; on
# i.i.d. Gaussian vectors, with no neighbourhood structure, 0.11 at 8 lists and 0.20 at 62. 1/16
# (62 lists) keeps a margin for features less clustered than the mixture at 6x the cost of 8.
IVF_PROBE_FRACTION = 1 / 16


def ivf_lists(n: int) -> int:
    """Inverted lists for n vectors: about sqrt(n), the usual balance between scanning the list
    centroids and scanning the probed lists."""
    return max(1, int(round(math.sqrt(n))))


def build_index(x: np.ndarray, kind: str | None = None, seed: int = 0) -> Any:
    """A faiss inner-product index over the rows of x (already normalised for cosine): "flat"
    (exact), "ivf", or by size (IVF_MIN_ROWS) when kind is None."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    kind = kind or ("ivf" if n >= IVF_MIN_ROWS else "flat")
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = ivf_lists(n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        m = min(n, IVF_TRAIN_PER_LIST * nlist)
        sample = x if m == n else x[np.sort(np.random.default_rng(seed).choice(n, m, replace=False))]
        index.train(sample)
        index.nprobe = max(1, int(round(nlist * IVF_PROBE_FRACTION)))
    else:
        raise ValueError(f"index kind {kind!r}: flat | ivf")
    for lo in range(0, n, 65536):
        index.add(x[lo:lo + 65536])
    return index


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def on_gpu(index: Any) -> Any:
    """The index on every GPU faiss sees (flat and IVF-flat indexes have GPU versions), else itself."""
    import faiss

    if getattr(faiss, "get_num_gpus", lambda: 0)() <= 0:
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError) as e:  # a faiss build without this index type on GPU
        log.warning("faiss GPU search unavailable (%s); searching on the CPU", e)
        return index
