"""The training images nearest to a query, in a finished run's frozen feature space or in its
cluster-probability space.

    python -m scp_dist.search --run runs/X --query IMG... [-k 10] [--space features|probs] [--json]

A query image goes through scp_dist.predict's path (the run's evaluation loader, backbone and, for
`probs`, head), so a training image used as a query finds itself first with similarity 1.

The index is built once per run and kept in `<run>/search/`: one faiss inner-product index per
space over the L2-normalised vectors of the training split (cosine similarity), row i being row i of
the run's assignments_train.csv (the split's canonical order, less samples that could not be read).
The training features come from the run's feature cache in cached mode and are otherwise
extracted through predict's path. `meta.json` records what the index was built from (checkpoint,
eval.json, features); when that changes the index is rebuilt on next use.

Exact search (`IndexFlatIP`) below IVF_MIN_ROWS vectors, an inverted file (`IndexIVFFlat`) from
there on; measured in benchmarks/bench/search.py (docs/USING.md, "Search"). Searches run on faiss's
GPU index when faiss sees a GPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scp_dist import distributed as D
from scp_dist.faiss_index import (
    IVF_MIN_ROWS,
    IVF_PROBE_FRACTION,
    build_index,
    normalise,
    on_gpu,
)
from scp_dist.feature_cache import cache_dir, load_kind
from scp_dist.fileio import atomic_write, atomic_write_text
from scp_dist.predict import PredictError, cli, feature_batches, images_to_shards
from scp_dist.run_artifacts import EVAL_NAME, Run, RunError, load_run
from scp_dist.shards.manifest import manifest_digest

log = logging.getLogger("scp_dist")
SEARCH_DIR = "search"
FORMAT = "scp_dist.search/v1"
SPACES = ("features", "probs")
_CHUNK = 4096  # rows per head / search call: bounds the temporary (chunk, K) and (chunk, k) blocks


@dataclass
class TrainingIndex:
    """One space's index of a run's training split, as stored in <run>/search/."""

    space: str
    index: Any  # the CPU index (reconstruct); `searcher` is what searches
    keys: np.ndarray  # (n,) str, row i = row i of assignments_train.csv
    clusters: np.ndarray  # (n,) the reported cluster of each row
    searcher: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.searcher = on_gpu(self.index)

    @property
    def kind(self) -> str:
        return "ivf" if hasattr(self.index, "nprobe") else "flat"

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, rows), each (len(q), k), best first; rows -1 where fewer than k were found."""
        q = normalise(q)
        k = min(k, len(self))
        sims, ids = np.empty((len(q), k), np.float32), np.empty((len(q), k), np.int64)
        for lo in range(0, len(q), _CHUNK):
            sims[lo:lo + _CHUNK], ids[lo:lo + _CHUNK] = self.searcher.search(q[lo:lo + _CHUNK], k)
        return sims, ids

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """The stored (normalised) vectors of the given rows."""
        import faiss

        if self.kind == "ivf":
            faiss.extract_index_ivf(self.index).make_direct_map()
        return self.index.reconstruct_batch(np.asarray(rows, dtype=np.int64))


# ---------------------------------------------------------------- building and loading


def search_dir(run: Path) -> Path:
    return Path(run) / SEARCH_DIR


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _cached_plain(run: Run) -> Path | None:
    """The run's feature cache when it still holds the training split's plain features."""
    if not run.cached:
        return None
    try:
        root = cache_dir(run.cfg)
    except (OSError, ValueError):  # the data's manifests are gone: the cache cannot be named
        return None
    return root if (root / run.cfg.data.train_split / "plain.json").is_file() else None


def fingerprint(run: Run) -> dict:
    """What the stored index depends on: the head (checkpoint file), the reported clustering
    (eval.json), where the features come from and the index rule."""
    st = run.checkpoint.stat()
    cache = _cached_plain(run)
    split = Path(run.cfg.data.root) / run.cfg.data.train_split
    source = (f"cache {cache}: {_sha(cache / run.cfg.data.train_split / 'plain.json')}" if cache is not None
              else f"shards {split}: {manifest_digest(split)}")
    return {"format": FORMAT, "checkpoint": [run.checkpoint.name, st.st_size, st.st_mtime_ns],
            "eval": _sha(run.path / EVAL_NAME), "source": source, "ivf_min_rows": IVF_MIN_ROWS,
            "ivf_probe_fraction": IVF_PROBE_FRACTION}


