"""Write samples into WebDataset tar shards + DALI index files + a manifest, atomically and resumably.

A shard becomes visible only when complete: it is written as `.shard-N.tar.tmp` and renamed. Progress
(the finished shards, with counts and checksums) is kept in `.progress.json`, so re-running the same
conversion skips the finished shards and writes only the rest; `manifest.json` is written last. The
sample iterator must yield the same samples in the same order on every run (all converters do).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from scp_dist.shards.manifest import (
    MANIFEST_NAME,
    Manifest,
    ShardError,
    ShardInfo,
    atomic_write_text,
    write_manifest,
)

PROGRESS_NAME = ".progress.json"
IMAGE_EXTS = ("png", "jpg")


@dataclass
class Sample:
    key: str
    image: bytes  # encoded image bytes
    ext: str  # "png" | "jpg": the codec of `image`
    label: int | None = None


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata so the same samples give byte-identical shards (and checksums).
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_index(tar_path: Path, idx_path: Path) -> int:
    """DALI's webdataset index (the format `wds2idx` writes): 'v1.2 N' then, per sample, the
    (ext, data offset, size, member name) of each of its files. Returns the sample count."""
    samples: dict[str, list[str]] = {}
    with tarfile.open(tar_path, "r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, _, ext = m.name.partition(".")
            samples.setdefault(key, []).append(f"{ext} {m.offset_data} {m.size} {m.name}")
    lines = [f"v1.2 {len(samples)}"] + [" ".join(parts) for parts in samples.values()]
    atomic_write_text(idx_path, "\n".join(lines) + "\n")
    return len(samples)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _ShardSink:
    """Accumulates samples into the current shard; closes it by count or bytes."""

    def __init__(self, split_dir: Path, first_index: int, max_count: int, max_bytes: int, done: list[ShardInfo]):
        self.dir, self.index, self.max_count, self.max_bytes = split_dir, first_index, max_count, max_bytes
        self.done = done
        self.tar: tarfile.TarFile | None = None
        self.count = self.bytes = 0
        self.keys: set[str] = set()

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
            _add_member(self.tar, f"{s.key}.cls", str(int(s.label)).encode())
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
        write_index(final, final.with_suffix(".idx"))
        self.done.append(ShardInfo(final.name, self.count, final.stat().st_size, _sha256(final)))
        atomic_write_text(self.dir / PROGRESS_NAME, json.dumps([asdict(d) for d in self.done]))
        self.tar, self.count, self.bytes = None, 0, 0
        self.index += 1


def _finished_shards(split_dir: Path) -> list[ShardInfo]:
    """Shards a previous run finished (and that are still intact on disk)."""
    path = split_dir / PROGRESS_NAME
    if not path.is_file():
        return []
    done = [ShardInfo(**d) for d in json.loads(path.read_text())]
    for i, info in enumerate(done):
        p = split_dir / info.name
        if not p.is_file() or p.stat().st_size != info.bytes or not p.with_suffix(".idx").is_file():
            return done[:i]  # keep the intact prefix; everything after it is rewritten
    return done


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
) -> Manifest:
    """Write `samples` as shards of at most `max_count` samples (and about `max_bytes` bytes of image
    data when > 0) into `split_dir`; returns the manifest. `classes` is None for unlabeled data."""
    if max_count < 1:
        raise ValueError(f"max_count must be >= 1, got {max_count}")
    split_dir = Path(split_dir)
    split_dir.mkdir(parents=True, exist_ok=True)
    (split_dir / MANIFEST_NAME).unlink(missing_ok=True)  # the split is incomplete until we finish
    for stale in split_dir.glob(".*.tmp"):
        stale.unlink()
    done = _finished_shards(split_dir) if resume else []
    skip = sum(d.num_samples for d in done)
    for old in split_dir.glob("shard-*"):
        if old.with_suffix(".tar").name not in {d.name for d in done}:
            old.unlink()
    sink = _ShardSink(split_dir, len(done), max_count, max_bytes, done)
    keys: set[str] = set()
    n = 0
    it: Iterator[Sample] = iter(samples)
    bar = tqdm(it, total=total, desc=f"shards {split}", unit="img", disable=not progress, initial=0)
    try:
        for s in bar:
            if s.key in keys:
                raise ShardError(f"duplicate sample key {s.key!r} in split {split!r}")
            keys.add(s.key)
            if n >= skip:
                if classes is not None and (s.label is None or not 0 <= s.label < len(classes)):
                    raise ShardError(f"sample {s.key!r}: label {s.label!r} outside 0..{len(classes) - 1}")
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
                        classes=list(classes) if classes else None, shards=done)
    write_manifest(split_dir, manifest)  # .progress.json stays: a re-run skips every finished shard
    manifest.root = split_dir
    return manifest
