"""Where the head's inputs come from: the two feature sources behind one interface.

`StreamFeatures` runs the frozen backbone on fresh views every step; `CachedFeatures` reads the
backbone features that `feature_cache.extract_features` stored once. Both follow the same epoch plan
(data/plan.py) and yield, per step, this rank's `[view a; view b]` features and n; both give
`eval_batches(split)`: this rank's share of a split, unaugmented, as (features, keys, labels), which
`evaluate.predict` turns into clusters. The training loop and the evaluation see no difference.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from omegaconf import DictConfig

from scp_dist import distributed as D
from scp_dist.data import plan as P
from scp_dist.data.loader import TrainLoader
from scp_dist.data.stream import StreamTrainLoader, open_eval_loader, open_train_loader
from scp_dist.feature_cache import (
    SplitFeatures,
    cache_dir,
    extract_features,
    load_kind,
    pair_kind,
    pairs_dir,
    pairs_to_extract,
)
from scp_dist.models.backbones import Backbone
from scp_dist.neighbors import epoch_partners, load_or_build, neighbor_count
from scp_dist.precision import autocast_context
from scp_dist.runlog import progress
from scp_dist.shards.manifest import read_manifest

log = logging.getLogger("scp_dist")

EvalBatch = tuple[torch.Tensor, list[str], torch.Tensor]  # (n, D) features, keys, labels


class FeatureSource(Protocol):
    num_samples: int
    stats: object  # .as_dict(): per-epoch counts of samples that could not be used

    def __len__(self) -> int: ...  # steps per epoch
    def set_epoch(self, epoch: int, start: int = 0) -> None: ...  # from step `start` of the epoch on
    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]: ...
    def eval_batches(self, split: str) -> Iterator[EvalBatch]: ...


class StreamFeatures:
    """Per step: a batch of two fresh views per image through the frozen backbone -> [a; b] features."""

    def __init__(self, cfg: DictConfig, st: D.DistState, backbone: Backbone, precision: str) -> None:
        self.cfg, self.st, self.backbone, self.precision = cfg, st, backbone, precision
        # Random access (local, or remote by range requests) or streamed shards (data/stream.py).
        self.loader: TrainLoader | StreamTrainLoader = open_train_loader(
            cfg.data.root, cfg.data.train_split, cfg.data, cfg.augment, world_size=st.world_size,
            rank=st.rank, global_batch=cfg.train.global_batch, image_size=backbone.image_size,
            mean=backbone.mean, std=backbone.std, seed=cfg.train.seed, device=st.device)
        self.stats = self.loader.stats

    @property
    def num_samples(self) -> int:
        loader = self.loader
        return loader.num_samples if isinstance(loader, StreamTrainLoader) else loader.manifest.num_samples

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.loader.set_epoch(epoch, start)

    def state_dict(self) -> dict | None:
        """What a mid-epoch resume needs beyond the step (streamed shards: the samples used so far);
        collective, every rank calls it. None for random access: the plan is a function of the step."""
        return self.loader.state_dict() if isinstance(self.loader, StreamTrainLoader) else None

    def load_state_dict(self, state: dict | None) -> None:
        if isinstance(self.loader, StreamTrainLoader):
            self.loader.load_state_dict(state)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return backbone_forward(self.backbone, x, self.st.device, self.precision)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        for batch in self.loader:
            yield self._forward(torch.cat(batch.views)), len(batch.keys)  # [a; b], one backbone call

    def eval_batches(self, split: str) -> Iterator[EvalBatch]:
        loader = open_eval_loader(
            self.cfg.data.root, split, self.cfg.data, world_size=self.st.world_size, rank=self.st.rank,
            batch_size=self.cfg.train.eval_batch, image_size=self.backbone.image_size, mean=self.backbone.mean,
            std=self.backbone.std, device=self.st.device)
        for batch in progress(loader, self.st.is_main, desc=f"eval {split}"):
            if batch.keys:
                yield self._forward(batch.views[0]).float(), batch.keys, batch.labels


def backbone_forward(backbone: Backbone, x: torch.Tensor, device: torch.device, precision: str) -> torch.Tensor:
    """Images -> frozen features, as training and evaluation run them (scp_dist.predict and
    scp_dist.search too, so a new image meets the same forward as the run's own)."""
    # no_grad, not inference_mode: the head saves these features for its weight gradients,
    # which autograd refuses to do with inference tensors.
    with torch.no_grad(), autocast_context(device, precision):
        return backbone(x.to(device, non_blocking=True))


class _AbsentCounts:
    """Samples the plan asked for that the cache lacks (skipped at extraction), this epoch."""

    def __init__(self) -> None:
        self.absent = 0

    def as_dict(self) -> dict[str, int]:
        return {"absent_from_cache": self.absent}


class CachedFeatures:
    """Per step: the streaming job's plan (plan.py) for this rank, read from cached pair epoch % M
    and yielded as ([view a; view b] float32 features, n), like the streaming feature source."""

    def __init__(self, cfg: DictConfig, st: D.DistState, root: Path) -> None:
        self.cfg, self.st, self.root = cfg, st, root
        manifest = read_manifest(Path(cfg.data.root) / cfg.data.train_split)
        self.counts = [s.num_samples for s in manifest.shards]
        self.num_samples = manifest.num_samples  # train.check_data made sure it holds a global batch
        self.steps = P.steps_per_epoch(self.num_samples, cfg.train.global_batch)
        self.num_pairs = pairs_to_extract(cfg, self.num_samples)
        self.stats = _AbsentCounts()
        self.epoch, self.start = 0, 0
        self._pair: tuple[int, SplitFeatures, np.ndarray] | None = None
        k = neighbor_count(cfg.neighbors.k, self.num_samples, cfg.head.num_clusters)
        if k < cfg.neighbors.k and st.is_main:
            log.info("neighbour pairs: %s of each image's nearest instead of neighbors.k=%d, for clusters of "
                     "about %d images (%d images, K=%d)", k or "none", cfg.neighbors.k,
                     self.num_samples // cfg.head.num_clusters, self.num_samples, cfg.head.num_clusters)
        self.neighbors = load_or_build(root, cfg.data.train_split, k, self.num_samples, st) if k else None

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start
        self.stats.absent = 0

    def _load_pair(self) -> tuple[SplitFeatures, np.ndarray]:
        m = self.epoch % self.num_pairs
        if self._pair is None or self._pair[0] != m:
            pair = load_kind(pairs_dir(self.cfg, self.root), self.cfg.data.train_split, pair_kind(m),
                             with_keys=False)
            row_of = np.full(self.num_samples, -1, dtype=np.int64)  # global index -> row; -1: absent
            row_of[pair.index] = np.arange(len(pair.index))
            self._pair = (m, pair, row_of)
        return self._pair[1], self._pair[2]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        pair, row_of = self._load_pair()
        cfg = self.cfg
        partner = None if self.neighbors is None else \
            epoch_partners(self.neighbors, cfg.neighbors.p, cfg.train.seed, self.epoch)
        for indices in P.train_plan(self.counts, cfg.train.global_batch, self.st.world_size, self.st.rank,
                                    cfg.train.seed, self.epoch, cfg.data.order, cfg.data.shuffle_buffer)[self.start:]:
            rows = row_of[indices]
            self.stats.absent += int((rows < 0).sum())
            rows_a = rows[rows >= 0]
            if partner is None:
                f = torch.from_numpy(pair.take(rows_a))  # (n, 2, D): both views in one read
                view_a, view_b = f[:, 0], f[:, 1]
            else:  # view b of the sample's partner (itself when absent from the cache)
                rows_b = row_of[partner[indices[rows >= 0]]]
                rows_b = np.where(rows_b >= 0, rows_b, rows_a)
                view_a = torch.from_numpy(pair.take(rows_a, view=0))
                view_b = torch.from_numpy(pair.take(rows_b, view=1))
            feats = torch.cat([view_a, view_b])  # [a; b], as the head sees streamed views
            yield feats.to(self.st.device, torch.float32, non_blocking=True), len(rows_a)

    def eval_batches(self, split: str) -> Iterator[EvalBatch]:
        """This rank's evaluation range of the cached plain features, in chunks."""
        plain = load_kind(self.root, split, "plain")
        assert plain.keys is not None and plain.labels is not None
        r = P.eval_range(len(plain), self.st.world_size, self.st.rank)
        step = self.cfg.train.eval_batch
        for lo in range(r.start, r.stop, step):
            rows = np.arange(lo, min(lo + step, r.stop))
            feats = torch.from_numpy(plain.take(rows)[:, 0]).to(self.st.device, torch.float32)
            yield feats, plain.keys[lo: rows[-1] + 1], torch.from_numpy(plain.labels[rows])


def build_source(cfg: DictConfig, st: D.DistState, backbone: Backbone, precision: str) -> FeatureSource:
    """train.mode=stream: the backbone runs every step. cached: it runs once now (extraction,
    resumable), and training and evaluation read what it stored."""
    if cfg.train.mode == "stream":
        return StreamFeatures(cfg, st, backbone, precision)
    root = cache_dir(cfg)
    extract_features(cfg, st, backbone, root, precision)
    return CachedFeatures(cfg, st, root)