def training_features(run: Run) -> tuple[np.ndarray, list[str]]:
    """(n, D) features of the training split as the run's head saw them at evaluation, and keys,
    in canonical order: read from the feature cache, else extracted (one process)."""
    cache = _cached_plain(run)
    if cache is not None:
        plain = load_kind(cache, run.cfg.data.train_split, "plain")
        assert plain.keys is not None
        return run.as_evaluated(plain.feats[0]).numpy(), plain.keys
    split = Path(run.cfg.data.root) / run.cfg.data.train_split
    if not (split / "manifest.json").is_file():
        raise RunError(f"run {run.path}: its training split {split} is not there to index (data.root in "
                       f"{run.path / 'config.yaml'})")
    skipped: list[tuple[str, str, str]] = []
    feats, keys = [], []
    for f, k, _ in feature_batches(run, split, D.DistState(device=run.device), skipped, desc="index features"):
        feats.append(f.cpu().numpy())
        keys.extend(k)
    if skipped:
        log.warning("%d training samples could not be read and are not indexed (as in the run's evaluation)",
                    len(skipped))
    return np.concatenate(feats), keys


def _probabilities(run: Run, feats: np.ndarray) -> np.ndarray:
    return np.concatenate([run.probabilities(torch.from_numpy(feats[lo:lo + _CHUNK])).cpu().numpy()
                           for lo in range(0, len(feats), _CHUNK)])


def build(run: Run) -> dict:
    """Build and store both spaces' indexes of the run; returns the meta record."""
    import faiss

    feats, keys = training_features(run)
    probs = _probabilities(run, feats)
    out = search_dir(run.path)
    out.mkdir(parents=True, exist_ok=True)
    meta: dict = {"fingerprint": fingerprint(run), "num_rows": len(keys), "spaces": {}}
    for space, x in (("features", feats), ("probs", probs)):
        index = build_index(normalise(x), seed=run.cfg.train.seed)
        blob = faiss.serialize_index(index)
        atomic_write(out / f"{space}.faiss", lambda f, b=blob: f.write(b.tobytes()))
        meta["spaces"][space] = {"dim": int(x.shape[1]), "kind": "ivf" if hasattr(index, "nprobe") else "flat",
                                 "nprobe": int(getattr(index, "nprobe", 0))}
    atomic_write(out / "keys.npy", lambda f: np.save(f, np.asarray(keys, dtype=str)))
    atomic_write(out / "clusters.npy", lambda f: np.save(f, probs.argmax(1).astype(np.int64)))
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=1))  # last: the index is complete
    log.info("search index of %s: %d rows (%s)", run.path, len(keys),
             ", ".join(f"{s} {m['kind']}" for s, m in meta["spaces"].items()))
    return meta


def load_index(run: Run, space: str = "features") -> TrainingIndex:
    """The run's stored index of `space`, built first when absent or stale."""
    import faiss

    if space not in SPACES:
        raise RunError(f"search space {space!r}: {' | '.join(SPACES)}")
    out = search_dir(run.path)
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        meta = None
    if meta is None or meta.get("fingerprint") != fingerprint(run):
        if meta is not None:
            log.info("the search index of %s is stale (the run changed); rebuilding", run.path)
        build(run)
    index = faiss.deserialize_index(np.fromfile(out / f"{space}.faiss", dtype=np.uint8))
    return TrainingIndex(space, index, np.load(out / "keys.npy"), np.load(out / "clusters.npy"))


