"""Streamed shards (data.access=stream): every shard read front to back, for storage that cannot seek
cheaply (object stores without index files, HTTP servers without range requests, pipe: commands)
or data sets without a manifest. docs/DESIGN.md, "Shards from anywhere".

An epoch:
- the shards a resumed epoch has not used up are permuted by (seed, epoch) and dealt round robin to
  the W x K readers (ranks first, then DataLoader workers): disjoint, so each sample is read at most once per
  epoch, and a reader with no shard (fewer shards than readers) simply yields nothing;
- each reader streams its shards through webdataset's tar expansion and key grouping
  (tar_file_expander, group_by_keys; its handler stops a failing shard and the failure is counted
  in LoaderStats under the reader's reasons), drops the samples a resumed epoch already trained on,
  shuffles the rest in webdataset's shuffle buffer (seeded by (seed, epoch, rank, worker)), and
  decodes and augments them with the random-access path's own code (loader.make_batch: the views
  of a sample are drawn from (seed, epoch, global index), so a streamed sample gets the views random
  access would give it); the rank cuts the readers' chunks into its per-step batches.

Why not webdataset's split_by_node/split_by_worker: they read the rank from the environment or the
global process group, while the loader is told its (world size, rank) and deals only the shards a
resume left over; the split is the same round robin.

Every rank runs the same number of steps:
- with the shards' counts (the manifest's, or the .idx headers'): N // G steps, and step s takes
  from rank r a share of the global batch proportional to the samples r was dealt (`step_sizes`:
  every step's shares add up to G, no rank is asked for more than it has). A rank that runs short
  (bad samples, an unreachable shard) yields smaller, possibly empty batches: the loss is exact for
  unequal per-rank batches, so nobody waits;
- without counts: every step the ranks agree (one all_reduce of a W-vector of "has data" flags)
  and the ranks that still have samples share G; the epoch ends when none has. The counts learned
  on the way (every shard read to its end) are gathered at the epoch's end, so later epochs (and
  resumes) run as with counts. The first epoch's length is estimated before it starts, for the lr
  schedule: shards x the first shard's count.

Resume: a checkpoint holds, for the epoch in progress, the samples every rank has yielded (per
shard: all of it, or the positions); a resumed epoch skips the used-up shards without reading them
and drops the used samples of the others, whatever the new world size: no sample is trained on
twice and none is lost (sample granularity; the order of the rest differs from an uninterrupted
run's, the shuffle buffer's state is not kept).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from scp_dist import distributed as D
from scp_dist.data.augment_torch import ViewSpec
from scp_dist.data.batch import Batch
from scp_dist.data.loader import (
    BatchAccounting,
    _empty,
    _identity,
    build_eval_loader,
    build_pair_loader,
    build_train_loader,
    choose_backend,
    make_batch,
)
from scp_dist.data.plan import eval_range, rank_batch_sizes, steps_per_epoch
from scp_dist.data.reader import (
    BAD_LABEL,
    BAD_SHARD,
    MISSING_IMAGE,
    MISSING_SHARD,
    SHARD_MISMATCH,
    TRUNCATED,
    RawSample,
    parse_label,
)
from scp_dist.data.remote import (
    RemoteOptions,
    SplitSource,
    fetch,
    is_remote,
    is_shard_set,
    kind_of,
    open_split,
    shard_opener,
    split_location,
    supports_ranges,
)
from scp_dist.errors import ConfigError
from scp_dist.shards.format import READ_IMAGE_EXTS
from scp_dist.shards.manifest import ShardError, read_manifest

log = logging.getLogger("scp_dist")
_IMAGE_EXTS = tuple(dict.fromkeys(e.lower() for e in READ_IMAGE_EXTS))  # group_by_keys lowercases suffixes
_UNKNOWN_SHIFT = 32  # without counts, a sample's index is (shard << 32) + position: stable, unique


# --- pure planning ---------------------------------------------------------------------------------


def deal_shards(shards: list[int], num_shards: int, seed: int, epoch: int, readers: int) -> list[list[int]]:
    """The shards (a subset of range(num_shards)) in the epoch's order, dealt round robin to
    `readers` readers (reader j: worker j // W of rank j % W). The order is the permutation of all
    shards filtered, so a resumed epoch keeps the order of what is left."""
    keep = set(shards)
    order = [int(s) for s in np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_shards) if s in keep]
    return [order[k::readers] for k in range(readers)]


def step_sizes(rank_counts: list[int], global_batch: int, steps: int) -> np.ndarray:
    """(steps, W): how many samples each rank gives to each global batch. Rows add up to
    global_batch (when steps * global_batch <= the total), column r to at most rank_counts[r];
    each rank's shares follow its fraction of the samples, so no rank runs dry early."""
    n = np.asarray(rank_counts, dtype=np.int64)
    out = np.zeros((steps, len(n)), dtype=np.int64)
    total = int(n.sum())
    if total == 0 or steps == 0:
        return out
    taken = np.zeros(len(n), dtype=np.int64)
    for s in range(steps):
        target = (s + 1) * global_batch * n / total  # where each rank should stand after step s
        want = np.clip(np.floor(target).astype(np.int64) - taken, 0, n - taken)
        gap = target - taken - want  # > 0: behind its share
        short = min(global_batch, total - int(taken.sum())) - int(want.sum())
        if short > 0:  # the rounding's remainder to the ranks furthest behind that still have samples
            for r in np.argsort(-gap, kind="stable"):
                if short == 0:
                    break
                if taken[r] + want[r] < n[r]:
                    want[r] += 1
                    short -= 1
        elif short < 0:  # clipping at 0 over-assigned: take back from the ranks furthest ahead
            for r in np.argsort(gap, kind="stable"):
                if short == 0:
                    break
                if want[r] > 0:
                    want[r] -= 1
                    short += 1
        out[s] = want
        taken += want
    return out


def stream_order(counts: list[int], global_batch: int, world_size: int, seed: int, epoch: int,
                 shuffle_buffer: int) -> list[list[np.ndarray]]:
    """[step][rank] -> the global sample indices a streamed epoch yields with one reader per rank
    (data.num_workers 0 or 1) and no failures, computed without reading: the loader's own shard
    deal, shuffle buffer (webdataset's, seeded alike) and batch shares. For measuring how random
    streamed batches are (benchmarks/stream_randomness.py; tests/test_remote.py checks it against
    the loader)."""
    from webdataset.filters import shuffle

    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    dealt = deal_shards(list(range(len(counts))), len(counts), seed, epoch, world_size)
    streams = []
    for r, shards in enumerate(dealt):
        order = np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in shards]) if shards else \
            np.zeros(0, np.int64)
        if shuffle_buffer > 1:
            rng = random.Random(_seed(seed, epoch, r, 0))
            order = np.fromiter(shuffle(shuffle_buffer, shuffle_buffer, rng=rng)(iter(order.tolist())), np.int64,
                                len(order))
        streams.append(order)
    sizes = step_sizes([len(x) for x in streams], global_batch, steps_per_epoch(int(sum(counts)), global_batch))
    cuts = np.concatenate([np.zeros((1, world_size), np.int64), np.cumsum(sizes, 0)])
    return [[streams[r][cuts[s, r]: cuts[s + 1, r]] for r in range(world_size)] for s in range(len(sizes))]


