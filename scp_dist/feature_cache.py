"""Cached-view mode (`train.mode=cached`): backbone features of M augmented view pairs per image,
computed once, so the head can train for any number of epochs without images or the backbone.

Trade-off against streaming (docs/DESIGN.md, "Cached-view mode"): streaming draws fresh views every
epoch; cached mode sees the same M pairs, cycling (epoch e uses pair e % M, whose views are exactly
those streaming would draw in epoch e % M), so M bounds the augmentation diversity. The backbone
runs over the data 2·M + 1 times once instead of twice per epoch, so for epochs > M the job is
roughly epochs / M times faster, and head-only epochs cost almost nothing.

Layout of `cache.dir` (default `<output.dir>/features/<data.name>-<hash of the fingerprint>`, shared
by every seed and run with the same data, backbone and augmentation):

    fingerprint.json                           what determines the features; a cache built otherwise is refused
    manifest.json                              summary, rewritten by rank 0 after each extraction
    <split>/plain.w002.r000.npy                unaugmented views (evaluation, k-means): (n, 1, D); no seed
    seed0/<split>/pair-003.w002.r001.npy       seed 0's pair 3, rank 1 of 2's range: (n, 2, D) view a, view b
    seed0/<split>/pair-003.w002.r001.meta.npz  the same rows' global sample index, key, label
    seed0/<split>/pair-003.json                written by rank 0 once every rank's part is in place

A part is the `.npy` then its `.meta.npz`, each written to a temp name and renamed; a part counts
as complete when both open and agree in shape. A rerun skips finished kinds (whose parts still
check out) and, within an unfinished kind, the ranks' complete parts; missing or truncated files
are recomputed. A finished cache is read by any world size: parts are memory-mapped and ordered by
global sample index, so ranks on a node share one copy in the page cache. Corrupt samples are
skipped at extraction (and counted in the log), so they are absent from the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from scp_dist import distributed as D
from scp_dist.config import backbone_identity, eval_splits
from scp_dist.data.loader import build_eval_loader, build_pair_loader
from scp_dist.data.plan import steps_per_epoch
from scp_dist.errors import UserError
from scp_dist.fileio import atomic_write, atomic_write_text
from scp_dist.models.backbones import Backbone
from scp_dist.precision import autocast_context
from scp_dist.runlog import progress
from scp_dist.schedule import epochs_run
from scp_dist.shards.manifest import ShardError, manifest_digest, read_manifest

log = logging.getLogger("scp_dist")
FORMAT = "scp_dist.features/v1"


class CacheMismatchError(UserError, RuntimeError):
    """An existing cache was built from a different backbone, augmentation, data, seed or dtype."""


def pair_kind(m: int) -> str:
    return f"pair-{m:03d}"


def cache_dir(cfg: DictConfig) -> Path:
    if cfg.cache.dir:
        return Path(cfg.cache.dir)
    digest = hashlib.sha256(json.dumps(cache_fingerprint(cfg), sort_keys=True).encode()).hexdigest()[:12]
    return Path(cfg.output.dir) / "features" / f"{cfg.data.name}-{digest}"


def pair_seed(cfg: DictConfig) -> int:
    """The seed that draws the cached views: cache.pair_seed, or train.seed when it is -1."""
    return cfg.train.seed if cfg.cache.pair_seed < 0 else cfg.cache.pair_seed


def pairs_to_extract(cfg: DictConfig, num_samples: int) -> int:
    """M, the view pairs per image the run reads: cache.num_pairs, cut to cache.pair_budget // N when
    that is set, and to the epochs the run has (epoch e reads pair e % M, so a pair no epoch reaches
    is never extracted; with fewer epochs than pairs every epoch still reads the pair it would)."""
    m = cfg.cache.num_pairs
    if cfg.cache.pair_budget > 0:
        m = min(m, max(1, cfg.cache.pair_budget // max(1, num_samples)))
    spe = steps_per_epoch(num_samples, cfg.train.global_batch)
    return max(1, min(m, epochs_run(cfg.train.epochs, spe, cfg.train.step_budget)))


def pairs_dir(cfg: DictConfig, root: Path) -> Path:
    """The augmented pairs depend on the seed that draws the views; the plain features do not."""
    return root / f"seed{pair_seed(cfg)}"


def cache_fingerprint(cfg: DictConfig) -> dict:
    """Everything the stored features depend on but the seed (pairs live under a folder per seed).
    num_pairs is not in it: pairs are independent, so raising cache.num_pairs reuses the pairs
    already there. The data is identified by its manifests' content (which hold every shard's
    sha256), not its path, so a moved dataset keeps its cache."""
    manifests = {split: manifest_digest(Path(cfg.data.root) / split) for split in eval_splits(cfg)}
    return {
        "format": FORMAT,
        "backbone": backbone_identity(cfg.backbone),
        "augment": OmegaConf.to_container(cfg.augment),
        "manifests": manifests,
        "dtype": cfg.cache.dtype,
    }


def check_fingerprint(root: Path, fp: dict, is_main: bool) -> None:
    path = root / "fingerprint.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != fp:
            diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
            raise CacheMismatchError(
                f"feature cache {root} was built with a different {', '.join(diff)}; delete it or point "
                "cache.dir elsewhere (empty: a folder per data set, backbone and augmentation)"
            )
    elif is_main:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(fp, indent=1, sort_keys=True))


def storage_dtype(cfg: DictConfig) -> np.dtype:
    """The dtype features are stored in (cache.dtype)."""
    return np.dtype(np.float16 if cfg.cache.dtype == "fp16" else np.float32)


def _all_ranks(st: D.DistState, flag: bool) -> bool:
    """True iff every rank says True; also a synchronisation point, so no rank changes files that
    another is still checking."""
    votes = D.sum_detached(torch.tensor(float(flag), dtype=torch.float64, device=st.collective_device))
    return int(votes.item()) == st.world_size


# ---------------------------------------------------------------- parts on disk


def _stem(kind: str, world: int, rank: int) -> str:
    return f"{kind}.w{world:03d}.r{rank:03d}"


def write_part(split_dir: Path, kind: str, world: int, rank: int, feats: np.ndarray, index: np.ndarray,
               keys: list[str], labels: np.ndarray) -> None:
    """Rank `rank` of `world`'s part of a kind: its features (n, V, D) in the cache's dtype and each
    row's global sample index, key and label. Nobody reads it before write_kind records the kind."""
    split_dir.mkdir(parents=True, exist_ok=True)
    stem = _stem(kind, world, rank)
    # Features first, metadata last: a part without its .meta.npz is unfinished, whatever else is there.
    for stale in split_dir.glob(f".{stem}.*.tmp"):  # left by a crash of this rank's previous attempt
        stale.unlink(missing_ok=True)
    atomic_write(split_dir / f"{stem}.npy", lambda f: np.save(f, feats))
    atomic_write(split_dir / f"{stem}.meta.npz",
                 lambda f: np.savez(f, index=index, keys=np.asarray(keys, dtype=str), labels=labels))


