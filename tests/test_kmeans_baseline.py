"""The k-means baseline at scale: only a seeded sample of at most K x output.kmeans_max_points rows
is gathered and fitted, every rank assigns its own rows, and the result is the same on any world
size (the sample is drawn in canonical order)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scp_dist.config import load_config
from scp_dist.distributed import DistState
from scp_dist.kmeans import nearest_centroid
from scp_dist.metrics import clustering_scores
from tests.dist_helpers import run_gloo

K, N, MAX_POINTS = 5, 600, 30


def _mixture(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, K, N)
    centres = rng.normal(0, 4, (K, 8))
    return (centres[labels] + rng.normal(0, 1, (N, 8))).astype(np.float32), labels


def _cfg():
    return load_config(None, [f"head.num_clusters={K}", f"output.kmeans_max_points={MAX_POINTS}",
                              "output.kmeans_nredo=2", "output.kmeans_niter=20"])


def _baseline_rank(rank: int, world: int, out: str) -> None:
    from scp_dist.data.plan import eval_range
    from scp_dist.evaluate import kmeans_baseline

    x, _ = _mixture()
    r = eval_range(N, world, rank)
    res = kmeans_baseline(_cfg(), DistState(rank, world, 0, torch.device("cpu"), "gloo"), {"train": x[r.start:r.stop]})
    if rank == 0:
        np.save(out, res["train"])
    else:
        assert res is None


def test_only_the_sample_is_fitted_and_it_clusters(monkeypatch):
    import scp_dist.evaluate as E

    fitted = []
    real_fit = E.kmeans_fit
    monkeypatch.setattr(E, "kmeans_fit", lambda x, *a, **kw: fitted.append(x.shape) or real_fit(x, *a, **kw))
    x, labels = _mixture()
    res = E.kmeans_baseline(_cfg(), DistState(), {"train": x, "test": x[:50]})
    assert fitted == [(K * MAX_POINTS, 8)]  # 150 of the 600 rows
    assert res["train"].shape == (N,) and np.array_equal(res["test"], res["train"][:50])
    # the same as fitting that seeded sample directly and assigning every row to its centroids
    sample = np.sort(np.random.default_rng(0).choice(N, K * MAX_POINTS, replace=False))
    km = real_fit(x[sample], K, seed=0, niter=20, nredo=2)
    assert np.array_equal(res["train"], nearest_centroid(km.centroids, x))
    assert clustering_scores(labels, res["train"])["acc"] > 0.6  # a clustering, not noise (chance: ~0.25)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_give_the_same_baseline_as_one(tmp_path):
    run_gloo(_baseline_rank, 1, str(tmp_path / "w1.npy"))
    run_gloo(_baseline_rank, 2, str(tmp_path / "w2.npy"))
    assert np.array_equal(np.load(tmp_path / "w1.npy"), np.load(tmp_path / "w2.npy"))