# --- reading shards --------------------------------------------------------------------------------


class ShardEnd:
    """A shard read to its end: its index and how many samples it held."""

    __slots__ = ("count", "shard")

    def __init__(self, shard: int, count: int) -> None:
        self.shard, self.count = shard, count


def _index(src: SplitSource, offsets: np.ndarray | None, shard: int, pos: int) -> int:
    return int(offsets[shard]) + pos if offsets is not None else (shard << _UNKNOWN_SHIFT) + pos


def _raw(sample: dict, index: int, url: str, num_classes: int) -> RawSample:
    key = str(sample["__key__"])
    ext = next((e for e in _IMAGE_EXTS if e in sample), "")
    label: int | str = -1
    if "cls" in sample:
        label = parse_label(sample["cls"], num_classes, url)
    if isinstance(label, str):
        return RawSample(index, key, None, "", -1, BAD_LABEL, label)
    if not ext:
        return RawSample(index, key, None, "", label, MISSING_IMAGE, f"{url}: {key} has no image")
    return RawSample(index, key, sample[ext], ext, label)


def shard_samples(src: SplitSource, shards: list[int], opener: Callable[[str], BinaryIO],
                  used: dict[int, frozenset[int]], num_classes: int) -> Iterator[RawSample | ShardEnd]:
    """The samples of `shards`, in order, read through webdataset's tar expansion and key grouping;
    a ShardEnd after each shard read to its end. Samples in `used` (shard -> positions) are left out.
    A shard that cannot be opened, is no tar, or breaks off yields one skip entry per lost sample
    (one in all when its count is unknown), never an exception."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    counts = src.counts
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64) if counts is not None else None
    for s in shards:
        url, name = src.urls[s], src.names[s]
        count = counts[s] if counts is not None else None
        skip = used.get(s, frozenset())

        def lost(reason: str, detail: str, start: int, s: int = s, name: str = name,
                 count: int | None = count, skip: frozenset[int] = skip) -> Iterator[RawSample]:
            if count is None:
                yield RawSample(-1, f"{name}#{start}..", None, "", -1, reason, detail + " (sample count unknown)")
                return
            for p in range(start, count):
                if p not in skip:
                    yield RawSample(_index(src, offsets, s, p), f"{name}#{p}", None, "", -1, reason, detail)

        try:
            stream = opener(url)
        except FileNotFoundError as e:
            yield from lost(MISSING_SHARD, f"{url}: not found ({e})", 0)
            continue
        except (OSError, ValueError) as e:  # refused, timed out, HTTP 5xx, a failed pipe: unreachable
            yield from lost(MISSING_SHARD, f"{url}: unreachable ({type(e).__name__}: {e})", 0)
            continue
        errors: list[BaseException] = []

        def stop(exn: BaseException, errors: list[BaseException] = errors) -> bool:
            errors.append(exn)
            return False  # this shard ends here; the next one is read

        pos, held = 0, None
        try:
            files = tar_file_expander([{"url": url, "stream": stream}], handler=stop)
            for sample in group_by_keys(files, handler=stop):
                if count is not None and pos >= count:
                    errors.append(ShardError(f"{url}: holds more samples than the {count} the manifest says: the "
                                             "manifest does not describe this shard; restore it or rewrite the split"))
                    break
                if held is not None and held[0] not in skip:  # the last one waits: a break may cut it
                    yield _raw(held[1], _index(src, offsets, s, held[0]), url, num_classes)
                held, pos = (pos, sample), pos + 1
        except Exception as e:  # noqa: BLE001 - anything a broken stream raises ends this shard only
            errors.append(e)
        finally:
            with contextlib.suppress(Exception):  # closing a broken stream may fail too
                stream.close()
        if errors:
            e = errors[0]
            if isinstance(e, ShardError):
                yield RawSample(-1, f"{name}#{count}", None, "", -1, SHARD_MISMATCH, str(e))
                continue
            reason = BAD_SHARD if pos == 0 and not isinstance(e, OSError) else TRUNCATED
            what = e.args[0] if e.args else e  # webdataset appends the stream and URL to the arguments
            detail = f"{url}: {'not a tar' if reason == BAD_SHARD else 'broke off'} ({type(e).__name__}: {what})"
            yield from lost(reason, detail, max(pos - 1, 0))  # the held sample may be cut short
            continue
        if held is not None and held[0] not in skip:
            yield _raw(held[1], _index(src, offsets, s, held[0]), url, num_classes)
        if count is not None and pos < count:
            yield from lost(TRUNCATED, f"{url}: ends after {pos} samples, the manifest says {count}", pos)
        yield ShardEnd(s, pos)


def _seed(*key: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0])


class _Readers(IterableDataset):
    """Worker w of this rank: its shards -> shuffle buffer -> chunks (Batch, with `ends`)."""

    def __init__(self, loader: StreamTrainLoader, shards: list[list[int]], used: dict[int, frozenset[int]],
                 chunk: int) -> None:
        self.src, self.opener, self.num_classes = loader.src, loader.opener, loader.num_classes
        self.spec, self.seed, self.epoch, self.rank = loader.spec, loader.seed, loader.epoch, loader.rank
        self.decode = loader.backend == "torch"
        self.buffer = max(1, math.ceil(loader.shuffle_buffer / len(shards)))
        self.shards, self.used, self.chunk = shards, used, chunk

    def __iter__(self) -> Iterator[Batch]:
        from webdataset.filters import shuffle

        info = get_worker_info()
        w = info.id if info is not None else 0
        mine = self.shards[w] if w < len(self.shards) else []
        items = shard_samples(self.src, mine, self.opener, self.used, self.num_classes)
        ends: list[tuple[int, int]] = []

        def samples() -> Iterator[RawSample]:
            for x in items:
                if isinstance(x, ShardEnd):
                    ends.append((x.shard, x.count))
                else:
                    yield x

        stream: Iterator[RawSample] = samples()
        if self.buffer > 1:  # the whole buffer is filled before the first sample leaves: a random start
            stream = shuffle(self.buffer, self.buffer, rng=random.Random(_seed(self.seed, self.epoch, self.rank, w)))(
                stream)
        part: list[RawSample] = []
        for r in stream:
            part.append(r)
            if len(part) >= self.chunk:
                yield self._chunk(part, ends)
                part = []
        yield self._chunk(part, ends)  # the rest, and the last shards' ends

    def _chunk(self, raws: list[RawSample], ends: list[tuple[int, int]]) -> Batch:
        b = make_batch(raws, self.spec, True, self.seed, self.epoch, self.decode)
        b.ends = list(ends)
        ends.clear()
        return b


class _Queue:
    """The rank's chunks as one queue of samples, cut into batches of any size. Each chunk's skipped
    samples are counted as it arrives (`on_chunk`)."""

    def __init__(self, chunks: Iterator[Batch], on_chunk: Callable[[Batch], None], num_views: int,
                 image_size: int) -> None:
        self.chunks, self.on_chunk = chunks, on_chunk
        self.parts: deque[Batch] = deque()
        self.n, self.done = 0, False
        self.num_views, self.image_size = num_views, image_size

    def fill(self, k: int) -> int:
        while self.n < k and not self.done:
            try:
                b = next(self.chunks)
            except StopIteration:
                self.done = True
                break
            self.on_chunk(b)
            if b.keys:
                self.parts.append(b)
                self.n += len(b.keys)
        return self.n

    def take(self, k: int) -> Batch:
        self.fill(k)
        pieces: list[Batch] = []
        while k > 0 and self.parts:
            b = self.parts[0]
            m = min(k, len(b.keys))
            if m == len(b.keys):
                pieces.append(self.parts.popleft())
            else:
                pieces.append(_slice(b, 0, m))
                self.parts[0] = _slice(b, m, len(b.keys))
            k -= m
            self.n -= m
        return self._join(pieces)

    def _join(self, pieces: list[Batch]) -> Batch:
        raw = [r for p in pieces for r in (p.raw or [])] if pieces and pieces[0].raw is not None else None
        if raw is not None:
            views: list[torch.Tensor] = []
        elif pieces:
            views = [torch.cat([p.views[v] for p in pieces]) for v in range(self.num_views)]
        else:
            views = [_empty(0, self.image_size) for _ in range(self.num_views)]
        labels = torch.cat([p.labels for p in pieces]) if pieces else torch.zeros(0, dtype=torch.int64)
        return Batch(views, [k for p in pieces for k in p.keys], labels, [], raw=raw,
                     indices=[i for p in pieces for i in p.indices])


def _slice(b: Batch, lo: int, hi: int) -> Batch:
    return Batch([v[lo:hi] for v in b.views], b.keys[lo:hi], b.labels[lo:hi], [],
                 raw=b.raw[lo:hi] if b.raw is not None else None, indices=b.indices[lo:hi])


# --- the train loader ------------------------------------------------------------------------------


class StreamTrainLoader(BatchAccounting):
    """The streamed counterpart of loader.TrainLoader (module doc): same Batch, same LoaderStats,
    same set_epoch(epoch, start), and state_dict()/load_state_dict() for a mid-epoch resume."""

    def __init__(self, where: str, data_cfg: Any, spec: ViewSpec, *, world_size: int, rank: int, global_batch: int,
                 seed: int, device: torch.device) -> None:
        self.remote = RemoteOptions.from_config(data_cfg)
        self.src = open_split(where, self.remote)
        if not self.src.urls:
            raise ShardError(f"{where}: no shards")
        self.where, self.opener = where, shard_opener(self.remote)
        self.manifest = self.src.manifest
        self.num_classes = self.manifest.num_classes if self.manifest is not None else 0
        self.world_size, self.rank, self.global_batch = world_size, rank, global_batch
        self.spec, self.train, self.seed, self.device = spec, True, seed, device
        self.num_workers = int(data_cfg.num_workers)
        self.shuffle_buffer = int(data_cfg.shuffle_buffer)
        self.on_error = data_cfg.on_error
        self.backend = choose_backend(data_cfg.loader)
        self.timeout = self.remote.timeout_s
        self._init_accounting()
        self.epoch, self.start = 0, 0
        # Per shard: learned sample counts (shards read to their end; every rank's, after an epoch).
        self.learned: dict[int, int] = {}
        # This epoch's yielded samples per shard (positions; range(count) once used up); a resume's come
        # from the checkpoint.
        self.used: dict[int, set[int] | range] = {}
        self._resumed: dict | None = None
        self._steps_run: int | None = None  # steps of the last epoch that ran by agreement, once it ended
        self._yielded = 0
        n = self.src.num_samples
        if n is not None and n < global_batch:
            raise ShardError(f"{where}: {n} samples, fewer than train.global_batch={global_batch}: "
                             "an epoch would have no step")
        self._estimate = None if n is not None else self._estimate_steps()

    @property
    def num_samples(self) -> int:
        counts = self._counts()
        if counts is not None:
            return int(sum(counts))
        return self._estimate * self.global_batch if self._estimate else 0

    def _counts(self) -> list[int] | None:
        if self.src.counts is not None:
            return self.src.counts
        if len(self.learned) == len(self.src.urls):
            return [self.learned[s] for s in range(len(self.src.urls))]
        return None

    def _estimate_steps(self) -> int:
        """Without counts: shards x the first readable shard's count, in steps (for the schedule)."""
        for s in range(min(3, len(self.src.urls))):
            n = sum(1 for x in shard_samples(self.src, [s], self.opener, {}, 0) if isinstance(x, RawSample)
                    and not x.error)
            if n:
                est = max(1, len(self.src.urls) * n // self.global_batch)
                log.info("%s: no sample counts (no manifest, no .idx files): %d shards of ~%d samples, an epoch "
                         "estimated at %d steps for the schedule; the epoch runs until the shards are used up",
                         self.where, len(self.src.urls), n, est)
                return est
        return 1

    def __len__(self) -> int:
        if self._steps_run is not None:  # an epoch that ran until the shards were used up, until the next
            return self._steps_run
        counts = self._counts()
        if counts is not None:
            return steps_per_epoch(int(sum(counts)), self.global_batch)
        return max(self._estimate or 1, self._yielded + 1)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start
        self.stats.reset()
        self._steps_run, self._yielded = None, start
        resumed = self._resumed
        self.used = {}
        if start and resumed is not None and resumed.get("epoch") == epoch:
            self.used = {s: p if isinstance(p, range) else set(p) for s, p in resumed["used"].items()}
        elif start:
            log.warning("resuming streamed epoch %d at step %d without a record of the samples used (a checkpoint "
                        "written before streaming resumes existed): the epoch is read again from its start",
                        epoch + 1, start)
        self._resumed = None

    # -- resume state --

    def state_dict(self) -> dict | None:
        """Every rank's used samples of the epoch in progress (collective: call it on every rank);
        rank 0 gets the merged record, the others None."""
        counts = self._counts()

        def packed(s: int, p: set[int] | range) -> int | list[int]:  # a used-up shard is -1, not its positions
            known = counts[s] if counts is not None else self.learned.get(s)
            return -1 if known is not None and len(p) >= known else sorted(p)

        mine = {"used": {s: packed(s, p) for s, p in self.used.items()}, "learned": dict(self.learned)}
        parts = D.gather_objects(mine)
        if parts is None:
            return None
        used: dict[int, set[int] | int] = {}
        learned: dict[int, int] = {}
        for part in parts:
            learned.update(part["learned"])
            for s, pos in part["used"].items():
                if pos == -1 or used.get(s) == -1:
                    used[s] = -1
                else:
                    used.setdefault(s, set()).update(pos)  # type: ignore[union-attr]
        names = self.src.names
        return {"epoch": self.epoch, "learned": {names[s]: c for s, c in learned.items()},
                "used": {names[s]: -1 if pos == -1 else np.array(sorted(pos), np.int32) for s, pos in used.items()}}

    def load_state_dict(self, state: dict | None) -> None:
        if not state:
            return
        by_name = {n: s for s, n in enumerate(self.src.names)}
        counts = self._counts()
        self.learned.update({by_name[n]: int(c) for n, c in state.get("learned", {}).items() if n in by_name})
        used: dict[int, list[int] | range] = {}
        for n, pos in state.get("used", {}).items():
            if n not in by_name:
                continue
            s = by_name[n]
            if isinstance(pos, int) and pos == -1:
                known = counts[s] if counts is not None else self.learned.get(s)
                used[s] = range(known) if known is not None else []
            else:
                used[s] = [int(p) for p in pos]
        self._resumed = {"epoch": int(state["epoch"]), "used": used}

    # -- an epoch --

    def _plan(self) -> tuple[list[list[int]], np.ndarray | None]:
        """This rank's workers' shards, and the (steps left, W) batch shares when counts are known."""
        counts = self._counts()
        num = len(self.src.urls)
        done = {s for s, p in self.used.items()
                if (counts[s] if counts is not None else self.learned.get(s, -1)) == len(p)}
        left = [s for s in range(num) if s not in done]
        k, w = max(self.num_workers, 1), self.world_size
        readers = deal_shards(left, num, self.seed, self.epoch, w * k)
        # reader j is worker j // W of rank j % W: consecutive shards go to different ranks, so with few
        # shards every rank still gets some
        mine = readers[self.rank::w]
        if counts is None:
            return mine, None
        rank_left = [sum(counts[s] - len(self.used.get(s, ())) for rd in readers[r::w] for s in rd) for r in range(w)]
        steps_left = max(steps_per_epoch(int(sum(counts)), self.global_batch) - self.start, 0)
        return mine, step_sizes(rank_left, self.global_batch, steps_left)

    def _on_chunk(self, b: Batch) -> None:
        for s, n in b.ends:
            self.learned[s] = n
        self._account(b)

    def _use(self, batch: Batch) -> None:
        counts = self._counts()
        for i in batch.indices:
            if self.src.counts is not None:
                s = int(np.searchsorted(self._offsets, i, side="right") - 1)
                pos = i - int(self._offsets[s])
            else:
                s, pos = i >> _UNKNOWN_SHIFT, i & ((1 << _UNKNOWN_SHIFT) - 1)
            used = self.used.setdefault(s, set())
            used.add(pos)  # type: ignore[union-attr]
            if counts is not None and len(used) == counts[s]:
                self.used[s] = range(counts[s])  # used up: O(1) memory, whatever the shard's size
        self._yielded += 1

    def __iter__(self) -> Iterator[Batch]:
        shards, shares = self._plan()
        if self.src.counts is not None:
            self._offsets = np.concatenate([[0], np.cumsum(self.src.counts)]).astype(np.int64)
        per_rank = rank_batch_sizes(self.global_batch, self.world_size)[self.rank]
        chunk = max(1, min(16, per_rank // len(shards)))
        # The readers skip what a resumed epoch used: a copy, as this process adds to self.used meanwhile
        skip = {s: frozenset(p) for rd in shards for s in rd if s in self.used for p in (self.used[s],)}
        ds = _Readers(self, shards, skip, chunk)
        k = self.num_workers
        # A worker stuck beyond every per-read timeout and retry is a bug, not slow storage: fail, not hang.
        dl = DataLoader(ds, batch_size=None, num_workers=k, collate_fn=_identity,
                        pin_memory=self.device.type == "cuda", prefetch_factor=4 if k else None,
                        timeout=max(600.0, 4 * (self.remote.retries + 1) * self.timeout) if k else 0)
        it = iter(dl)
        queue = _Queue(it, self._on_chunk, 2, self.spec.image_size)
        try:
            if shares is not None:
                for row in shares:
                    batch = self._finish(queue.take(int(row[self.rank])))
                    self._use(batch)
                    yield batch
                return
            steps = self.start
            while True:
                live = self._agree(queue.fill(1) > 0)
                if not live.any():
                    break
                order = np.flatnonzero(live)
                share = rank_batch_sizes(self.global_batch, len(order))[int(np.searchsorted(order, self.rank))] \
                    if live[self.rank] else 0
                batch = self._finish(queue.take(share))
                self._use(batch)
                steps += 1
                yield batch
            self._steps_run = steps
            self._merge_learned()
        finally:
            queue.chunks = iter(())
            del it  # the last reference: stops the workers of an epoch cut short (max_steps, a signal)

    def _agree(self, has_data: bool) -> np.ndarray:
        flags = torch.zeros(self.world_size, dtype=torch.int64)
        flags[self.rank] = int(has_data)
        if self.world_size > 1:
            if not (dist.is_available() and dist.is_initialized()):
                raise ShardError("streaming shards without sample counts on several ranks needs the process group "
                                 "(the ranks agree each step on who still has data)")
            dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
            flags = D.sum_detached(flags.to(dev) if dev is not None else flags).cpu()
        return flags.numpy() > 0

    def _merge_learned(self) -> None:
        parts = D.all_gather_objects(dict(self.learned))
        for p in parts:
            self.learned.update(p)
        if len(self.learned) == len(self.src.urls):
            log.info("%s: %d samples in %d shards, learned while streaming; later epochs run %d steps", self.where,
                     sum(self.learned.values()), len(self.learned), len(self))


# --- the eval loader -------------------------------------------------------------------------------


class StreamEvalLoader(BatchAccounting):
    """Every sample of the rank's contiguous range of shards once, in canonical order, plain views:
    the streamed counterpart of loader.RangeLoader(train=False). One stream per rank reads; up to
    num_workers threads decode (PIL and torch release the GIL), results kept in order."""

    def __init__(self, where: str, data_cfg: Any, spec: ViewSpec, *, world_size: int, rank: int, batch_size: int,
                 device: torch.device) -> None:
        self.remote = RemoteOptions.from_config(data_cfg)
        self.src = open_split(where, self.remote)
        self.opener = shard_opener(self.remote)
        self.manifest = self.src.manifest
        self.num_classes = self.manifest.num_classes if self.manifest is not None else 0
        self.spec, self.train, self.seed, self.device, self.epoch = spec, False, 0, device, 0
        self.batch_size, self.num_workers = batch_size, max(int(data_cfg.num_workers), 1)
        self.on_error = data_cfg.on_error
        self.backend = choose_backend(data_cfg.loader)
        self.shards = list(eval_range(len(self.src.urls), world_size, rank))
        self._init_accounting()

    def __len__(self) -> int:
        counts = self.src.counts
        n = sum(counts[s] for s in self.shards) if counts is not None else 0
        return math.ceil(n / self.batch_size)

    def _raw_batches(self) -> Iterator[list[RawSample]]:
        part: list[RawSample] = []
        for x in shard_samples(self.src, self.shards, self.opener, {}, self.num_classes):
            if isinstance(x, RawSample):
                part.append(x)
                if len(part) >= self.batch_size:
                    yield part
                    part = []
        if part:
            yield part

    def __iter__(self) -> Iterator[Batch]:
        decode = self.backend == "torch"
        with ThreadPoolExecutor(self.num_workers) as pool:
            pending: deque[Future] = deque()
            for raws in self._raw_batches():
                pending.append(pool.submit(make_batch, raws, self.spec, False, 0, 0, decode))
                while len(pending) > self.num_workers:
                    yield self._finish(pending.popleft().result())
            while pending:
                yield self._finish(pending.popleft().result())


# --- choosing -------------------------------------------------------------------------------------


def choose_access(where: str, data_cfg: Any) -> str:
    """random | stream for a split (data.access; auto: random for a local folder, and for a remote one
    that has a manifest, an .idx beside its first shard and range requests; else stream)."""
    access = str(data_cfg.access)
    if is_shard_set(where):
        return "stream"
    if kind_of(where) == "local":
        return "stream" if access == "stream" else "random"
    if access == "stream":
        return "stream"
    opts = RemoteOptions.from_config(data_cfg)
    src = open_split(where, opts)
    why = None
    if src.manifest is None:
        why = "it has no manifest.json"
    elif fetch(src.urls[0][: -len(".tar")] + ".idx", opts) is None:
        why = f"no index beside {src.urls[0]}"
    elif not supports_ranges(src.urls[0], opts):
        why = "the server does not answer range requests"
    if why is None:
        return "random"
    if access == "random":
        raise ConfigError(f"config key 'data.access': random access to {where} is not possible: {why} "
                          "(data.access=stream or auto reads it front to back)")
    log.info("%s: streamed (%s); the batches are as random as a shuffle buffer of %d samples makes them",
             where, why, int(data_cfg.shuffle_buffer))
    return "stream"


def open_train_loader(root: str, split: str, data_cfg: Any, aug_cfg: Any, *, world_size: int, rank: int,
                      global_batch: int, image_size: int, mean, std, seed: int, device: torch.device):
    """The train loader data.root and data.access call for: loader.TrainLoader (random access, local or
    by range requests) or StreamTrainLoader."""
    where = split_location(root, split)
    if choose_access(where, data_cfg) == "random":
        return build_train_loader(where, data_cfg, aug_cfg, world_size=world_size, rank=rank,
                                  global_batch=global_batch, image_size=image_size, mean=mean, std=std, seed=seed,
                                  device=device)
    spec = ViewSpec.from_config(aug_cfg, image_size, mean, std)
    return StreamTrainLoader(where, data_cfg, spec, world_size=world_size, rank=rank, global_batch=global_batch,
                             seed=seed, device=device)


def open_eval_loader(root: str, split: str, data_cfg: Any, *, world_size: int, rank: int, batch_size: int,
                     image_size: int, mean, std, device: torch.device):
    where = split_location(root, split)
    if choose_access(where, data_cfg) == "random":
        return build_eval_loader(where, data_cfg, world_size=world_size, rank=rank, batch_size=batch_size,
                                 image_size=image_size, mean=mean, std=std, device=device)
    spec = ViewSpec(int(image_size), tuple(mean), tuple(std))
    return StreamEvalLoader(where, data_cfg, spec, world_size=world_size, rank=rank, batch_size=batch_size,
                            device=device)


def open_pair_loader(root: str, split: str, data_cfg: Any, aug_cfg: Any, **kw: Any):
    """Cached mode's extraction input: random access only (it needs each sample's global index)."""
    where = split_location(root, split)
    if choose_access(where, data_cfg) != "random":
        raise ConfigError("config key 'train.mode': cached mode needs random access to the shards (a manifest, "
                          f".idx files and range requests); {where} is streamed: use train.mode=stream")
    return build_pair_loader(where, data_cfg, aug_cfg, **kw)


def split_size(root: str, split: str, data_cfg: Any) -> int | None:
    """Samples in a split, None when no manifest or index says (a stream learns it). Raises
    ShardError when the split is not there."""
    where = split_location(root, split)
    if not is_remote(where):
        return read_manifest(Path(where)).num_samples
    return open_split(where, RemoteOptions.from_config(data_cfg)).num_samples
