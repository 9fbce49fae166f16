"""The manifest of one split of a sharded dataset: what the shard writer promises and the loader trusts."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from scp_dist.errors import UserError
from scp_dist.fileio import atomic_write_text

MANIFEST_NAME = "manifest.json"
FORMAT = "scp_dist.shards/v1"
log = logging.getLogger("scp_dist")
# Converters that wrote class by class before orders were recorded (their manifests have no `order`).
CLASS_SORTED_BEFORE = frozenset({"imagefolder", "imagenet10", "imagenet_dogs"})
# `python -m scp_dist.shards` names of the sources whose manifest `source` differs.
CLI_NAMES = {"image_list": "list", "sklearn.load_digits": "digits"}
# How far above a random order the shard x label chi-square must be to call the order class-sorted:
# z > 5 is p < 3e-7 for a random permutation, and twice the degrees of freedom keeps tiny expected
# counts (many classes, small shards), where the chi-square approximation is loose, from tripping it.
SORTED_Z, SORTED_RATIO = 5.0, 2.0
_warned: set[tuple[str, int]] = set()


class ShardError(UserError, RuntimeError):
    """A shard directory, manifest or shard file that cannot be used as asked."""


@dataclass
class ShardInfo:
    name: str
    num_samples: int
    bytes: int
    sha256: str
    # Samples per label id, for labeled splits (None in unlabeled splits and in older manifests).
    label_counts: list[int] | None = None


@dataclass
class Manifest:
    source: str
    split: str
    num_samples: int
    num_classes: int
    classes: list[str] | None
    shards: list[ShardInfo] = field(default_factory=list)
    format: str = FORMAT
    # "shuffled": the writer put the samples in the seeded random order of `writer.shuffled(.., order_seed)`;
    # "as_given": in its caller's order; "unknown": a manifest from before orders were recorded.
    order: str = "unknown"
    order_seed: int | None = None
    # Directory the manifest was read from; not serialised.
    root: Path | None = None
    # URL of the split (http(s)://, s3://) when the manifest was fetched from remote storage
    # (scp_dist/data/remote.py); not serialised.
    url: str | None = None

    @property
    def labeled(self) -> bool:
        return self.num_classes > 0

    def shard_paths(self) -> list[Path]:
        assert self.root is not None, "manifest was not read from disk"
        return [self.root / s.name for s in self.shards]

    def shard_urls(self) -> list[str]:
        """Where each shard is: a URL beside a fetched manifest, else the local path as text."""
        if self.url is not None:
            return [f"{self.url.rstrip('/')}/{s.name}" for s in self.shards]
        return [str(p) for p in self.shard_paths()]

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("root")
        d.pop("url")
        return d


def _manifest_text(d: dict) -> str:
    # One shard per line: with label counts, one value per line would make ImageNet's manifest 128k lines.
    head = json.dumps({k: v for k, v in d.items() if k != "shards"}, indent=1)
    rows = ",\n".join("  " + json.dumps(s) for s in d["shards"])
    return f'{head[:-2]},\n "shards": [\n{rows}\n ]\n}}\n'


def manifest_digest(split_dir: Path) -> str | None:
    """A short hash of a split's manifest file (which lists every shard's sha256): the data's
    identity whatever path it is reached by; None when the split has no manifest."""
    m = Path(split_dir) / MANIFEST_NAME
    return hashlib.sha256(m.read_bytes()).hexdigest()[:16] if m.is_file() else None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shard_problem(path: Path, info: ShardInfo, sha256: bool = False) -> str | None:
    """Why the shard file is not the one the manifest describes, or None. Always a stat (the size);
    with sha256 also a full read, so only on request: hashing a data set at every start costs an
    epoch of I/O. A missing or shorter file is not a problem here: the reader skips what is gone
    (a truncated copy keeps its readable samples); a longer one was replaced or appended to."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size > info.bytes:
        return (f"{path}: {size} bytes, the manifest says {info.bytes}: not the shard the manifest describes "
                "(replaced or appended to); restore it or rewrite the split with `python -m scp_dist.shards`")
    if sha256 and size == info.bytes and file_sha256(path) != info.sha256:
        return (f"{path}: sha256 differs from the manifest's: not the shard the manifest describes (swapped or "
                "corrupted); restore it or rewrite the split with `python -m scp_dist.shards`")
    return None


def write_manifest(split_dir: Path, manifest: Manifest) -> Path:
    manifest.num_samples = sum(s.num_samples for s in manifest.shards)
    path = Path(split_dir) / MANIFEST_NAME
    atomic_write_text(path, _manifest_text(manifest.to_json()))
    return path