def write_kind(split_dir: Path, kind: str, rows: list[int], views: int, dim: int, dtype: np.dtype) -> None:
    """Finish a kind once all its parts are in place (rank r of len(rows) wrote rows[r] rows): the
    record load_kind reads. Parts an earlier attempt wrote under another world size are removed."""
    stems = [_stem(kind, len(rows), r) for r in range(len(rows))]
    parts = [{"stem": s, "num": n} for s, n in zip(stems, rows, strict=True)]
    atomic_write_text(split_dir / f"{kind}.json", json.dumps({"kind": kind, "views": views, "dim": dim,
                                                              "dtype": str(np.dtype(dtype)), "num": sum(rows),
                                                              "parts": parts}, indent=1))
    for f in split_dir.glob(f"{kind}.w*.r*.*"):
        if f.name.removesuffix(".npy").removesuffix(".meta.npz") not in stems:
            f.unlink(missing_ok=True)


def _part_rows(split_dir: Path, stem: str, views: int, dim: int, dtype: np.dtype) -> int | None:
    """Rows of a complete part, or None when it is missing, truncated or of another shape.
    Cheap: reads the zip directory, the index and the .npy header, never the features."""
    try:
        with np.load(split_dir / f"{stem}.meta.npz") as z:
            if set(z.files) != {"index", "keys", "labels"}:
                return None
            n = len(z["index"])
        feats = np.load(split_dir / f"{stem}.npy", mmap_mode="r")
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    return n if feats.shape == (n, views, dim) and feats.dtype == dtype else None


