"""Cached-view mode: the cached features are the streaming views' features, independent of the world
size, resumable, refused when built from another config; the job trains, resumes and evaluates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from scp_dist.config import load_config
from scp_dist.data.augment_torch import ViewSpec, decode_rgb, sample_rng, two_views
from scp_dist.data.loader import build_train_loader
from scp_dist.data.reader import SampleReader
from scp_dist.distributed import DistState
from scp_dist.feature_cache import CacheMismatchError, extract_features, load_kind
from scp_dist.models.backbones import build_backbone
from scp_dist.shards.manifest import read_manifest
from scp_dist.train import train
from tests.dist_helpers import run_gloo
from tests.helpers import bad_dataset, head_params, overrides, run_cli


def cached_cfg(tmp: Path, data_root: Path, **kw):
    base = {"train.mode": "cached", "cache.num_pairs": 2, "cache.dtype": "fp32", "cache.dir": str(tmp / "cache")}
    base.update(kw)
    return load_config("demo_digits", overrides(tmp, data_root, **base))


def _extract(cfg) -> Path:
    st = DistState()
    backbone = build_backbone(cfg.backbone)
    extract_features(cfg, st, backbone, Path(cfg.cache.dir), "fp32")
    return Path(cfg.cache.dir)


@pytest.mark.slow
def test_pair_m_holds_the_views_streaming_draws_in_epoch_m(tmp_path, digits_root):
    cfg = cached_cfg(tmp_path, digits_root)
    root = _extract(cfg)
    backbone = build_backbone(cfg.backbone)
    spec = ViewSpec.from_config(cfg.augment, backbone.image_size, backbone.mean, backbone.std)
    reader = SampleReader(read_manifest(digits_root / "train"))
    for m in (0, 1):
        pair = load_kind(root / "seed0", "train", f"pair-{m:03d}")
        assert pair.feats.shape == (2, 1797, backbone.feature_dim)
        assert (pair.index == np.arange(1797)).all()
        for i in (0, 500, 1796):
            a, b = two_views(decode_rgb(reader.read(i).image), spec, sample_rng(cfg.train.seed, m, i))
            with torch.no_grad():
                want = backbone(torch.stack([a, b]))
            torch.testing.assert_close(pair.feats[:, i], want)
        # The streaming job's own loader in epoch m: its first batch's views, through the backbone.
        stream = build_train_loader(digits_root / "train", cfg.data, cfg.augment, world_size=1, rank=0,
                                    global_batch=cfg.train.global_batch, image_size=backbone.image_size,
                                    mean=backbone.mean, std=backbone.std, seed=cfg.train.seed,
                                    device=torch.device("cpu"))
        stream.set_epoch(m)
        batch = next(iter(stream))
        with torch.no_grad():
            want = torch.stack([backbone(v) for v in batch.views], dim=1)  # (n, 2, D)
        torch.testing.assert_close(torch.from_numpy(pair.take(np.asarray(batch.indices))), want)
    p0, p1 = (load_kind(root / "seed0", "train", f"pair-{m:03d}").feats for m in (0, 1))
    assert not torch.equal(p0, p1)  # different epochs, different views
    plain = load_kind(root, "train", "plain")
    assert plain.feats.shape == (1, 1797, backbone.feature_dim) and plain.keys[0] == reader.read(0).key


def _extract_rank(rank: int, world: int, cfg_path: str) -> None:
    from omegaconf import OmegaConf

    from scp_dist import distributed as D

    cfg = OmegaConf.load(cfg_path)
    st = D.DistState(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"), backend="gloo")
    extract_features(cfg, st, build_backbone(cfg.backbone), Path(cfg.cache.dir), "fp32")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_write_the_same_cache_as_one(tmp_path, digits_root):
    from omegaconf import OmegaConf

    one = _extract(cached_cfg(tmp_path / "w1", digits_root))
    cfg2 = cached_cfg(tmp_path / "w2", digits_root)
    cfg_path = tmp_path / "cfg2.yaml"
    OmegaConf.save(cfg2, cfg_path)
    run_gloo(_extract_rank, 2, str(cfg_path))
    two = Path(cfg2.cache.dir)
    assert len(list((two / "seed0" / "train").glob("pair-000.w002.r*.npy"))) == 2
    for kind in ("pair-000", "pair-001", "plain"):
        sub = "." if kind == "plain" else "seed0"
        a, b = load_kind(one / sub, "train", kind), load_kind(two / sub, "train", kind)
        assert (a.index == b.index).all() and a.keys == b.keys and (a.labels == b.labels).all()
        torch.testing.assert_close(a.feats, b.feats)
    pair = load_kind(two / "seed0", "train", "pair-000", with_keys=False)  # two memory-mapped parts
    rows = np.array([1796, 0, 899, 898, 5])  # rank 0 holds 0..898, rank 1 899..1796
    torch.testing.assert_close(torch.from_numpy(pair.take(rows)), pair.feats[:, rows].transpose(0, 1))


@pytest.mark.slow
def test_rerun_skips_done_work_redoes_missing_and_refuses_other_configs(tmp_path, digits_root):
    cfg = cached_cfg(tmp_path, digits_root)
    root = _extract(cfg)
    man = json.loads((root / "manifest.json").read_text())
    assert man["backbone"] == {"name": "pixels", "feature_dim": 192, "image_size": 8}
    assert set(man["splits"]["train"]["kinds"]) == {"seed0/train/pair-000", "seed0/train/pair-001", "train/plain"}
    assert man["splits"]["train"]["kinds"]["seed0/train/pair-001"]["num"] == 1797
    train_dir = root / "seed0" / "train"
    files = sorted([*train_dir.glob("*.np[yz]"), *(root / "train").glob("*.np[yz]")])
    assert len(files) == 6  # (pair-000, pair-001, plain) x (features, meta)

    def unchanged(redone: set[str]) -> bool:
        return all(f.stat().st_mtime_ns == t for f, t in mtimes.items() if f.name not in redone)

    mtimes = {f: f.stat().st_mtime_ns for f in files}
    _extract(cfg)
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes
    # A crash after the features but before the metadata and the done marker: that part is redone.
    (train_dir / "pair-001.json").unlink()
    (train_dir / "pair-001.w001.r000.meta.npz").unlink()
    _extract(cfg)
    assert (train_dir / "pair-001.w001.r000.meta.npz").is_file() and (train_dir / "pair-001.json").is_file()
    assert unchanged({"pair-001.w001.r000.npy", "pair-001.w001.r000.meta.npz"})
    # A finished kind whose file was truncated afterwards: found on the next run and redone.
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    feats = train_dir / "pair-000.w001.r000.npy"
    feats.write_bytes(feats.read_bytes()[:1000])
    _extract(cfg)
    assert load_kind(root / "seed0", "train", "pair-000").feats.shape == (2, 1797, 192)
    assert unchanged({"pair-000.w001.r000.npy", "pair-000.w001.r000.meta.npz"})
    # More pairs (for a run with the epochs to read them) reuse the ones there; another augmentation
    # is refused.
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    _extract(cached_cfg(tmp_path, digits_root, **{"cache.num_pairs": 3}))
    assert not (train_dir / "pair-002.json").exists()  # 2 epochs read pairs 0 and 1 only
    _extract(cached_cfg(tmp_path, digits_root, **{"cache.num_pairs": 3, "train.epochs": 3}))
    assert (train_dir / "pair-002.json").is_file()
    assert unchanged(set())
    # Speed-only backbone settings keep the cache.
    _extract(cached_cfg(tmp_path, digits_root, **{"backbone.channels_last": "false", "backbone.max_batch": 7}))
    assert unchanged(set())
    # Another seed draws other views into its own folder and shares the plain features.
    _extract(cached_cfg(tmp_path, digits_root, **{"train.seed": 1}))
    assert (root / "seed1" / "train" / "pair-001.json").is_file()
    assert unchanged(set())
    with pytest.raises(CacheMismatchError, match="augment"):
        _extract(cached_cfg(tmp_path, digits_root, **{"augment.crop_p": 0.9}))


@pytest.mark.slow
def test_cached_job_trains_resumes_and_evaluates(tmp_path, digits_root):
    st = DistState()
    straight = cached_cfg(tmp_path, digits_root, **{"output.run_name": "straight", "train.epochs": 3})
    res = train(straight, st)
    scores = res["splits"]["train"]["scores"]
    assert scores["n"] == 1797 and 0.0 <= scores["acc"] <= 1.0
    ev = json.loads((tmp_path / "runs" / "straight" / "eval.json").read_text())
    assert ev["splits"]["train"]["scores"] == scores
    # Stop after epoch 1, resume: the same head as the straight run (features come from the same cache).
    steps = 1797 // 256
    train(cached_cfg(tmp_path, digits_root, **{"output.run_name": "resumed", "train.epochs": 3,
                                               "train.max_steps": steps}), st)
    train(cached_cfg(tmp_path, digits_root, **{"output.run_name": "resumed", "train.epochs": 3,
                                               "train.resume": "true"}), st)
    a, b = head_params(tmp_path / "runs" / "straight"), head_params(tmp_path / "runs" / "resumed")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_short_epochs_write_a_checkpoint_per_interval_not_per_epoch(tmp_path, digits_root):
    """A small set's epoch is a step or two, and five heads' checkpoint (175 MiB, 0.14 s) cost more than
    the step: an epoch end within train.checkpoint_min_seconds of the last write writes none, except
    the run's last. Counter: with 0, every epoch end writes one."""
    st = DistState()

    def steps_saved(name: str, min_seconds: float) -> list[int]:
        train(cached_cfg(tmp_path, digits_root, **{
            "output.run_name": name, "train.epochs": 4, "train.global_batch": 512, "train.keep_checkpoints": 100,
            "train.checkpoint_min_seconds": min_seconds, "output.kmeans": "false"}), st)
        return sorted(int(p.stem.split("-")[1]) for p in (tmp_path / "runs" / name / "checkpoints").glob("step-*.pt"))

    steps_per_epoch = 1797 // 512
    assert steps_saved("every", 0) == [steps_per_epoch * e for e in (1, 2, 3, 4)]
    assert steps_saved("throttled", 3600) == [steps_per_epoch * 4]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_cached_mode_under_torchrun(tmp_path, digits_root):
    args = overrides(tmp_path, digits_root, **{"train.mode": "cached", "cache.num_pairs": 1,
                                               "output.run_name": "tr"})
    proc = run_cli(["--config", "demo_digits", *args], torchrun=2)
    assert "ACC" in proc.stdout
    ev = json.loads((tmp_path / "runs" / "tr" / "eval.json").read_text())
    assert ev["splits"]["train"]["num_samples"] == 1797 and {"acc", "nmi", "ari"} <= ev["splits"]["train"]["scores"].keys()
    cache = next((tmp_path / "runs" / "features").glob("digits0-*"))  # shared by every run on these features
    files = sorted(str(p.relative_to(cache)) for p in cache.glob("**/*.npy"))
    assert files == ["seed0/train/pair-000.w002.r000.npy", "seed0/train/pair-000.w002.r001.npy",
                     "train/plain.w002.r000.npy", "train/plain.w002.r001.npy"]


