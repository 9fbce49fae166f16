"""Train and eval loaders: plan -> read -> decode + two views -> Batch, per rank.

Backends (`data.loader`): `torch` decodes and augments in DataLoader worker processes; `dali`
reads bytes in the workers and decodes + augments in a DALI pipeline (GPU `mixed` decode when a
GPU is there, DALI's CPU-only mode otherwise); `auto` picks DALI when it imports. Both obey the
same plan (plan.py), so which samples a rank sees does not depend on the backend.

Bad samples (missing or unreadable shard, truncated tar, no image, corrupt image, bad label) are
skipped and counted in `loader.stats` (`data.on_error=skip`, the default) or stop the job (`raise`).
A skipped sample only makes its rank's batch smaller, never removes a step: every rank yields
len(loader) batches, empty ones included, because the training step runs collectives; the loss is
exact for unequal per-rank batches, so no rank waits. A shard the manifest does not describe stops
the job whatever on_error says (reader.SHARD_MISMATCH).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from scp_dist.data import plan as P
from scp_dist.data.augment_torch import ViewSpec, decode_rgb, plain_view, sample_rng, two_views
from scp_dist.data.batch import Batch, DataError, LoaderStats
from scp_dist.data.reader import CORRUPT_IMAGE, SHARD_MISMATCH, RawSample, SampleReader
from scp_dist.data.remote import RemoteOptions, is_remote, open_split
from scp_dist.errors import ConfigError
from scp_dist.shards.manifest import Manifest, ShardError, read_manifest

log = logging.getLogger("scp_dist")
_MAX_WARNINGS = 10


def choose_backend(name: str) -> str:
    """The loader backend for data.loader (validated by the config schema)."""
    if name == "torch":
        return "torch"
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        if name == "dali":
            raise ConfigError("config key 'data.loader': dali, but nvidia-dali is not installed (pip install "
                              "nvidia-dali-cuda130, or data.loader=torch)") from None
        return "torch"
    return "dali"


def _empty(n: int, size: int) -> torch.Tensor:
    return torch.zeros((n, 3, size, size), dtype=torch.float32)


class _PlanDataset(Dataset):
    """Item i = batch i of the plan: read its samples and (torch backend) decode + augment them."""

    def __init__(self, reader: SampleReader, rows: list[np.ndarray], spec: ViewSpec, train: bool, seed: int,
                 epoch: int, decode: bool) -> None:
        self.reader, self.rows, self.spec, self.train = reader, rows, spec, train
        self.seed, self.epoch, self.decode = seed, epoch, decode

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Batch:
        raws = [self.reader.read(int(j)) for j in self.rows[i]]
        return make_batch(raws, self.spec, self.train, self.seed, self.epoch, self.decode)


def make_batch(raws: list[RawSample], spec: ViewSpec, train: bool, seed: int, epoch: int, decode: bool) -> Batch:
    """Read samples -> a Batch: bad ones listed in `skipped`; decode: the torch backend's views
    (two per sample drawn from (seed, epoch, index) when training, else the plain one); else the
    raw bytes for DALI."""
    skipped = [(r.error, r.key, r.detail) for r in raws if r.error]
    good = [r for r in raws if not r.error]
    if not decode:
        return Batch([], [r.key for r in good], torch.tensor([r.label for r in good], dtype=torch.int64),
                     skipped, raw=good, indices=[r.index for r in good])
    a, b, keys, labels, indices = [], [], [], [], []
    for r in good:
        try:
            img = decode_rgb(r.image)
        except Exception as e:  # PIL raises several types for corrupt data
            skipped.append((CORRUPT_IMAGE, r.key, f"{type(e).__name__}: {e}"))
            continue
        if train:
            va, vb = two_views(img, spec, sample_rng(seed, epoch, r.index))
            a.append(va)
            b.append(vb)
        else:
            a.append(plain_view(img, spec))
        keys.append(r.key)
        labels.append(r.label)
        indices.append(r.index)
    s = spec.image_size
    views = [torch.stack(a) if a else _empty(0, s)]
    if train:
        views.append(torch.stack(b) if b else _empty(0, s))
    return Batch(views, keys, torch.tensor(labels, dtype=torch.int64), skipped, indices=indices)


def _identity(x: Any) -> Any:
    return x


class BatchAccounting:
    """What every loader does with a batch after reading it: DALI decoding where that backend
    runs, and counting (or raising on) the samples it skipped. Subclasses set spec, train, seed,
    device, on_error and backend, and call _init_accounting()."""

    spec: ViewSpec
    train: bool
    seed: int
    device: torch.device
    on_error: str
    backend: str
    epoch: int

    def _init_accounting(self) -> None:
        self.stats = LoaderStats()
        self._warned = 0
        self._dali = None

    def _finish(self, batch: Batch) -> Batch:
        if batch.raw is not None:
            batch = self._dali_views()(batch, self.epoch)
        self._account(batch)
        return batch

    def _dali_views(self):
        if self._dali is None:
            from scp_dist.data.augment_dali import DaliViews

            self._dali = DaliViews(self.spec, two_views=self.train, seed=self.seed, device=self.device)
        return self._dali

    def _account(self, batch: Batch) -> None:
        for reason, key, detail in batch.skipped:
            if reason == SHARD_MISMATCH:
                raise ShardError(detail)
            if self.on_error == "raise":
                raise DataError(f"{reason}: sample {key}: {detail} (data.on_error=raise; 'skip' counts and skips)")
            self.stats.counts[reason] += 1
            if self._warned < _MAX_WARNINGS:
                self._warned += 1
                log.warning("skipping sample %s (%s): %s", key, reason, detail)


class _Loader(BatchAccounting):
    def __init__(self, split_dir: Path | str, data_cfg: Any, spec: ViewSpec, train: bool, seed: int,
                 device: torch.device, world_size: int, rank: int) -> None:
        remote = RemoteOptions.from_config(data_cfg)
        if is_remote(str(split_dir)):  # http(s):// or s3:// with a manifest: random access by range requests
            self.manifest: Manifest = open_split(str(split_dir), remote).manifest
            if self.manifest is None:
                raise ShardError(f"{split_dir}: no manifest.json there; random access needs one (data.access=stream "
                                 "reads shards without it)")
        else:
            self.manifest = read_manifest(split_dir)
        # data.verify: full sha256 of the shards, each rank hashing its share.
        self.reader = SampleReader(self.manifest, verify=bool(data_cfg.verify), part=(rank, world_size),
                                   remote=remote)
        self.spec, self.train, self.seed, self.device = spec, train, seed, device
        self.num_workers = int(data_cfg.num_workers)
        self.on_error = data_cfg.on_error
        self.backend = choose_backend(data_cfg.loader)
        self.epoch, self.start = 0, 0
        self._init_accounting()

    def rows(self) -> list[np.ndarray]:
        raise NotImplementedError

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Epoch `epoch` from its step `start` on (a resume in the middle of an epoch)."""
        self.epoch, self.start = epoch, start
        self.stats.reset()

    def __len__(self) -> int:
        return len(self.rows())

    def __iter__(self):
        ds = _PlanDataset(self.reader, self.rows()[self.start:], self.spec, self.train, self.seed, self.epoch,
                          decode=self.backend == "torch")
        dl = DataLoader(ds, batch_size=None, shuffle=False, num_workers=self.num_workers, collate_fn=_identity,
                        pin_memory=self.device.type == "cuda", persistent_workers=False,
                        prefetch_factor=4 if self.num_workers else None)
        for batch in dl:
            yield self._finish(batch)


