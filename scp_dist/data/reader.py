"""Random access to the samples of a split: global sample index -> (key, encoded image, label).

Uses the per-shard DALI index files (byte offsets of every member) so a rank reads exactly its
planned samples without scanning other ranks' data. Problems are reported per sample (missing
shard, truncated tar, sample without an image) so the loader can count and skip them, or stop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scp_dist.shards.manifest import Manifest, ShardError
from scp_dist.shards.writer import IMAGE_EXTS, write_index

# Reasons a sample can be skipped; the loader counts each.
MISSING_SHARD = "missing_shard"
TRUNCATED = "truncated"
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
SKIP_REASONS = (MISSING_SHARD, TRUNCATED, MISSING_IMAGE, CORRUPT_IMAGE)


@dataclass
class RawSample:
    index: int  # global sample index in canonical order
    key: str
    image: bytes | None
    ext: str
    label: int  # -1 when unlabeled
    error: str | None = None  # one of SKIP_REASONS
    detail: str = ""


@dataclass
class _Entry:
    key: str
    image: tuple[str, int, int] | None  # (ext, offset, size)
    cls: tuple[int, int] | None  # (offset, size)


def parse_index(idx_path: Path) -> list[_Entry]:
    lines = idx_path.read_text().splitlines()
    if not lines or not lines[0].startswith("v1.2"):
        raise ShardError(f"{idx_path}: not a DALI webdataset index (first line {lines[:1]})")
    entries = []
    for line in lines[1:]:
        parts = line.split()
        image = cls = None
        key = ""
        for i in range(0, len(parts), 4):
            ext, off, size, name = parts[i], int(parts[i + 1]), int(parts[i + 2]), parts[i + 3]
            key = name[: -len(ext) - 1]
            if ext in IMAGE_EXTS or ext in ("jpeg", "JPEG", "JPG", "PNG"):
                image = (ext, off, size)
            elif ext == "cls":
                cls = (off, size)
        entries.append(_Entry(key, image, cls))
    return entries


class SampleReader:
    """Reads samples by global index. File handles are opened lazily per process (DataLoader
    workers fork after construction; a shared handle would interleave their seeks)."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.paths = manifest.shard_paths()
        self.counts = [s.num_samples for s in manifest.shards]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self._entries: dict[int, list[_Entry] | str] = {}
        self._files: dict[int, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _shard_entries(self, s: int) -> list[_Entry] | str:
        if s not in self._entries:
            tar = self.paths[s]
            idx = tar.with_suffix(".idx")
            try:
                if not idx.is_file():
                    write_index(tar, Path(f"{idx}.{os.getpid()}.tmp"))  # a shard from elsewhere, unindexed
                    os.replace(f"{idx}.{os.getpid()}.tmp", idx)
                # A truncated tar keeps its readable samples; the rest fail in _read as TRUNCATED.
                entries: list[_Entry] | str = parse_index(idx)
                tar.stat()
            except (OSError, ValueError) as e:
                entries = f"{tar}: {e}"
            self._entries[s] = entries
        return self._entries[s]

    def _read(self, s: int, offset: int, size: int) -> bytes:
        if os.getpid() != self._pid:
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(s)
        if f is None:
            f = self._files[s] = open(self.paths[s], "rb")  # noqa: SIM115 - cached for the reader's life
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise EOFError(f"{self.paths[s]}: wanted {size} bytes at {offset}, got {len(data)}")
        return data

    def read(self, index: int) -> RawSample:
        s = int(np.searchsorted(self.offsets, index, side="right") - 1)
        pos = index - int(self.offsets[s])
        entries = self._shard_entries(s)
        if isinstance(entries, str):
            return RawSample(index, f"{self.paths[s].name}#{pos}", None, "", -1, MISSING_SHARD, entries)
        if pos >= len(entries):
            return RawSample(index, f"{self.paths[s].name}#{pos}", None, "", -1, TRUNCATED,
                             f"{self.paths[s]} holds {len(entries)} samples, the manifest says {self.counts[s]}")
        e = entries[pos]
        label = -1
        try:
            if e.cls is not None:
                label = int(self._read(s, *e.cls).decode().strip())
            if e.image is None:
                return RawSample(index, e.key, None, "", label, MISSING_IMAGE, f"{self.paths[s]}: {e.key} has no image")
            ext, off, size = e.image
            return RawSample(index, e.key, self._read(s, off, size), ext, label)
        except (OSError, EOFError) as err:
            return RawSample(index, e.key, None, "", label, TRUNCATED, str(err))
        except ValueError as err:
            return RawSample(index, e.key, None, "", -1, CORRUPT_IMAGE, f"bad label: {err}")