def shard_label_chi2(shards: list[ShardInfo]) -> tuple[float, int] | None:
    """Pearson's chi-square for independence of shard and label over the per-shard label counts, and
    its degrees of freedom; None without counts. A random order gives about the degrees of freedom;
    a class-sorted one about num_samples * (min(shards, classes) - 1)."""
    if not shards or any(s.label_counts is None for s in shards):
        return None
    table = np.array([s.label_counts for s in shards], dtype=np.float64)
    table = table[table.sum(1) > 0][:, table.sum(0) > 0]
    df = (table.shape[0] - 1) * (table.shape[1] - 1)
    if df < 1:
        return None
    expected = np.outer(table.sum(1), table.sum(0)) / table.sum()
    return float(((table - expected) ** 2 / expected).sum()), df


def _z(chi2: float, df: int) -> float:
    # Wilson-Hilferty: (chi2 / df) ** (1/3) is close to normal, even for a few degrees of freedom.
    v = 2.0 / (9.0 * df)
    return ((chi2 / df) ** (1.0 / 3.0) - (1.0 - v)) / math.sqrt(v)


def order_problem(m: Manifest) -> str | None:
    """Why the split's shard order looks class-sorted, or None. Reads only the manifest."""
    if not m.labeled or m.num_classes < 2:
        return None
    if m.order == "unknown" and m.source in CLASS_SORTED_BEFORE:
        return f"the {m.source} converter wrote it class by class before shuffling at write time"
    if len(m.shards) < 2:  # the order inside one shard is not in the manifest
        return None
    stat = shard_label_chi2(m.shards)
    if stat is None:
        return None
    chi2, df = stat
    if chi2 < SORTED_RATIO * df or _z(chi2, df) < SORTED_Z:
        return None
    single = sum(1 for s in m.shards if sum(1 for c in s.label_counts or () if c) == 1)
    return (f"the shards' label distributions are far from the split's (chi-square {chi2:.0f} on {df} degrees "
            f"of freedom, where a random order gives about {df})"
            + (f"; {single} of {len(m.shards)} shards hold a single label" if single else ""))


def _warn_if_class_sorted(m: Manifest, path: Path) -> None:
    """Log once per manifest file (and version of it): readers open a split once per rank and loader."""
    why = order_problem(m)
    if why is None:
        return
    stamp = (str(path.resolve()), path.stat().st_mtime_ns)
    if stamp in _warned:
        return
    _warned.add(stamp)
    cli = CLI_NAMES.get(m.source, m.source)
    log.warning(
        "%s: the shards look class-sorted: %s. SCP's loss is per batch, so batches read in shard order "
        "would hold few classes. Re-convert with `python -m scp_dist.shards %s --src ... --out ...` "
        "(shuffled at write time), or keep data.order=global.", m.root, why, cli)


def parse_manifest(text: str, where: str | os.PathLike, root: Path | None = None, url: str | None = None) -> Manifest:
    """A manifest from its JSON text, checked; errors name `where` (a file or a URL)."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ShardError(f"{where} is not valid JSON: {e}") from e
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise ShardError(f"{where}: format {got!r}, expected {FORMAT!r}")
    shards = [ShardInfo(**s) for s in raw.pop("shards")]
    raw.pop("format")
    m = Manifest(**raw, shards=shards, root=root, url=url)
    if m.num_samples != sum(s.num_samples for s in shards):
        raise ShardError(f"{where}: num_samples {m.num_samples} != sum over shards")
    if m.num_samples == 0:
        raise ShardError(f"{where}: the split has no samples")
    return m


def read_manifest(split_dir: str | os.PathLike, check_files: bool = True) -> Manifest:
    """Read and sanity-check a split's manifest; errors say which directory and what is wrong."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise ShardError(f"shard directory {split_dir} does not exist")
    path = split_dir / MANIFEST_NAME
    if not path.is_file():
        tars = sorted(split_dir.glob("*.tar"))
        hint = (
            f"it holds {len(tars)} .tar files but no manifest (an interrupted shard write?)"
            if tars
            else "it is empty"
        )
        raise ShardError(
            f"{split_dir} has no {MANIFEST_NAME}: {hint}. Write shards with `python -m scp_dist.shards`."
        )
    m = parse_manifest(path.read_text(), path, root=split_dir)
    if check_files:
        missing = [s.name for s in m.shards if not (split_dir / s.name).is_file()]
        if missing:
            raise ShardError(f"{split_dir}: {len(missing)} shard(s) listed in the manifest are missing: {missing[:5]}")
    _warn_if_class_sorted(m, path)
    return m
