"""Neighbour pairs (neighbors.k), shared cached views (cache.pair_seed) and the label-free K estimate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from scp_dist.config import ConfigError, load_config
from scp_dist.distributed import DistState
from scp_dist.estimate_k import estimate, laplacian_spectrum
from scp_dist.feature_cache import extract_features, load_kind
from scp_dist.features import CachedFeatures
from scp_dist.models.backbones import build_backbone
from scp_dist.neighbors import epoch_partners, knn_table, load_or_build, neighbor_count
from tests.helpers import overrides


def cached_cfg(tmp: Path, data_root: Path, **kw):
    base = {"train.mode": "cached", "cache.num_pairs": 1, "cache.dtype": "fp32", "cache.dir": str(tmp / "cache"),
            "train.global_batch": 128}
    base.update(kw)
    return load_config("demo_digits", overrides(tmp, data_root, **base))


def test_knn_table_is_the_exact_cosine_neighbours_without_self():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    got = knn_table(x, 5)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = xn @ xn.T
    np.fill_diagonal(sim, -np.inf)
    want = np.argsort(-sim, axis=1)[:, :5]
    assert got.shape == (300, 5) and (got != np.arange(300)[:, None]).all()
    assert (got == want).mean() > 0.99  # float ties may swap a pair; the sets must agree
    assert all(set(g) == set(w) for g, w in zip(got, want, strict=True))
    # Exact duplicates tie with the query itself, which faiss may then list second: still dropped,
    # and each duplicate is the other's nearest.
    x[[11, 12, 13]] = x[10]
    got = knn_table(x, 5)
    assert (got != np.arange(300)[:, None]).all()
    for i in (10, 11, 12, 13):
        assert set(got[i][:3]) == {10, 11, 12, 13} - {i}


def test_partners_depend_on_seed_and_epoch_only_and_p_sets_the_share():
    table = np.random.default_rng(1).integers(0, 1000, size=(1000, 10))
    a = epoch_partners(table, 0.5, seed=3, epoch=2)
    assert (a == epoch_partners(table, 0.5, seed=3, epoch=2)).all()
    assert not (a == epoch_partners(table, 0.5, seed=3, epoch=3)).all()
    own = a == np.arange(1000)
    assert 0.4 < own.mean() < 0.6 and all(a[i] in table[i] for i in np.flatnonzero(~own))
    assert (epoch_partners(table, 0.0, 3, 2) == np.arange(1000)).all()  # counter-check: p = 0 is the paper
    table[:500] = -1  # samples absent from the cache keep their own view
    assert (epoch_partners(table, 1.0, 3, 2)[:500] == np.arange(500)).all()


def test_neighbour_pairs_pair_view_a_with_a_neighbours_view_b(tmp_path, digits_root):
    cfg = cached_cfg(tmp_path, digits_root, **{"neighbors.k": 5, "neighbors.p": 1.0})
    root = Path(cfg.cache.dir)
    extract_features(cfg, DistState(), build_backbone(cfg.backbone), root, "fp32")
    source = CachedFeatures(cfg, DistState(), root)
    table = np.load(root / "train" / "knn-5.npy")
    plain = load_kind(root, "train", "plain")
    assert table.shape == (1797, 5)
    assert (table == knn_table(plain.feats[0].numpy(), 5)).all()
    labels = plain.labels
    assert (labels[table] == labels[:, None]).mean() > 0.8  # neighbours of raw digits mostly share the class
    pair = load_kind(root / "seed0", "train", "pair-000")
    partner = epoch_partners(table, 1.0, cfg.train.seed, 0)
    source.set_epoch(0)
    feats, n = next(iter(source))
    from scp_dist.data.plan import train_plan

    first = train_plan([1797], 128, 1, 0, cfg.train.seed, 0)[0]
    torch.testing.assert_close(feats[:n], pair.feats[0, first])
    torch.testing.assert_close(feats[n:], pair.feats[1, partner[first]])
    assert not torch.equal(feats[n:], pair.feats[1, first])  # counter-check: not the own view b
    # p = 0 reads exactly the paper's pairs
    plain_source = CachedFeatures(cached_cfg(tmp_path, digits_root, **{"neighbors.k": 5, "neighbors.p": 0.0}),
                                  DistState(), root)
    plain_source.set_epoch(0)
    torch.testing.assert_close(next(iter(plain_source))[0][n:], pair.feats[1, first])


def test_neighbour_table_is_built_once_and_read_by_later_runs(tmp_path, digits_root):
    cfg = cached_cfg(tmp_path, digits_root, **{"neighbors.k": 3})
    root = Path(cfg.cache.dir)
    extract_features(cfg, DistState(), build_backbone(cfg.backbone), root, "fp32")
    first = load_or_build(root, "train", 3, 1797, DistState())
    path = root / "train" / "knn-3.npy"
    stamp = path.stat().st_mtime_ns
    assert (load_or_build(root, "train", 3, 1797, DistState()) == first).all()
    assert path.stat().st_mtime_ns == stamp


def test_neighbours_fit_inside_a_cluster_of_the_expected_size(tmp_path, digits_root):
    """neighbors.k is a ceiling: with many clusters for the images (1797 digits, K = 100: about 18 per
    cluster) a sample draws from its 4 nearest, and with fewer than 4 images per cluster from none."""
    assert neighbor_count(10, 1797, 10) == 10 and neighbor_count(10, 300, 30) == 2
    assert neighbor_count(10, 1797, 100) == 4 and neighbor_count(10, 1797, 500) == 0
    cfg = cached_cfg(tmp_path, digits_root, **{"neighbors.k": 10, "head.num_clusters": 100})
    root = Path(cfg.cache.dir)
    extract_features(cfg, DistState(), build_backbone(cfg.backbone), root, "fp32")
    source = CachedFeatures(cfg, DistState(), root)
    assert source.neighbors.shape == (1797, 4) and (root / "train" / "knn-4.npy").is_file()
    # counter-check: K = 10 keeps the configured 10, K = 500 trains on the paper's pairs alone
    assert CachedFeatures(cached_cfg(tmp_path, digits_root, **{"neighbors.k": 10}), DistState(),
                          root).neighbors.shape == (1797, 10)
    assert CachedFeatures(cached_cfg(tmp_path, digits_root, **{"neighbors.k": 10, "head.num_clusters": 500}),
                          DistState(), root).neighbors is None


def test_neighbours_need_cached_mode():
    with pytest.raises(ConfigError, match="neighbors.k"):
        load_config("demo_digits", ["train.mode=stream", "neighbors.k=5"])
    with pytest.raises(ConfigError, match="neighbors.p"):
        load_config("demo_digits", ["train.mode=cached", "neighbors.k=5", "neighbors.p=1.5"])


def test_a_fixed_pair_seed_shares_one_extraction_between_seeds(tmp_path, digits_root):
    backbone = build_backbone(load_config("demo_digits").backbone)
    for seed in (0, 1):
        cfg = cached_cfg(tmp_path, digits_root, **{"cache.pair_seed": 0, "train.seed": seed})
        extract_features(cfg, DistState(), backbone, Path(cfg.cache.dir), "fp32")
    assert sorted(p.name for p in (tmp_path / "cache").glob("seed*")) == ["seed0"]
    # counter-check: the default (-1) draws each seed's own views into its own folder
    cfg = cached_cfg(tmp_path, digits_root, **{"train.seed": 1})
    extract_features(cfg, DistState(), backbone, Path(cfg.cache.dir), "fp32")
    assert sorted(p.name for p in (tmp_path / "cache").glob("seed*")) == ["seed0", "seed1"]


@pytest.mark.parametrize("groups", [2, 4, 7])
def test_the_eigengap_finds_the_number_of_separated_groups(groups):
    rng = np.random.default_rng(groups)
    centres = rng.normal(size=(groups, 32)) * 4
    x = np.concatenate([c + rng.normal(size=(150, 32)) for c in centres]).astype(np.float32)
    ev = laplacian_spectrum(x, 16)
    assert estimate(ev, 2, 15) == groups
    # counter-check: one blob has no group structure for the rule to find at the true size
    blob = rng.normal(size=(150 * groups, 32)).astype(np.float32)
    assert np.diff(laplacian_spectrum(blob, 16))[groups - 1] < np.diff(ev)[groups - 1] / 3
