"""The shard format that the writer produces and the reader reads (docs/DESIGN.md), without either.

A split directory holds `shard-NNNNNN.tar` WebDataset tars, each sample a `<key>.<image ext>` member
and, when labeled, a `<key>.cls` member holding the label as text; beside each tar a `.idx` file,
DALI's webdataset index (what `wds2idx` writes), and the split's `manifest.json` (manifest.py).
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

SHARD_GLOB = "shard-*"  # a split's shards and their indices
IMAGE_EXTS = ("png", "jpg")  # what the writer writes
# What the reader takes as the image: also the spellings of shards written by other tools.
READ_IMAGE_EXTS = (*IMAGE_EXTS, "jpeg", "JPEG", "JPG", "PNG")
LABEL_EXT = "cls"
INDEX_VERSION = "v1.2"


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def index_path(tar: Path) -> Path:
    return tar.with_suffix(".idx")


@dataclass
class IndexEntry:
    """One sample of an index: its key and where its image and label members lie in the tar."""

    key: str
    image: tuple[str, int, int] | None  # (ext, offset, size)
    cls: tuple[int, int] | None  # (offset, size)


def index_text(tar_path: Path) -> tuple[str, int]:
    """DALI's webdataset index (the format `wds2idx` writes): 'v1.2 N' then, per sample, the
    (ext, data offset, size, member name) of each of its files; and the sample count N. Raises
    tarfile.ReadError on a file that is not a tar (empty, garbage)."""
    samples: dict[str, list[str]] = {}
    with tarfile.open(tar_path, "r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, _, ext = m.name.partition(".")
            samples.setdefault(key, []).append(f"{ext} {m.offset_data} {m.size} {m.name}")
    lines = [f"{INDEX_VERSION} {len(samples)}"] + [" ".join(parts) for parts in samples.values()]
    return "\n".join(lines) + "\n", len(samples)


def parse_index(text: str, where: str | os.PathLike) -> list[IndexEntry]:
    """The entries of an index (index_text's format); ValueError names `where` if it is not one."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith(INDEX_VERSION):
        raise ValueError(f"{where}: not a DALI webdataset index (first line {lines[:1]})")
    entries = []
    for line in lines[1:]:
        parts = line.split()
        image = cls = None
        key = ""
        for i in range(0, len(parts), 4):
            ext, off, size, name = parts[i], int(parts[i + 1]), int(parts[i + 2]), parts[i + 3]
            key = name[: -len(ext) - 1]
            if ext in READ_IMAGE_EXTS:
                image = (ext, off, size)
            elif ext == LABEL_EXT:
                cls = (off, size)
        entries.append(IndexEntry(key, image, cls))
    return entries


def indexed_count(idx: Path) -> int | None:
    """The sample count in an index's header line, or None without a readable one."""
    try:
        with open(idx) as f:
            head = f.readline().split()
        return int(head[1]) if len(head) == 2 and head[0] == INDEX_VERSION else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None