def test_bad_samples_are_absent_from_the_cache_and_counted(tmp_path):
    from scp_dist.features import CachedFeatures

    data = tmp_path / "bad"
    bad_dataset(data / "train")
    cfg = load_config("demo_digits", overrides(tmp_path, data, **{
        "data.prepare": "", "data.test_split": "", "train.global_batch": 10, "train.mode": "cached",
        "cache.num_pairs": 1, "cache.dir": str(tmp_path / "cache")}))
    root = _extract(cfg)
    pair, plain = load_kind(root / "seed0", "train", "pair-000"), load_kind(root, "train", "plain")
    assert pair.keys == plain.keys and "k003" not in pair.keys and "k005" not in pair.keys
    assert set(pair.keys) >= {f"k{i:03d}" for i in range(20, 30)}
    source = CachedFeatures(cfg, DistState(), root)
    source.set_epoch(0)
    used = sum(n for _, n in source)
    assert used == len(pair) and source.stats.as_dict() == {"absent_from_cache": 30 - len(pair)}


@pytest.mark.slow
def test_stream_checkpoint_is_not_resumed_in_cached_mode(tmp_path, digits_root):
    from scp_dist.checkpoint import CheckpointError

    st = DistState()
    train(load_config("demo_digits", overrides(tmp_path, digits_root, **{
        "output.run_name": "m", "train.max_steps": 1})), st)
    with pytest.raises(CheckpointError, match="train.mode"):
        train(cached_cfg(tmp_path, digits_root, **{"output.run_name": "m", "train.resume": "true"}), st)


