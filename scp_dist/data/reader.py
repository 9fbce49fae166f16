"""Random access to the samples of a split: global sample index -> (key, encoded image, label).

Uses the per-shard DALI index files (byte offsets of every member) so a rank reads exactly its
planned samples without scanning other ranks' data. Problems are reported per sample (missing
shard, truncated tar, sample without an image, bad label) so the loader can count and skip them,
or stop. A shard that is not the one the manifest describes (longer, other sample count, other
sha256 when asked) is no sample problem but a wrong data set: it stops the job (SHARD_MISMATCH).

A split fetched from http(s):// or s3:// (a manifest with `url`, scp_dist/data/remote.py) is read
the same way through byte-range requests: the .idx beside each shard is fetched once, and each
sample costs one request covering its label and image members, so batches equal the local ones.

Nothing is ever written into the data set: a shard without an index (copied from elsewhere, or on a
read-only mount) is indexed in memory, and the index is kept under the user's cache directory
($XDG_CACHE_HOME/scp_dist/index) when that is writable, so later processes skip the tar scan.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scp_dist.data.remote import RemoteOptions, fetch, read_range
from scp_dist.fileio import atomic_write_text
from scp_dist.shards.format import IndexEntry, index_path, index_text, indexed_count, parse_index
from scp_dist.shards.manifest import Manifest, ShardError, shard_problem

log = logging.getLogger("scp_dist")

# Reasons a sample can be skipped; the loader counts each.
MISSING_SHARD = "missing_shard"
BAD_SHARD = "bad_shard"  # not a readable tar, or an unreadable index
TRUNCATED = "truncated"
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
BAD_LABEL = "bad_label"
SKIP_REASONS = (MISSING_SHARD, BAD_SHARD, TRUNCATED, MISSING_IMAGE, CORRUPT_IMAGE, BAD_LABEL)
# Never skipped, whatever data.on_error says: the manifest does not describe the shard, so the plan
# built from it would read duplicates or leave samples out.
SHARD_MISMATCH = "shard_mismatch"
_REWRITE = "rewrite the split with `python -m scp_dist.shards`"


@dataclass
class RawSample:
    index: int  # global sample index in canonical order
    key: str
    image: bytes | None
    ext: str
    label: int  # -1 when unlabeled
    error: str | None = None  # one of SKIP_REASONS, or SHARD_MISMATCH
    detail: str = ""


def parse_label(text: bytes, num_classes: int, where: str) -> int | str:
    """A `.cls` member's label, or why it is bad. Metrics count every label >= 0 as a class, so one
    outside the manifest's classes (when it declares any) would invent a class."""
    try:
        label = int(text.decode().strip())
    except (UnicodeDecodeError, ValueError):
        return f"{where}: label {text[:20]!r} is not an integer"
    if num_classes and not (label == -1 or 0 <= label < num_classes):
        return f"{where}: label {label} outside 0..{num_classes - 1} (the manifest declares {num_classes} classes)"
    return label


def index_cache_path(tar: Path, st: os.stat_result) -> Path:
    # Keyed by path, size and mtime: a rewritten shard never meets its predecessor's index.
    ident = f"{tar.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode("utf-8", "surrogateescape")
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "scp_dist" / "index" / f"{hashlib.sha256(ident).hexdigest()[:32]}.idx"


def load_index(tar: Path, st: os.stat_result) -> str:
    """The shard's index text: the .idx beside it, else the cached one, else built from the tar (and
    cached if the cache is writable). Raises OSError, or tarfile.TarError for a file that is no tar."""
    beside = index_path(tar)
    if beside.is_file():
        return beside.read_text()
    cached = index_cache_path(tar, st)
    if cached.is_file():
        return cached.read_text()
    text, _ = index_text(tar)
    try:
        atomic_write_text(cached, text)
    except OSError as e:  # no cache to write: the index lives in this process only
        log.debug("cannot cache the index of %s at %s: %s", tar, cached, e)
    return text


def _count_problem(tar: Path, found: int, expected: int) -> str:
    return (f"{tar}: holds {found} samples, the manifest says {expected}: the manifest does not describe this "
            f"shard, so an epoch would read duplicates or leave samples out; restore the shard or {_REWRITE}")


_verified: set[tuple[str, int, int]] = set()  # shards hashed by this process (one file, one version)


def _stamp(path: Path) -> tuple[str, int, int] | None:
    try:
        st = path.stat()
    except OSError:  # missing: nothing to hash, the reader skips its samples
        return None
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def check_shards(manifest: Manifest, verify: bool = False, part: tuple[int, int] = (0, 1)) -> None:
    """Raise ShardError naming the first shard that is not the one the manifest describes: always
    its size and its index's sample count (a stat and one line each); with verify also the sha256 of
    the shards of `part` = (rank, world), so the ranks share the reading."""
    if manifest.url is not None:  # remote: sizes and counts are checked as each shard's index arrives
        return
    rank, world = part
    for s, (path, info) in enumerate(zip(manifest.shard_paths(), manifest.shards, strict=True)):
        stamp = _stamp(path) if verify and s % world == rank else None
        hash_it = stamp is not None and stamp not in _verified
        problem = shard_problem(path, info, sha256=hash_it)
        if problem is None:
            n = indexed_count(index_path(path))
            if n is not None and n != info.num_samples:
                problem = _count_problem(path, n, info.num_samples)
        if problem is not None:
            raise ShardError(problem)
        if hash_it:
            _verified.add(stamp)


