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


ORDERS = ("global", "windowed")


def train_plan(
    shard_counts: list[int],
    global_batch: int,
    world_size: int,
    rank: int,
    seed: int,
    epoch: int,
    order: str = "global",
    shuffle_buffer: int = 2048,
) -> np.ndarray:
    """(steps, B_rank) global sample indices this rank reads, in order.

    order="global" (the default): one permutation of ALL samples per epoch, a function of (seed,
    epoch) only; global batch s is the slice [s*G, (s+1)*G) of it and rank r takes its contiguous
    part of that slice. Every global batch is a uniform random sample of the data set whatever the
    order on disk, and the same for any world size, so W processes train on exactly the batches one
    process would (the loss terms are batch-level: a skewed batch biases H(Y) and L_con).

    order="windowed": for storage that only reads sequentially. Shards are permuted per epoch, laid
    end to end, and rank r takes the contiguous range [steps*c_r, steps*c_{r+1}), shuffled within
    windows of `shuffle_buffer` samples. Batches are then only as random as the shards are: with
    class-sorted shards a window holds a few classes. It also depends on the world size."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    counts = list(shard_counts)
    n = int(sum(counts))
    steps = steps_per_epoch(n, global_batch)
    sizes = rank_batch_sizes(global_batch, world_size)
    if steps == 0:
        return np.zeros((0, sizes[rank]), dtype=np.int64)
    lo = sum(sizes[:rank])
    if order == "global":
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        return perm[: steps * global_batch].reshape(steps, global_batch)[:, lo: lo + sizes[rank]].copy()
    offsets = shard_offsets(counts)
    shard_order = np.random.default_rng([seed, epoch]).permutation(len(counts))
    layout = np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in shard_order])
    mine = layout[steps * lo: steps * (lo + sizes[rank])].copy()
    if shuffle_buffer > 1:
        rng = np.random.default_rng([seed, epoch, rank, 1])
        for w in range(0, len(mine), shuffle_buffer):
            window = mine[w: w + shuffle_buffer]
            mine[w: w + shuffle_buffer] = window[rng.permutation(len(window))]
    return mine.reshape(steps, sizes[rank])


def eval_range(num_samples: int, world_size: int, rank: int) -> range:
    """Contiguous, disjoint ranges covering every sample; sizes differ by at most one."""
    base, extra = divmod(num_samples, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))
