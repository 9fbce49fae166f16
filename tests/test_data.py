"""Epoch semantics of the data path (plan + reader + torch augmentation), and bad-input handling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from scp_dist.config import AugmentConfig, DataConfig
from scp_dist.data import plan as P
from scp_dist.data.augment_torch import ViewSpec, decode_rgb, draw_view
from scp_dist.data.loader import DataError, build_eval_loader, build_train_loader
from scp_dist.shards.sources import encode_png
from scp_dist.shards.writer import Sample, write_shards
from tests.dist_helpers import run_gloo
from tests.helpers import bad_dataset

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def data_cfg(**kw):
    return OmegaConf.structured(DataConfig(**{"loader": "torch", "num_workers": 0, **kw}))


def make_dataset(root: Path, n: int, per_shard: int, size: int = 12) -> Path:
    rng = np.random.default_rng(1)
    items = (Sample(f"k{i:05d}", encode_png(rng.integers(0, 256, (size, size + 2, 3), dtype=np.uint8)), "png", i % 4)
             for i in range(n))
    write_shards(items, root, source="t", split="train", classes=list("abcd"), max_count=per_shard, progress=False)
    return root


def train_loader(root: Path, world: int, rank: int, batch: int, seed: int = 0, **kw):
    return build_train_loader(root, data_cfg(**kw), OmegaConf.structured(AugmentConfig()), world_size=world,
                              rank=rank, global_batch=batch, image_size=8, mean=MEAN, std=STD, seed=seed,
                              device=torch.device("cpu"))


@pytest.mark.parametrize("order", P.ORDERS)
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("counts", [[100], [30, 30, 30, 13], [7] * 15, [50, 1, 49, 3]])
def test_plan_is_disjoint_equal_length_and_covers_all_but_a_partial_batch(world, counts, order):
    g, n = 16, sum(counts)
    for epoch in range(3):
        rows = [P.train_plan(counts, g, world, r, 3, epoch, order, shuffle_buffer=10) for r in range(world)]
        steps = n // g
        assert all(r.shape == (steps, b) for r, b in zip(rows, P.rank_batch_sizes(g, world), strict=True))
        seen = np.concatenate([r.ravel() for r in rows])
        assert len(np.unique(seen)) == len(seen) == steps * g  # disjoint, each at most once
        assert n - len(seen) < g and seen.min() >= 0 and seen.max() < n
    again = P.train_plan(counts, g, world, 0, 3, 1, order, shuffle_buffer=10)
    np.testing.assert_array_equal(again, P.train_plan(counts, g, world, 0, 3, 1, order, shuffle_buffer=10))


@pytest.mark.parametrize("order", P.ORDERS)
def test_plan_changes_order_and_left_out_tail_between_epochs(order):
    counts = [10] * 10
    e0 = P.train_plan(counts, 32, 2, 0, 0, 0, order, shuffle_buffer=64)
    e1 = P.train_plan(counts, 32, 2, 0, 0, 1, order, shuffle_buffer=64)
    assert not np.array_equal(e0, e1)
    left = [set(range(100)) - set(np.concatenate([P.train_plan(counts, 32, 2, r, 0, e, order, 64).ravel()
                                                   for r in (0, 1)]))
            for e in range(4)]
    assert len({frozenset(x) for x in left}) > 1


def _global_batches(counts, g, world, epoch, order):
    """Step s's global batch as the set of sample indices over all ranks."""
    rows = [P.train_plan(counts, g, world, r, 5, epoch, order, shuffle_buffer=64) for r in range(world)]
    return [frozenset(np.concatenate([r[s] for r in rows]).tolist()) for s in range(len(rows[0]))]


def test_global_order_gives_the_same_global_batches_on_any_world_size():
    counts = [40, 13, 77, 30]
    for epoch in range(3):
        one = _global_batches(counts, 24, 1, epoch, "global")
        for world in (2, 3, 5):
            assert _global_batches(counts, 24, world, epoch, "global") == one
    # Counter-test: the windowed order depends on the world size, so the check above can fail.
    assert _global_batches(counts, 24, 2, 0, "windowed") != _global_batches(counts, 24, 1, 0, "windowed")


def test_global_order_batches_are_uniform_over_class_sorted_shards():
    """Shards written class by class (10 classes of 200, 2 shards per class): with the global order a
    batch's class counts pass a chi-square test against uniform sampling; the windowed order fails it."""
    from scipy.stats import chisquare

    labels = np.repeat(np.arange(10), 200)
    counts = [100] * 20

    def pooled_p(order: str) -> float:
        stat, dof = 0.0, 0
        for epoch in range(2):
            for batch in _global_batches(counts, 100, 2, epoch, order):
                c = np.bincount(labels[sorted(batch)], minlength=10)
                stat += chisquare(c).statistic
                dof += 9
        from scipy.stats import chi2

        return float(chi2.sf(stat, dof))

    assert pooled_p("global") > 1e-3
    assert pooled_p("windowed") < 1e-6


def test_eval_ranges_cover_everything_once():
    for n in (1, 7, 100):
        for world in (1, 2, 3, 8):
            idx = np.concatenate([np.arange(r.start, r.stop) for r in (P.eval_range(n, world, k) for k in range(world))])
            np.testing.assert_array_equal(idx, np.arange(n))