class SampleReader:
    """Reads samples by global index. File handles are opened lazily per process (DataLoader
    workers fork after construction; a shared handle would interleave their seeks).

    Construction checks every shard's size and index count against the manifest (check_shards)."""

    def __init__(self, manifest: Manifest, verify: bool = False, part: tuple[int, int] = (0, 1),
                 remote: RemoteOptions | None = None) -> None:
        self.manifest = manifest
        self.remote = (remote or RemoteOptions()) if manifest.url is not None else None
        self.urls = manifest.shard_urls()
        self.paths = [Path(u) for u in self.urls] if self.remote is not None else manifest.shard_paths()
        self.counts = [s.num_samples for s in manifest.shards]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.num_classes = manifest.num_classes
        self._entries: dict[int, list[IndexEntry] | tuple[str, str]] = {}
        self._files: dict[int, object] = {}
        self._pid = os.getpid()
        check_shards(manifest, verify, part)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _open_remote_shard(self, s: int) -> list[IndexEntry] | tuple[str, str]:
        url, info = self.urls[s], self.manifest.shards[s]
        idx = url[: -len(".tar")] + ".idx"
        try:
            text = fetch(idx, self.remote)
            if text is None:
                return BAD_SHARD, (f"{idx}: not found; random access to remote shards needs the .idx beside "
                                   "each (data.access=stream reads without them)")
            entries = parse_index(text.decode(), idx)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            return MISSING_SHARD, f"{url}: unreachable ({type(e).__name__}: {e})"
        if len(entries) != info.num_samples:
            return SHARD_MISMATCH, _count_problem(Path(url), len(entries), info.num_samples)
        return entries

    def _open_shard(self, s: int) -> list[IndexEntry] | tuple[str, str]:
        """The shard's entries, or (reason, detail) for all its samples."""
        if self.remote is not None:
            return self._open_remote_shard(s)
        tar, info = self.paths[s], self.manifest.shards[s]
        try:
            st = tar.stat()
            entries = parse_index(load_index(tar, st), index_path(tar))
        except FileNotFoundError as e:
            return MISSING_SHARD, f"{tar}: {e.strerror}"
        except (OSError, tarfile.TarError, ValueError) as e:
            return BAD_SHARD, (f"{tar}: unreadable ({type(e).__name__}: {e}); restore it (or delete a broken "
                               f".idx beside it) or {_REWRITE}")
        # A shorter file indexed from what is left is a truncated copy: its readable samples are kept,
        # the rest fail in read() as TRUNCATED. Any other count is the manifest's mistake.
        truncated = st.st_size < info.bytes and len(entries) < info.num_samples
        if len(entries) != info.num_samples and not truncated:
            return SHARD_MISMATCH, _count_problem(tar, len(entries), info.num_samples)
        return entries

    def _shard_entries(self, s: int) -> list[IndexEntry] | tuple[str, str]:
        if s not in self._entries:
            self._entries[s] = self._open_shard(s)
        return self._entries[s]

    def _read(self, s: int, offset: int, size: int) -> bytes:
        if self.remote is not None:
            return self._read_remote(s, offset, size)
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

    def _members(self, s: int, e: IndexEntry) -> tuple[bytes | None, bytes | None]:
        """The sample's (label text, image bytes), None where it has no such member. Remote: one
        range request spanning both (they are neighbours in the tar), not one per member."""
        parts = [p for p in (e.cls, e.image and e.image[1:]) if p is not None]
        if self.remote is None or len(parts) < 2:
            return (self._read(s, *e.cls) if e.cls else None, self._read(s, *e.image[1:]) if e.image else None)
        lo = min(off for off, _ in parts)
        span = self._read(s, lo, max(off + size for off, size in parts) - lo)
        cut = [span[off - lo: off - lo + size] for off, size in (e.cls, e.image[1:])]
        return cut[0], cut[1]

    def _read_remote(self, s: int, offset: int, size: int) -> bytes:
        data = read_range(self.urls[s], offset, size, self.remote)
        if len(data) != size:
            raise EOFError(f"{self.urls[s]}: wanted {size} bytes at {offset}, got {len(data)}")
        return data

    def read(self, index: int) -> RawSample:
        s = int(np.searchsorted(self.offsets, index, side="right") - 1)
        pos = index - int(self.offsets[s])
        entries = self._shard_entries(s)
        if isinstance(entries, tuple):
            return RawSample(index, f"{self.paths[s].name}#{pos}", None, "", -1, *entries)
        if pos >= len(entries):
            return RawSample(index, f"{self.paths[s].name}#{pos}", None, "", -1, TRUNCATED,
                             f"{self.paths[s]} holds {len(entries)} samples, the manifest says {self.counts[s]}")
        e = entries[pos]
        try:
            text, image = self._members(s, e)
            label = -1 if text is None else parse_label(text, self.num_classes, str(self.urls[s]))
            if isinstance(label, str):
                return RawSample(index, e.key, None, "", -1, BAD_LABEL, label)
            if e.image is None:
                return RawSample(index, e.key, None, "", label, MISSING_IMAGE, f"{self.urls[s]}: {e.key} has no image")
            return RawSample(index, e.key, image, e.image[0], label)
        except (OSError, EOFError) as err:
            return RawSample(index, e.key, None, "", -1, TRUNCATED, str(err))
