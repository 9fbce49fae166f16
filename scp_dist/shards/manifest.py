"""The manifest of one split of a sharded dataset: what the shard writer promises and the loader trusts."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST_NAME = "manifest.json"
FORMAT = "scp_dist.shards/v1"


class ShardError(RuntimeError):
    """A shard directory, manifest or shard file that cannot be used as asked."""


@dataclass
class ShardInfo:
    name: str
    num_samples: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    source: str
    split: str
    num_samples: int
    num_classes: int
    classes: list[str] | None
    shards: list[ShardInfo] = field(default_factory=list)
    format: str = FORMAT
    # Directory the manifest was read from; not serialised.
    root: Path | None = None

    @property
    def labeled(self) -> bool:
        return self.num_classes > 0

    def shard_paths(self) -> list[Path]:
        assert self.root is not None, "manifest was not read from disk"
        return [self.root / s.name for s in self.shards]

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("root")
        return d


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same directory + rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_manifest(split_dir: Path, manifest: Manifest) -> Path:
    manifest.num_samples = sum(s.num_samples for s in manifest.shards)
    path = Path(split_dir) / MANIFEST_NAME
    atomic_write_text(path, json.dumps(manifest.to_json(), indent=1) + "\n")
    return path


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
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path} is not valid JSON: {e}") from e
    if raw.get("format") != FORMAT:
        raise ShardError(f"{path}: format {raw.get('format')!r}, expected {FORMAT!r}")
    shards = [ShardInfo(**s) for s in raw.pop("shards")]
    raw.pop("format")
    m = Manifest(**raw, shards=shards, root=split_dir)
    if m.num_samples != sum(s.num_samples for s in shards):
        raise ShardError(f"{path}: num_samples {m.num_samples} != sum over shards")
    if m.num_samples == 0:
        raise ShardError(f"{path}: the split has no samples")
    if check_files:
        missing = [s.name for s in shards if not (split_dir / s.name).is_file()]
        if missing:
            raise ShardError(f"{split_dir}: {len(missing)} shard(s) listed in the manifest are missing: {missing[:5]}")
    return m
