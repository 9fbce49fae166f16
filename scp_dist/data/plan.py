"""Which samples each rank reads in an epoch, and how many steps it runs (docs/DESIGN.md, "Epoch semantics").

Pure functions of (shard sizes, global batch, world size, rank, seed, epoch): every rank computes
the whole layout and takes its own slice, so no communication is needed and ranks cannot disagree.
"""

from __future__ import annotations

import numpy as np


def rank_batch_sizes(global_batch: int, world_size: int) -> list[int]:
    """The global batch split as evenly as possible; the loss is exact for unequal sizes."""
    base, extra = divmod(global_batch, world_size)
    return [base + (r < extra) for r in range(world_size)]


def shard_offsets(shard_counts: list[int]) -> np.ndarray:
    """Global index of each shard's first sample (canonical order = manifest order)."""
    return np.concatenate([[0], np.cumsum(shard_counts)]).astype(np.int64)


def steps_per_epoch(num_samples: int, global_batch: int) -> int:
    return num_samples // global_batch


def train_plan(
    shard_counts: list[int],
    global_batch: int,
    world_size: int,
    rank: int,
    seed: int,
    epoch: int,
    shuffle_buffer: int,
) -> np.ndarray:
    """(steps, B_rank) global sample indices this rank reads, in order.

    Shards are permuted per epoch (same permutation on all ranks), their samples laid end to end,
    and rank r takes the contiguous range [steps*c_r, steps*c_{r+1}). Inside its range the order is
    shuffled within consecutive windows of `shuffle_buffer` samples, which keeps reads sequential
    at the scale of a window (0 = no shuffling; >= the range = a full shuffle)."""
    counts = list(shard_counts)
    n = int(sum(counts))
    steps = steps_per_epoch(n, global_batch)
    sizes = rank_batch_sizes(global_batch, world_size)
    if steps == 0:
        return np.zeros((0, sizes[rank]), dtype=np.int64)
    offsets = shard_offsets(counts)
    order = np.random.default_rng([seed, epoch]).permutation(len(counts))
    layout = np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in order])
    start = steps * sum(sizes[:rank])
    mine = layout[start: start + steps * sizes[rank]].copy()
    if shuffle_buffer > 1:
        rng = np.random.default_rng([seed, epoch, rank, 1])
        for lo in range(0, len(mine), shuffle_buffer):
            window = mine[lo: lo + shuffle_buffer]
            mine[lo: lo + shuffle_buffer] = window[rng.permutation(len(window))]
    return mine.reshape(steps, sizes[rank])


def eval_range(num_samples: int, world_size: int, rank: int) -> range:
    """Contiguous, disjoint ranges covering every sample; sizes differ by at most one."""
    base, extra = divmod(num_samples, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))
