"""Write samples into WebDataset tar shards + DALI index files + a manifest, atomically and resumably.

A shard becomes visible only when complete: it is written as `.shard-N.tar.tmp` and renamed. Progress
(the finished shards, with counts and checksums) is kept in `.progress.json`, so re-running the same
conversion skips the finished shards and writes only the rest; `manifest.json` is written last. The
sample iterator must yield the same samples in the same order on every run (all converters do).

SCP's loss is computed per batch, so every batch must be a uniform random sample of the split. The
converters therefore pass `seed`: the samples are put in a seeded random order (`shuffled`) before
anything is written, so consecutive samples, shards and batches in shard order are i.i.d. for any
reader (DALI's own webdataset reader included). Each shard's label counts go into the manifest, so a
reader can tell a class-sorted split without opening a tar (`manifest.order_problem`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

from scp_dist.fileio import atomic_write_text
from scp_dist.shards.format import IMAGE_EXTS, LABEL_EXT, SHARD_GLOB, index_path, index_text, shard_name
from scp_dist.shards.manifest import (
    MANIFEST_NAME,
    Manifest,
    ShardError,
    ShardInfo,
    file_sha256,
    write_manifest,
)

PROGRESS_NAME = ".progress.json"
log = logging.getLogger("scp_dist")


@dataclass
class Sample:
    key: str
    image: bytes  # encoded image bytes
    ext: str  # "png" | "jpg": the codec of `image`
    label: int | None = None


class LazySample(Sample):
    """A Sample whose image is read/encoded only when the writer needs it: on resume the writer walks
    the skipped samples too, and loading them would re-read a whole ImageNet for nothing. Shuffling
    permutes these cheap placeholders, never decoded images."""

    def __init__(self, key: str, label: int | None, load: Callable[[], tuple[bytes, str]]):
        self.key, self.label, self._load = key, label, load
        self._loaded: tuple[bytes, str] | None = None

    def _get(self) -> tuple[bytes, str]:
        if self._loaded is None:
            self._loaded = self._load()
        return self._loaded

    @property
    def image(self) -> bytes:  # type: ignore[override]
        return self._get()[0]

    @property
    def ext(self) -> str:  # type: ignore[override]
        return self._get()[1]


S = TypeVar("S", bound=Sample)


def _rank(seed: int, key: str) -> bytes:
    return hashlib.blake2b(f"{seed}\0{key}".encode("utf-8", "surrogateescape"), digest_size=16).digest()


def shuffled(samples: Iterable[S], seed: int) -> list[S]:
    """The samples in a seeded, uniformly random order: sorted by a seeded hash of each sample's key.

    A hash rather than numpy's RNG, so the order depends only on (seed, keys): the same on every run,
    numpy version and listing order, which is what lets a resumed conversion skip finished shards.
    Keys are unique within a split (the writer checks), so this is a permutation of the samples."""
    return sorted(samples, key=lambda s: _rank(seed, s.key))


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata so the same samples give byte-identical shards (and checksums).
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_index(tar_path: Path, idx_path: Path) -> int:
    """index_text into `idx_path`; returns the sample count."""
    text, n = index_text(tar_path)
    atomic_write_text(idx_path, text)
    return n


class _ShardSink:
    """Accumulates samples into the current shard; closes it by count or bytes."""

    def __init__(self, split_dir: Path, first_index: int, max_count: int, max_bytes: int, done: list[ShardInfo],
                 num_classes: int, order: dict):
        self.dir, self.index, self.max_count, self.max_bytes = split_dir, first_index, max_count, max_bytes
        self.done, self.num_classes, self.order = done, num_classes, order
        self.tar: tarfile.TarFile | None = None
        self.count = self.bytes = 0
        self.label_counts = [0] * num_classes

    def add(self, s: Sample) -> None:
        if s.ext not in IMAGE_EXTS:
            raise ShardError(f"sample {s.key!r}: image extension {s.ext!r}, expected one of {IMAGE_EXTS}")
        if "." in s.key or "/" in s.key:
            raise ShardError(f"sample key {s.key!r} must not contain '.' or '/' (webdataset splits names on them)")
        if self.tar is None:
            self.tmp = self.dir / f".{shard_name(self.index)}.tmp"
            self.tar = tarfile.open(self.tmp, "w:", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 - spans many add() calls
        _add_member(self.tar, f"{s.key}.{s.ext}", s.image)
        if s.label is not None:
            _add_member(self.tar, f"{s.key}.{LABEL_EXT}", str(int(s.label)).encode())
            if self.num_classes:
                self.label_counts[s.label] += 1
        self.count += 1
        self.bytes += len(s.image)
        if self.count >= self.max_count or (self.max_bytes and self.bytes >= self.max_bytes):
            self.close()

    def close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        final = self.dir / shard_name(self.index)
        os.replace(self.tmp, final)
        write_index(final, index_path(final))
        counts = self.label_counts if self.num_classes else None
        self.done.append(ShardInfo(final.name, self.count, final.stat().st_size, file_sha256(final), counts))
        progress = {**self.order, "shards": [asdict(d) for d in self.done]}
        atomic_write_text(self.dir / PROGRESS_NAME, json.dumps(progress))
        self.tar, self.count, self.bytes = None, 0, 0
        self.label_counts = [0] * self.num_classes
        self.index += 1


def _describe(order: dict) -> str:
    return f"shuffled with seed {order['order_seed']}" if order["order"] == "shuffled" else "in the given order"


def _finished_shards(split_dir: Path, order: dict) -> list[ShardInfo]:
    """Shards a previous run finished (and that are still intact on disk), provided it wrote the samples
    in the same `order`: shards of another order hold other samples, so resuming from them would
    duplicate some samples and drop others."""
    path = split_dir / PROGRESS_NAME
    if not path.is_file():
        return []
    raw = json.loads(path.read_text())
    if isinstance(raw, list):  # written before orders were recorded: always in the given order
        raw = {"order": "as_given", "order_seed": None, "shards": raw}
    before = {"order": raw.get("order"), "order_seed": raw.get("order_seed")}
    if before != order:
        log.warning("%s: the finished shards were written %s, this run asks for %s; rewriting them",
                    split_dir, _describe(before), _describe(order))
        return []
    done = [ShardInfo(**d) for d in raw["shards"]]
    for i, info in enumerate(done):
        p = split_dir / info.name
        if not p.is_file() or p.stat().st_size != info.bytes or not index_path(p).is_file():
            return done[:i]  # keep the intact prefix; everything after it is rewritten
    return done


def _check_label(s: Sample, classes: list[str] | None) -> None:
    # Checked for every sample, skipped ones too: labels cost nothing to read, images do.
    if classes is None:
        return
    if s.label is None:
        raise ShardError(f"sample {s.key!r} has no label, but the split has {len(classes)} classes")
    if not 0 <= s.label < len(classes):
        raise ShardError(f"sample {s.key!r}: label {s.label!r} outside 0..{len(classes) - 1} "
                         f"(the split has {len(classes)} classes)")


def write_shards(
    samples: Iterable[Sample],
    split_dir: str | os.PathLike,
    *,
    source: str,
    split: str,
    classes: list[str] | None,
    max_count: int = 10_000,
    max_bytes: int = 0,
    total: int | None = None,
    resume: bool = True,
    progress: bool = True,
    seed: int | None = None,
) -> Manifest:
    """Write `samples` as shards of at most `max_count` samples (and about `max_bytes` bytes of image
    data when > 0) into `split_dir`; returns the manifest. `classes` is None for unlabeled data.

    With `seed`, the samples are first put in the seeded random order of `shuffled` (all of them are
    listed first, so pass lazy samples for big data) and the manifest records `order: "shuffled"`;
    without, they are written as given (`order: "as_given"`)."""
    if max_count < 1:
        raise ValueError(f"max_count must be >= 1, got {max_count}")
    order = {"order": "as_given", "order_seed": None} if seed is None else {"order": "shuffled", "order_seed": seed}
    if seed is not None:
        samples = shuffled(samples, seed)
    split_dir = Path(split_dir)
    split_dir.mkdir(parents=True, exist_ok=True)
    (split_dir / MANIFEST_NAME).unlink(missing_ok=True)  # the split is incomplete until we finish
    for stale in split_dir.glob(".*.tmp"):
        stale.unlink()
    done = _finished_shards(split_dir, order) if resume else []
    skip = sum(d.num_samples for d in done)
    for old in split_dir.glob(SHARD_GLOB):
        if old.with_suffix(".tar").name not in {d.name for d in done}:
            old.unlink()
    sink = _ShardSink(split_dir, len(done), max_count, max_bytes, done, len(classes) if classes else 0, order)
    keys: set[str] = set()
    n = 0
    it: Iterator[Sample] = iter(samples)
    bar = tqdm(it, total=total, desc=f"shards {split}", unit="img", disable=not progress, initial=0)
    try:
        for s in bar:
            if s.key in keys:
                raise ShardError(f"duplicate sample key {s.key!r} in split {split!r}")
            keys.add(s.key)
            _check_label(s, classes)
            if n >= skip:
                sink.add(s)
            n += 1
        sink.close()
    finally:
        bar.close()
        if sink.tar is not None:  # an exception mid-shard: drop the partial shard, keep finished ones
            sink.tar.close()
            sink.tmp.unlink(missing_ok=True)
    if n < skip:
        raise ShardError(f"{split_dir}: the source now yields {n} samples but {skip} were written before; "
                         "rerun with resume disabled (--no-resume)")
    manifest = Manifest(source=source, split=split, num_samples=0, num_classes=len(classes) if classes else 0,
                        classes=list(classes) if classes else None, shards=done, **order)
    write_manifest(split_dir, manifest)  # .progress.json stays: a re-run skips every finished shard
    manifest.root = split_dir
    return manifest