def kind_complete(split_dir: Path, kind: str, views: int, dim: int, dtype: np.dtype) -> bool:
    """Whether the kind is finished and every part it records is still whole and of its shape."""
    try:
        parts = json.loads((split_dir / f"{kind}.json").read_text())["parts"]
    except (OSError, ValueError, KeyError):
        return False
    return all(_part_rows(split_dir, p["stem"], views, dim, dtype) == p["num"] for p in parts)


# ---------------------------------------------------------------- extraction


@torch.inference_mode()
def _extract_rank(loader: Any, backbone: Backbone, st: D.DistState, precision: str, dtype: np.dtype,
                  views: int, desc: str) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    index: list[int] = []
    keys: list[str] = []
    labels, feats = [], []
    for batch in progress(loader, st.is_main, desc=desc):
        if not batch.keys:
            continue
        n = len(batch.keys)
        x = torch.cat(batch.views).to(st.device, non_blocking=True)  # all views in one backbone call
        with autocast_context(st.device, precision):
            f = backbone(x)
        # [a; b] -> (n, views, D): one row holds both views of a sample, read together in training.
        feats.append(f.float().reshape(views, n, -1).transpose(0, 1).cpu().numpy().astype(dtype))
        index.extend(batch.indices)
        keys.extend(batch.keys)
        labels.append(batch.labels.numpy())
    skipped = {k: v for k, v in loader.stats.as_dict().items() if v}
    if skipped:
        log.warning("%s: skipped samples on rank %d: %s (absent from the cache)", desc, st.rank, skipped)
    return (
        np.concatenate(feats) if feats else np.zeros((0, views, backbone.feature_dim), dtype),
        np.asarray(index, dtype=np.int64),
        keys,
        np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64),
    )


def _extract_kind(root: Path, split: str, kind: str, views: int, make_loader: Callable[[], Any],
                  backbone: Backbone, st: D.DistState, precision: str, dtype: np.dtype) -> None:
    split_dir = root / split
    dim = backbone.feature_dim
    if _all_ranks(st, kind_complete(split_dir, kind, views, dim, dtype)):
        return
    if _part_rows(split_dir, _stem(kind, st.world_size, st.rank), views, dim, dtype) is None:
        feats, index, keys, labels = _extract_rank(make_loader(), backbone, st, precision, dtype, views,
                                                   f"features {split}/{kind}")
        write_part(split_dir, kind, st.world_size, st.rank, feats, index, keys, labels)
    D.barrier()  # every rank's part is written before anyone looks for them
    rows = [_part_rows(split_dir, _stem(kind, st.world_size, r), views, dim, dtype) for r in range(st.world_size)]
    if not _all_ranks(st, all(n is not None for n in rows)):
        raise RuntimeError(f"feature cache {split_dir}: some rank's {kind} part is not visible here; "
                           "cache.dir must be on a file system shared by all ranks")
    if st.is_main:
        write_kind(split_dir, kind, rows, views, dim, dtype)
    D.barrier()


def extract_features(cfg: DictConfig, st: D.DistState, backbone: Backbone, root: Path, precision: str) -> dict:
    """Write (or complete) the cache: M view pairs of the train split, plain views of every split.
    Collective: every rank calls it. Returns the cache manifest (rank 0 writes it)."""
    fp = cache_fingerprint(cfg)
    check_fingerprint(root, fp, st.is_main)
    D.barrier()
    check_fingerprint(root, fp, st.is_main)  # the other ranks check what rank 0 wrote
    dtype = storage_dtype(cfg)
    data_root = Path(cfg.data.root)
    common = dict(world_size=st.world_size, rank=st.rank, batch_size=cfg.cache.batch_size,
                  image_size=backbone.image_size, mean=backbone.mean, std=backbone.std, device=st.device)

    def pair_loader(m: int) -> Any:
        loader = build_pair_loader(data_root / cfg.data.train_split, cfg.data, cfg.augment, seed=pair_seed(cfg),
                                   **common)
        loader.set_epoch(m)  # pair m = the views streaming training draws in epoch m
        return loader

    def plain_loader(split: str) -> Any:
        return build_eval_loader(data_root / split, cfg.data, **common)

    for m in range(pairs_to_extract(cfg, read_manifest(data_root / cfg.data.train_split).num_samples)):
        _extract_kind(pairs_dir(cfg, root), cfg.data.train_split, pair_kind(m), 2, partial(pair_loader, m),
                      backbone, st, precision, dtype)
    splits = eval_splits(cfg)
    for split in splits:
        _extract_kind(root, split, "plain", 1, partial(plain_loader, split), backbone, st, precision, dtype)
    manifest = {
        "format": FORMAT,
        "fingerprint": fp,
        "backbone": {"name": backbone.name, "feature_dim": backbone.feature_dim, "image_size": backbone.image_size},
        "dtype": cfg.cache.dtype,
        "splits": {s: {"num_samples": read_manifest(data_root / s).num_samples,
                       "kinds": {str(d.relative_to(root).with_suffix("")): json.loads(d.read_text())
                                 for d in sorted([*(root / s).glob("*.json"), *root.glob(f"seed*/{s}/*.json")])}}
                   for s in splits},
    }
    if st.is_main:
        atomic_write_text(root / "manifest.json", json.dumps(manifest, indent=1))
    D.barrier()
    return manifest