def _rank_keys(rank, world, root, out_dir, shards_note):
    del shards_note
    loader = train_loader(Path(root), world, rank, batch=10)
    per_epoch = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        keys, steps = [], 0
        for b in loader:
            assert b.views[0].shape == b.views[1].shape == (len(b.keys), 3, 8, 8)
            keys.extend(b.keys)
            steps += 1
        # every rank runs the same number of steps: a collective over the step count must agree
        t = torch.tensor([steps])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        assert int(t) == steps == len(loader)
        per_epoch.append(keys)
    torch.save(per_epoch, Path(out_dir) / f"keys{rank}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("world,per_shard", [(2, 9), (3, 40), (3, 100)])  # 100/shard: fewer shards than ranks
@pytest.mark.multiprocess
def test_ranks_read_disjoint_keys_covering_the_epoch(tmp_path, world, per_shard):
    root = make_dataset(tmp_path / "ds", 87, per_shard)
    run_gloo(_rank_keys, world, str(root), str(tmp_path), per_shard)
    keys = [torch.load(tmp_path / f"keys{r}.pt") for r in range(world)]
    for epoch in (0, 1):
        allk = [k for r in range(world) for k in keys[r][epoch]]
        assert len(allk) == len(set(allk)) == (87 // 10) * 10
    assert keys[0][0] != keys[0][1]


def test_same_seed_same_order_and_views_independent_of_world_size(tmp_path):
    root = make_dataset(tmp_path / "ds", 40, 10)

    def epoch_views(world, rank, seed):
        ld = train_loader(root, world, rank, batch=8, seed=seed)
        ld.set_epoch(2)
        return {k: (a, b) for bt in ld for k, a, b in zip(bt.keys, bt.views[0], bt.views[1], strict=True)}

    one = epoch_views(1, 0, 5)
    assert one.keys() == epoch_views(1, 0, 5).keys()
    again = epoch_views(1, 0, 5)
    assert all(torch.equal(one[k][0], again[k][0]) and torch.equal(one[k][1], again[k][1]) for k in one)
    split = {**epoch_views(2, 0, 5), **epoch_views(2, 1, 5)}
    for k in set(one) & set(split):  # the same sample gets the same two views whatever the world size
        assert torch.equal(one[k][0], split[k][0]) and torch.equal(one[k][1], split[k][1])
    other = epoch_views(1, 0, 6)
    assert any(not torch.equal(one[k][0], other[k][0]) for k in set(one) & set(other))


def test_crop_and_blur_frequencies():
    spec = ViewSpec(8, MEAN, STD)
    rng = np.random.default_rng(0)
    draws = [draw_view(rng, 20, 30, spec) for _ in range(4000)]
    crop = np.mean([d.crop is not None for d in draws])
    blur = np.mean([d.sigma is not None for d in draws])
    bound = 4 * np.sqrt(0.25 / 4000)
    assert abs(crop - 0.5) < bound and abs(blur - 0.5) < bound
    for d in draws:
        if d.crop is not None:
            top, left, h, w = d.crop
            assert top >= 0 and top + h <= 20 and left >= 0 and left + w <= 30 and 10 <= h <= 20
        if d.sigma is not None:
            assert 0.1 <= d.sigma <= 2.0


def test_eval_loader_is_unaugmented_and_complete(tmp_path):
    root = make_dataset(tmp_path / "ds", 23, 10, size=8)
    keys, labels = [], []
    for rank in range(3):
        ld = build_eval_loader(root, data_cfg(), world_size=3, rank=rank, batch_size=4, image_size=10, mean=MEAN,
                               std=STD, device=torch.device("cpu"))
        for b in ld:
            assert len(b.views) == 1 and b.views[0].shape[1:] == (3, 10, 10)
            keys.extend(b.keys)
            labels.extend(b.labels.tolist())
    assert keys == [f"k{i:05d}" for i in range(23)] and labels == [i % 4 for i in range(23)]


def test_bad_samples_are_counted_and_skipped(tmp_path, caplog):
    root = bad_dataset(tmp_path / "bad")
    ld = train_loader(root, 1, 0, batch=10, on_error="skip")
    ld.set_epoch(0)
    keys = [k for b in ld for k in b.keys]
    stats = ld.stats.as_dict()
    assert stats["corrupt_image"] == 1 and stats["missing_image"] == 1 and stats["truncated"] >= 8
    assert "k003" not in keys and "k005" not in keys
    assert len(keys) == 30 - sum(stats.values())
    assert set(keys) >= {f"k{i:03d}" for i in range(20, 30)}
    assert "skipping sample" in caplog.text
    ld.set_epoch(1)
    assert sum(ld.stats.as_dict().values()) == 0  # counts are per epoch


def test_bad_samples_raise_when_asked(tmp_path):
    root = bad_dataset(tmp_path / "bad")
    ld = train_loader(root, 1, 0, batch=30, on_error="raise")
    with pytest.raises(DataError, match="k00[35]|truncated"):
        list(ld)


def test_missing_shard_file_is_skipped_not_fatal(tmp_path):
    root = make_dataset(tmp_path / "ds", 30, 10)
    ld = train_loader(root, 1, 0, batch=10)
    (root / "shard-000001.tar").unlink()  # disappears after the manifest was read
    keys = [k for b in ld for k in b.keys]
    assert len(keys) == 20 and ld.stats.as_dict()["missing_shard"] == 10


def test_too_small_dataset_and_worker_processes(tmp_path):
    root = make_dataset(tmp_path / "ds", 30, 10)
    with pytest.raises(Exception, match="fewer than train.global_batch"):
        train_loader(root, 1, 0, batch=64)
    a = [b.keys for b in train_loader(root, 1, 0, batch=8, num_workers=2)]
    b = [b.keys for b in train_loader(root, 1, 0, batch=8, num_workers=0)]
    assert a == b


def test_decode_rejects_garbage():
    with pytest.raises(Exception):  # noqa: B017 - PIL raises several types
        decode_rgb(b"not an image")