def _device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def training_neighbours(run: Path, rows: Sequence[int], k: int, space: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """For the training samples at canonical indices `rows` (row positions of assignments_train.csv),
    the (len(rows), k) canonical indices of their k nearest OTHER training samples, nearest first,
    and the cosine similarities, through the run's stored index (built if missing). Where fewer than
    k others are found (a tiny split, an IVF probe that came back short) the rest is -1 / NaN."""
    index = load_index(load_run(run, _device(None)), space)
    rows = np.asarray(rows, dtype=np.int64)
    ids = np.full((len(rows), k), -1, dtype=np.int64)
    sims = np.full((len(rows), k), np.nan, dtype=np.float32)
    if not len(rows):
        return ids, sims
    if rows.min() < 0 or rows.max() >= len(index):
        raise ValueError(f"rows must be in 0..{len(index) - 1} (the indexed training rows)")
    s, found = index.search(index.vectors(rows), k + 1)
    for r in range(len(rows)):
        keep = (found[r] >= 0) & (found[r] != rows[r])  # itself, wherever duplicates put it
        n = min(k, int(keep.sum()))
        ids[r, :n], sims[r, :n] = found[r][keep][:n], s[r][keep][:n]
    return ids, sims


# ---------------------------------------------------------------- queries


@dataclass
class Hit:
    query: str
    rank: int
    key: str
    row: int
    similarity: float
    cluster: int


def query_vectors(run: Run, paths: Sequence[Path], space: str) -> tuple[list[str], np.ndarray, list[tuple]]:
    """Query images through predict's path: (their paths, (n, dim) vectors, failures as
    (path, reason, detail))."""
    with tempfile.TemporaryDirectory(prefix=".search-") as work:
        inp = images_to_shards(list(paths), Path(work) / "queries")
        skipped: list[tuple[str, str, str]] = []
        feats, keys = [], []
        for f, k, _ in feature_batches(run, inp.split_dir, D.DistState(device=run.device), skipped,
                                       desc="queries"):
            feats.append(f)
            keys.extend(k)
    assert inp.paths is not None
    failed = [(inp.paths[key], *(("unreadable", inp.unreadable[key]) if key in inp.unreadable else (r, d)))
              for r, key, d in skipped]
    if not feats:
        return [], np.zeros((0, 1), np.float32), failed
    x = torch.cat(feats)
    vecs = run.probabilities(x).cpu().numpy() if space == "probs" else x.cpu().numpy()
    return [inp.paths[key] for key in keys], vecs, failed


def search(run: Run, paths: Sequence[Path], k: int = 10, space: str = "features") -> tuple[list[Hit], list[tuple]]:
    """The k nearest training images of each query image, and the queries that could not be read."""
    index = load_index(run, space)
    names, vecs, failed = query_vectors(run, paths, space)
    hits: list[Hit] = []
    if names:
        sims, rows = index.search(vecs, k)
        for q, name in enumerate(names):
            for rank, (s, r) in enumerate(zip(sims[q], rows[q], strict=True), 1):
                if r >= 0:
                    hits.append(Hit(name, rank, str(index.keys[r]), int(r), float(s), int(index.clusters[r])))
    return hits, failed


def format_table(hits: Sequence[Hit]) -> str:
    cols = ["query", "rank", "key", "row", "similarity", "cluster"]
    cells = [cols] + [[h.query, str(h.rank), h.key, str(h.row), f"{h.similarity:.4f}", str(h.cluster)] for h in hits]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scp_dist.search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", "--run-dir", dest="run", required=True, type=Path, help="the run directory")
    p.add_argument("--query", nargs="+", required=True, type=Path, help="query image file(s)")
    p.add_argument("-k", type=int, default=10, help="neighbours per query")
    p.add_argument("--space", choices=SPACES, default="features",
                   help="features: the frozen backbone's (cosine); probs: the head's cluster probabilities (cosine)")
    p.add_argument("--json", action="store_true", help="JSON records instead of a table")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p.parse_args(argv)


def search_main(args: argparse.Namespace, st: D.DistState) -> None:
    if args.k < 1:
        raise PredictError(f"-k {args.k}: must be >= 1")
    missing = [str(q) for q in args.query if not q.is_file()]
    if missing:
        raise PredictError(f"query image(s) not found: {', '.join(missing)}")
    run = load_run(args.run, st.device)
    hits, failed = search(run, args.query, args.k, args.space)
    for path, reason, detail in failed:
        print(f"query {path} skipped ({reason}): {detail}", file=sys.stderr)
    if args.json:
        print(json.dumps([h.__dict__ for h in hits], indent=1))
    else:
        print(format_table(hits))


def main(argv: list[str] | None = None) -> int:
    return cli(argv, parse_args, search_main)


if __name__ == "__main__":
    raise SystemExit(main())