def test_head_agreement_picks_the_consensus_not_the_outlier():
    from scp_dist.evaluate import choose_head, head_agreement

    rng = np.random.default_rng(0)
    base = rng.integers(0, 4, 300)
    relabelled = np.array([2, 0, 3, 1])[base]  # the same clustering under other cluster ids
    noisy = base.copy()
    noisy[:60] = rng.integers(0, 4, 60)  # mostly the same
    outlier = rng.integers(0, 4, 300)  # unrelated
    agree = head_agreement(np.stack([outlier, base, relabelled, noisy]))
    assert agree[1] == pytest.approx(agree[2]) and agree[1] > agree[3] > agree[0]
    assert choose_head("agreement", torch.tensor([0.1, 0.5, 0.4, 0.3]), agree) in (1, 2)
    assert choose_head("loss", torch.tensor([0.1, 0.5, 0.4, 0.3]), agree) == 0


@pytest.mark.slow
@pytest.mark.parametrize("select", ["loss", "agreement", "consensus"])
def test_several_heads_in_one_run_report_the_chosen_head_and_the_spread(tmp_path, digits_root, select):
    cfg = cached_cfg(tmp_path, digits_root, **{"head.num_heads": 3, "head.select": select, "train.epochs": 2})
    res = train(cfg, DistState())
    ev = json.loads((tmp_path / "runs" / "digits0_seed0" / "eval.json").read_text())
    assert ev["select"] == select and len(ev["head_losses"]) == 3 and len(ev["head_agreement"]) == 3
    pick = np.argmax(ev["head_agreement"]) if select == "agreement" else np.argmin(ev["head_losses"])
    if select == "consensus":
        pick = 3  # the vote, stored as a row after the heads'
    assert ev["chosen_head"] == res["chosen_head"] == pick
    split = ev["splits"]["train"]
    if select != "consensus":
        assert split["scores"] == split["all_heads"][pick]
    assert len(split["all_heads"]) == 3
    assert {"acc", "nmi", "ari"} <= split["kmeans"].keys()
    accs = [h["acc"] for h in split["all_heads"]]
    assert split["acc_over_heads"]["min"] == min(accs) and split["acc_over_heads"]["max"] == max(accs)
    pred = res["predictions"]["train"]
    assert pred.clusters.shape == (3 + (select == "consensus"), 1797)
    assert len({tuple(c[:200]) for c in pred.clusters[:3]}) == 3  # differently seeded heads differ
    rows = (tmp_path / "runs" / "digits0_seed0" / "assignments_train.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[1]) for r in rows[:50]] == pred.clusters[pick][:50].tolist()


def test_budgets_cut_the_schedule_and_the_pairs_alike_on_any_data_size():
    from omegaconf import OmegaConf

    from scp_dist.feature_cache import pairs_to_extract
    from scp_dist.schedule import epochs_run, schedule_steps

    assert schedule_steps(200, 14, 3000) == 2800  # a small set keeps its epochs
    assert schedule_steps(200, 468, 3000) == 3000 and epochs_run(200, 468, 3000) == 7  # a large one stops at the budget
    assert schedule_steps(30, 97, 0) == 2910  # no budget: the epochs alone

    def m(n: int, pairs: int = 10, budget: int = 20000, epochs: int = 200, step_budget: int = 3000) -> int:
        cfg = OmegaConf.create({"cache": {"num_pairs": pairs, "pair_budget": budget},
                                "train": {"epochs": epochs, "global_batch": 128, "step_budget": step_budget}})
        return pairs_to_extract(cfg, n)

    assert [m(1797), m(5000), m(9716), m(60000)] == [10, 4, 2, 1]
    assert m(60000, budget=0) == 7  # 7 epochs reach pairs 0..6 only: pair 7.. would never be read
    assert m(1797, budget=0, epochs=3, step_budget=0) == 3


@pytest.mark.slow
def test_a_step_budget_run_stops_mid_epoch_with_its_schedule_done_and_reads_only_budgeted_pairs(tmp_path, digits_root):
    # 1797 digits, batch 256: 7 steps per epoch; 20 steps = epochs 1-2 whole and 6 steps of epoch 3.
    cfg = cached_cfg(tmp_path, digits_root, **{"output.run_name": "b", "train.epochs": 5, "train.step_budget": 20,
                                                "cache.num_pairs": 4, "cache.pair_budget": 2 * 1797})
    train(cfg, DistState())
    run = tmp_path / "runs" / "b"
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r.get("kind") == "step"]
    assert steps[-1]["step"] == 20 and steps[-1]["epoch"] == 2
    assert steps[-1]["lr"] < 0.01 * cfg.optim.lr  # annealed over the budget, not over 5 epochs
    assert torch.load(sorted((run / "checkpoints").glob("*.pt"))[-1], weights_only=False)["reason"] == "step_budget"
    pairs = sorted(p.name for p in (tmp_path / "cache").glob("seed*/train/pair-*.json"))
    assert pairs == ["pair-000.json", "pair-001.json"]  # pair_budget // N = 2 of cache.num_pairs = 4
