"""What a loader yields (a Batch), how it counts skipped samples, and its error: shared by the loader
and the DALI augmentation without importing each other."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from scp_dist.data.reader import SKIP_REASONS, RawSample
from scp_dist.shards.manifest import ShardError


class DataError(ShardError):
    """A bad sample with data.on_error=raise."""


@dataclass
class Batch:
    views: list[torch.Tensor]  # train: [view_a, view_b]; eval: [plain]; each (n, 3, S, S) float32
    keys: list[str]
    labels: torch.Tensor  # (n,) int64, -1 where unlabeled
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (reason, key, detail)
    raw: list[RawSample] | None = None  # dali backend: bytes still to be decoded
    indices: list[int] = field(default_factory=list)  # global sample index (canonical order) of each key
    ends: list[tuple[int, int]] = field(default_factory=list)  # streamed chunks: (shard, samples) of shards read to their end


class LoaderStats:
    """Skipped-sample counts of the current epoch, by reason."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def reset(self) -> None:
        self.counts.clear()

    def as_dict(self) -> dict[str, int]:
        return {r: int(self.counts[r]) for r in SKIP_REASONS}
