"""Cached-view mode (`train.mode=cached`): backbone features of M augmented view pairs per image,
computed once, so the head can train for any number of epochs without images or the backbone.

Trade-off against streaming: streaming draws fresh views every epoch; cached mode sees the same M
pairs, cycling (epoch e uses pair e % M, whose views are exactly those streaming would draw in
epoch e % M), so M bounds the augmentation diversity. The backbone runs 2·M + 1 passes over the
data once instead of 2 per epoch, so for epochs > M the job is roughly epochs / M times faster, and
head-only epochs cost almost nothing (BENCHMARKS.md, `head`). Storage: N · D · 2 bytes per view in
fp16 (CIFAR-10, ViT-B/32, M=8: 50,000 · 512 · 2 · 17 views ≈ 0.9 GB).

Layout of `cache.dir` (default `<run dir>/features`):

    fingerprint.json                 what determines the features; a different config is refused
    <split>/pair-003.w002.r001.npz   rank 1 of 2's range of pair 3: index, keys, labels, feats (2, n, D)
    <split>/plain.w002.r000.npz      unaugmented views (evaluation): feats (1, n, D)
    <split>/pair-003.json            written by rank 0 once every rank's file is in place

Every file is written to a temp name and renamed, so a crash never leaves a half file; a rerun
skips kinds that are done and, within an unfinished kind, the ranks' files that exist. A finished
cache is read by any world size (files are concatenated by global sample index). Corrupt samples
are skipped at extraction (and counted in the log), so they are simply absent from the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from scp_dist import distributed as D
from scp_dist.data.loader import build_eval_loader, build_pair_loader
from scp_dist.evaluate import autocast_context
from scp_dist.models.backbones import Backbone
from scp_dist.runlog import progress
from scp_dist.shards.manifest import atomic_write_text

log = logging.getLogger("scp_dist")
FORMAT = "scp_dist.features/v1"


class CacheMismatchError(RuntimeError):
    """An existing cache was built from a different backbone, augmentation, data or seed."""


@dataclass
class SplitFeatures:
    """One kind (a view pair, or the plain views) of one split, in canonical sample order."""

    index: np.ndarray  # (n,) int64 global sample index, increasing
    keys: list[str]
    labels: np.ndarray  # (n,) int64, -1 where unlabeled
    feats: torch.Tensor  # (V, n, D): V=2 for a pair (view a, view b), 1 for plain


def cache_dir(cfg: DictConfig, run_dir: Path) -> Path:
    return Path(cfg.cache.dir) if cfg.cache.dir else run_dir / "features"


def cache_fingerprint(cfg: DictConfig) -> dict:
    """Everything the stored features depend on. num_pairs is not in it: pairs are independent,
    so raising cache.num_pairs reuses the pairs already there."""
    manifests = {}
    for split in filter(None, [cfg.data.train_split, cfg.data.test_split]):
        m = Path(cfg.data.root) / split / "manifest.json"
        manifests[split] = hashlib.sha256(m.read_bytes()).hexdigest()[:16] if m.is_file() else None
    return {
        "format": FORMAT,
        "backbone": OmegaConf.to_container(cfg.backbone),
        "augment": OmegaConf.to_container(cfg.augment),
        "data.root": str(Path(cfg.data.root).resolve()),
        "manifests": manifests,
        "seed": cfg.train.seed,
        "dtype": cfg.cache.dtype,
    }


def check_fingerprint(root: Path, fp: dict, is_main: bool) -> None:
    path = root / "fingerprint.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != fp:
            diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
            raise CacheMismatchError(
                f"feature cache {root} was built with a different {', '.join(diff)}; delete it or set cache.dir"
            )
    elif is_main:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(fp, indent=1, sort_keys=True))


def _rank_file(split_dir: Path, kind: str, world: int, rank: int) -> Path:
    return split_dir / f"{kind}.w{world:03d}.r{rank:03d}.npz"


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@torch.inference_mode()
def _extract_rank(loader, backbone: Backbone, st: D.DistState, precision: str, dtype: np.dtype,
                  desc: str) -> dict[str, np.ndarray]:
    index, keys, labels, feats = [], [], [], []
    for batch in progress(loader, st.is_main, desc=desc):
        if not batch.keys:
            continue
        n = len(batch.keys)
        x = torch.cat(batch.views).to(st.device, non_blocking=True)  # all views in one backbone call
        with autocast_context(st.device, precision):
            f = backbone(x)
        feats.append(f.float().reshape(len(batch.views), n, -1).cpu().numpy().astype(dtype))
        index.extend(batch.indices)
        keys.extend(batch.keys)
        labels.append(batch.labels.numpy())
    skipped = {k: v for k, v in loader.stats.as_dict().items() if v}
    if skipped:
        log.warning("%s: skipped samples on rank %d: %s", desc, st.rank, skipped)
    dim = backbone.feature_dim
    views = 2 if loader.train else 1
    return {
        "index": np.asarray(index, dtype=np.int64),
        "keys": np.asarray(keys, dtype=str),
        "labels": np.concatenate(labels) if labels else np.zeros(0, np.int64),
        "feats": np.concatenate(feats, axis=1) if feats else np.zeros((views, 0, dim), dtype),
    }


def _extract_kind(root: Path, split: str, kind: str, make_loader, backbone: Backbone, st: D.DistState,
                  precision: str, dtype: np.dtype) -> None:
    split_dir = root / split
    done = split_dir / f"{kind}.json"
    if done.is_file():
        return
    split_dir.mkdir(parents=True, exist_ok=True)
    mine = _rank_file(split_dir, kind, st.world_size, st.rank)
    if not mine.is_file():
        arrays = _extract_rank(make_loader(), backbone, st, precision, dtype, f"features {split}/{kind}")
        _save_npz(mine, **arrays)
    D.barrier()
    if st.is_main:
        files = [_rank_file(split_dir, kind, st.world_size, r).name for r in range(st.world_size)]
        missing = [f for f in files if not (split_dir / f).is_file()]
        if missing:
            raise RuntimeError(f"feature cache {split_dir}: ranks did not write {missing}")
        atomic_write_text(done, json.dumps({"kind": kind, "files": files}))
    D.barrier()


def extract_features(cfg: DictConfig, st: D.DistState, backbone: Backbone, root: Path, precision: str) -> None:
    """Write (or complete) the cache: M view pairs of the train split, plain views of every split."""
    check_fingerprint(root, cache_fingerprint(cfg), st.is_main)
    D.barrier()
    check_fingerprint(root, cache_fingerprint(cfg), st.is_main)  # the other ranks check what rank 0 wrote
    dtype = np.float16 if cfg.cache.dtype == "fp16" else np.float32
    data_root = Path(cfg.data.root)
    common = dict(world_size=st.world_size, rank=st.rank, batch_size=cfg.cache.batch_size,
                  image_size=backbone.image_size, mean=backbone.mean, std=backbone.std, device=st.device)
    train_dir = data_root / cfg.data.train_split
    for m in range(cfg.cache.num_pairs):
        def pair_loader(m: int = m):
            loader = build_pair_loader(train_dir, cfg.data, cfg.augment, seed=cfg.train.seed, **common)
            loader.set_epoch(m)  # pair m = the views streaming training draws in epoch m
            return loader

        _extract_kind(root, cfg.data.train_split, f"pair-{m:03d}", pair_loader, backbone, st, precision, dtype)
    for split in filter(None, [cfg.data.train_split, cfg.data.test_split]):
        _extract_kind(root, split, "plain", lambda s=split: build_eval_loader(data_root / s, cfg.data, **common),
                      backbone, st, precision, dtype)


def load_kind(root: Path, split: str, kind: str) -> SplitFeatures:
    """A finished kind, from however many ranks wrote it, in canonical order."""
    split_dir = root / split
    done = split_dir / f"{kind}.json"
    if not done.is_file():
        raise FileNotFoundError(f"feature cache {split_dir}: {kind} was not finished (no {done.name})")
    parts = []
    for name in json.loads(done.read_text())["files"]:
        with np.load(split_dir / name) as z:
            parts.append({k: z[k] for k in ("index", "keys", "labels", "feats")})
    index = np.concatenate([p["index"] for p in parts])
    order = np.argsort(index, kind="stable")
    feats = np.concatenate([p["feats"] for p in parts], axis=1)[:, order]
    return SplitFeatures(
        index=index[order],
        keys=[str(k) for k in np.concatenate([p["keys"] for p in parts])[order]],
        labels=np.concatenate([p["labels"] for p in parts])[order].astype(np.int64),
        feats=torch.from_numpy(np.ascontiguousarray(feats)),
    )