# ---------------------------------------------------------------- reading


@dataclass
class SplitFeatures:
    """One kind (a view pair, or the plain views) of one split, in canonical sample order.
    Features stay memory-mapped per part; `take` reads the rows a step needs."""

    index: np.ndarray  # (n,) int64 global sample index, increasing
    keys: list[str] | None  # None when loaded without keys (training does not need them)
    labels: np.ndarray | None  # (n,) int64, -1 where unlabeled
    parts: list[np.ndarray]  # (n_p, V, D) memory-mapped, in index order
    starts: np.ndarray  # first row of each part

    def __len__(self) -> int:
        return len(self.index)

    def take(self, rows: np.ndarray, view: int | None = None) -> np.ndarray:
        """(len(rows), V, D) features of the given rows (positions, not sample indices), in that
        order; with `view`, (len(rows), D) of that view only (the others are not read)."""
        which = np.searchsorted(self.starts, rows, side="right") - 1
        shape = self.parts[0].shape[1:] if view is None else self.parts[0].shape[2:]
        out = np.empty((len(rows), *shape), dtype=self.parts[0].dtype)
        for p in np.unique(which):
            sel = which == p
            local = rows[sel] - self.starts[p]
            out[sel] = self.parts[p][local] if view is None else self.parts[p][local, view]
        return out

    @property
    def feats(self) -> torch.Tensor:
        """(V, n, D) in the stored dtype, all in memory: for evaluation (V = 1) and tests."""
        return torch.from_numpy(np.ascontiguousarray(np.concatenate(self.parts).transpose(1, 0, 2)))


def load_kind(root: Path, split: str, kind: str, with_keys: bool = True) -> SplitFeatures:
    """A finished kind, from however many ranks wrote it, in canonical order."""
    split_dir = root / split
    done = split_dir / f"{kind}.json"
    if not done.is_file():
        raise FileNotFoundError(f"feature cache {split_dir}: {kind} was not finished (no {done.name})")
    meta = json.loads(done.read_text())
    loaded = []
    for p in meta["parts"]:
        if not p["num"]:
            continue  # a rank whose whole range was skipped
        with np.load(split_dir / f"{p['stem']}.meta.npz") as z:
            extra = (z["keys"], z["labels"]) if with_keys else (None, None)
            loaded.append((z["index"], *extra, np.load(split_dir / f"{p['stem']}.npy", mmap_mode="r")))
    if not loaded:
        raise ShardError(f"feature cache {split_dir}: {kind} holds no samples")
    loaded.sort(key=lambda t: int(t[0][0]))
    index = np.concatenate([t[0] for t in loaded])
    if np.any(np.diff(index) <= 0):
        raise ShardError(f"feature cache {split_dir}: {kind} parts overlap; delete the cache")
    return SplitFeatures(
        index=index,
        keys=[str(k) for t in loaded for k in t[1]] if with_keys else None,
        labels=np.concatenate([t[2] for t in loaded]).astype(np.int64) if with_keys else None,
        parts=[t[3] for t in loaded],
        starts=np.cumsum([0] + [len(t[0]) for t in loaded[:-1]]).astype(np.int64),
    )