class TrainLoader(_Loader):
    def __init__(self, split_dir: Path | str, data_cfg: Any, spec: ViewSpec, *, world_size: int, rank: int,
                 global_batch: int, seed: int, device: torch.device) -> None:
        super().__init__(split_dir, data_cfg, spec, True, seed, device, world_size, rank)
        self.world_size, self.rank, self.global_batch = world_size, rank, global_batch
        self.order, self.shuffle_buffer = str(data_cfg.order), int(data_cfg.shuffle_buffer)
        n = self.manifest.num_samples
        if n < global_batch:
            raise ShardError(f"{split_dir}: {n} samples, fewer than train.global_batch={global_batch}: "
                             "an epoch would have no step")
        self._rows: tuple[int, list[np.ndarray]] | None = None

    def rows(self) -> list[np.ndarray]:
        if self._rows is None or self._rows[0] != self.epoch:
            counts = [s.num_samples for s in self.manifest.shards]
            plan = P.train_plan(counts, self.global_batch, self.world_size, self.rank, self.seed, self.epoch,
                                self.order, self.shuffle_buffer)
            self._rows = (self.epoch, list(plan))
        return self._rows[1]


def _eval_rows(num_samples: int, world_size: int, rank: int, batch_size: int) -> list[np.ndarray]:
    r = P.eval_range(num_samples, world_size, rank)
    idx = np.arange(r.start, r.stop, dtype=np.int64)
    return [idx[i: i + batch_size] for i in range(0, len(idx), batch_size)]


class RangeLoader(_Loader):
    """Every sample of the rank's evaluation range once, in order: plain views (evaluation), or with
    train=True the two views streaming training draws in epoch `set_epoch(m)` (the cached-view
    mode's input)."""

    def __init__(self, split_dir: Path | str, data_cfg: Any, spec: ViewSpec, *, train: bool, world_size: int,
                 rank: int, batch_size: int, seed: int, device: torch.device) -> None:
        super().__init__(split_dir, data_cfg, spec, train, seed, device, world_size, rank)
        self._rows = _eval_rows(self.manifest.num_samples, world_size, rank, batch_size)

    def rows(self) -> list[np.ndarray]:
        return self._rows


def _where(split_dir: Path | str) -> Path | str:
    """A local split as a Path; a URL stays text (Path would fold its '//')."""
    return str(split_dir) if is_remote(str(split_dir)) else Path(split_dir)


def build_pair_loader(split_dir: Path, data_cfg: Any, aug_cfg: Any, *, world_size: int, rank: int,
                      batch_size: int, image_size: int, mean, std, seed: int, device: torch.device) -> RangeLoader:
    spec = ViewSpec.from_config(aug_cfg, image_size, mean, std)
    return RangeLoader(_where(split_dir), data_cfg, spec, train=True, world_size=world_size, rank=rank,
                       batch_size=batch_size, seed=seed, device=device)


def build_train_loader(split_dir: Path, data_cfg: Any, aug_cfg: Any, *, world_size: int, rank: int,
                       global_batch: int, image_size: int, mean, std, seed: int,
                       device: torch.device) -> TrainLoader:
    spec = ViewSpec.from_config(aug_cfg, image_size, mean, std)
    return TrainLoader(_where(split_dir), data_cfg, spec, world_size=world_size, rank=rank,
                       global_batch=global_batch, seed=seed, device=device)


def build_eval_loader(split_dir: Path, data_cfg: Any, *, world_size: int, rank: int, batch_size: int,
                      image_size: int, mean, std, device: torch.device) -> RangeLoader:
    spec = ViewSpec(int(image_size), tuple(mean), tuple(std))
    return RangeLoader(_where(split_dir), data_cfg, spec, train=False, world_size=world_size, rank=rank,
                       batch_size=batch_size, seed=0, device=device)
