"""A run's report: one static HTML page, `<run>/report/index.html`, plus paginated cluster pages beside it.

    python -m scp_dist.report --run runs/digits_seed0          # (re)write the report of a finished run
    python -m scp_dist.report --run runs/X --data-root /mnt/x  # the shards moved since training

Written by default at the end of every run (`output.report=true`, rank 0, the `report_html` stage).
No server and no network: thumbnails and figures are embedded as data URIs, so the folder can be
copied anywhere and opened from file://. What it shows (docs/USING.md, "Report"): scores next to
k-means, the training curves of metrics.jsonl, a t-SNE map of a seeded sample of the frozen features,
the confusion matrix after Hungarian matching and per-class accuracy where there are labels, per
cluster its most confident members and a random sample of the rest, nearest neighbours when
`scp_dist.search` is there, the stage times and the config.

Scale: the work is bounded by the caps below, not by the data: the index page shows the
`top_clusters` largest clusters, each with `confident` + `random` thumbnails; every cluster (in size
order) is on a cluster page of `clusters_per_page`, with `page_confident` + `page_random` thumbnails;
the t-SNE map uses at most `MAP_POINTS` rows, gathered by the evaluation (never every feature on one
rank). Only the assignments CSV is read whole (one pass, a few seconds at a million rows).

jinja2, matplotlib and scikit-learn are imported inside the functions that need them: the training
job imports this module for the evaluation's feature sample even where the `report` extra is absent.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from scp_dist import distributed as D
from scp_dist.errors import UserError
from scp_dist.fileio import atomic_write, atomic_write_text

log = logging.getLogger("scp_dist")

REPORT_DIR = "report"
SAMPLE_FILE = "features_sample.npz"
# t-SNE's cost grows faster than linearly; a few thousand points show the structure of 1,000 clusters
# and take seconds on two cores (docs/USING.md, "Report", for the measured time).
MAP_POINTS = 1000  # t-SNE on 1,000 points: about 10 s on one loaded CPU thread (1,500: 21 s)
# A search index is built on the way only up to here (see _neighbour_rows); past it, only a run's
# existing <run>/search/ index is used.
SEARCH_BUILD_MAX_ROWS = 50_000
THUMB_PX = 64  # longest side of a thumbnail; the page shows them at this size
TEMPLATES = Path(__file__).resolve().parent / "templates"
_MIN_DEPS = ("jinja2", "matplotlib", "sklearn")


# ---------------------------------------------------------------- the evaluation's feature sample


def gather_feature_sample(cfg: DictConfig, st: D.DistState, local: np.ndarray | None,
                          max_points: int = MAP_POINTS) -> tuple[np.ndarray, np.ndarray] | None:
    """A seeded uniform sample of at most `max_points` rows of the training split's frozen features,
    drawn like evaluate.kmeans_baseline's sample: rank 0 draws row positions (rows of the gathered
    predictions, i.e. of assignments_<train>.csv) and only those rows travel. Collective: every rank
    calls it with its own evaluation range's features (`local`, in canonical order). Returns
    (rows, features) on rank 0, None on the others."""
    local = np.zeros((0, 1), np.float32) if local is None else local
    # Its own seed stream: the k-means sample is drawn from train.seed alone and must not change.
    _, rows, parts = D.gather_sample(local, max_points, [cfg.train.seed, 0x5E9], st)
    if parts is None:
        return None
    parts = [p for p in parts if len(p)]
    if not parts:
        return None
    return rows, np.concatenate(parts).astype(np.float32)


def save_feature_sample(run: Path, split_dir: Path, rows: np.ndarray, features: np.ndarray, keys: Sequence[str],
                        clusters: np.ndarray, confidence: np.ndarray, labels: np.ndarray) -> Path:
    """`<run>/report/features_sample.npz`: the sampled rows' position in assignments_<train>.csv,
    canonical sample index, key, reported cluster, its probability, label and frozen features
    (fp16, like the feature cache). `keys`, `clusters`, `confidence` and `labels` are the whole
    split's, in assignment-row order; `features` are the sampled rows' only."""
    keys_s = [keys[i] for i in rows]
    index = canonical_indices(split_dir, keys, rows)
    path = run / REPORT_DIR / SAMPLE_FILE
    atomic_write(path, lambda f: np.savez(
        f, rows=rows.astype(np.int64), indices=index, keys=np.asarray(keys_s, dtype=str),
        clusters=np.asarray(clusters)[rows].astype(np.int64), confidence=np.asarray(confidence)[rows].astype(np.float32),
        labels=np.asarray(labels)[rows].astype(np.int64), features=features.astype(np.float16)))
    return path


def canonical_indices(split_dir: Path, keys: Sequence[str], rows: np.ndarray) -> np.ndarray:
    """Global sample index (canonical shard order) of the given assignment rows. Predictions are in
    canonical order with unreadable samples left out, so when none was left out row == index;
    otherwise the keys are looked up in the shards' index files (one pass over them)."""
    from scp_dist.shards.manifest import read_manifest

    rows = np.asarray(rows, dtype=np.int64)
    manifest = read_manifest(split_dir, check_files=False)
    if len(keys) == manifest.num_samples:
        return rows.copy()
    where = key_index(split_dir)
    return np.array([where.get(keys[r], -1) for r in rows], dtype=np.int64)


def key_index(split_dir: Path) -> dict[str, int]:
    """key -> global sample index over a split's shards (a shard that cannot be read contributes
    nothing: its samples cannot be in the assignments either)."""
    from scp_dist.data.reader import load_index
    from scp_dist.shards.format import index_path, parse_index
    from scp_dist.shards.manifest import read_manifest

    manifest = read_manifest(split_dir, check_files=False)
    out: dict[str, int] = {}
    offset = 0
    for path, info in zip(manifest.shard_paths(), manifest.shards, strict=True):
        try:
            entries = parse_index(load_index(path, path.stat()), index_path(path))
        except (OSError, ValueError) as e:
            log.debug("report: %s unreadable (%s)", path, e)
            entries = []
        for i, e in enumerate(entries):
            out[e.key] = offset + i
        offset += info.num_samples
    return out


# ---------------------------------------------------------------- reading a run


@dataclass
class Assignments:
    keys: list[str]
    cluster: np.ndarray  # (n,) int
    probability: np.ndarray  # (n,) float
    label: np.ndarray  # (n,) int, -1 unlabeled


def read_assignments(path: Path) -> Assignments:
    keys, cl, pr, lb = [], [], [], []
    with open(path, newline="") as f:
        r = csv.reader(f)
        header = next(r)
        if header[:4] != ["key", "cluster", "probability", "label"]:
            raise ValueError(f"{path}: not an assignments file (header {header})")
        for row in r:
            keys.append(row[0])
            cl.append(row[1])
            pr.append(row[2])
            lb.append(row[3])
    return Assignments(keys, np.asarray(cl, dtype=np.int64), np.asarray(pr, dtype=np.float64),
                       np.asarray(lb, dtype=np.int64))


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's records; a torn last line (a killed job) is left out."""
    out = []
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def step_records(records: list[dict]) -> list[dict]:
    """The `step` records, the last one per step, by step. A resume repeats the steps logged after
    its checkpoint (the `resume` marker in train.fit): the later record is the one that counts."""
    by_step: dict[int, dict] = {}
    for r in records:
        if r.get("kind") == "step":
            by_step[int(r["step"])] = r
    return [by_step[s] for s in sorted(by_step)]


# ---------------------------------------------------------------- images


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def thumbnail(image: bytes, size: int = THUMB_PX) -> tuple[str, bool]:
    """Encoded image -> (data URI of a thumbnail of at most `size` px, whether it is smaller than
    the display size and should be drawn pixelated). Small images stay PNG (exact pixels, a few
    hundred bytes); larger ones become JPEG (a tenth of PNG's size for photos)."""
    from PIL import Image

    im = Image.open(io.BytesIO(image))
    im.draft("RGB", (size, size))  # JPEG: decode at reduced scale (DCT scaling), far cheaper than full size
    im = im.convert("RGB")
    small = max(im.size) < size
    im.thumbnail((size, size))
    buf = io.BytesIO()
    if max(im.size) <= 32:
        im.save(buf, format="PNG")
        return data_uri(buf.getvalue(), "image/png"), small
    im.save(buf, format="JPEG", quality=80)
    return data_uri(buf.getvalue(), "image/jpeg"), small


class Thumbs:
    """Thumbnails by global sample index, read through the project's reader, each made once."""

    def __init__(self, split_dir: Path, size: int = THUMB_PX) -> None:
        from scp_dist.data.reader import SampleReader
        from scp_dist.shards.manifest import read_manifest

        self.reader = SampleReader(read_manifest(split_dir))
        self.size = size
        self._cache: dict[int, dict | None] = {}
        self.seconds = 0.0

    def get(self, index: int, key: str | None = None) -> dict | None:
        """{"src", "pixelated", "key"} or None when the sample cannot be read."""
        if index < 0:
            return None
        if index not in self._cache:
            t0 = time.perf_counter()
            raw = self.reader.read(int(index))
            item = None
            if raw.error is None and raw.image is not None and (key is None or raw.key == key):
                try:
                    src, small = thumbnail(raw.image, self.size)
                    item = {"src": src, "pixelated": small, "key": raw.key}
                except Exception as e:  # noqa: BLE001 - a sample PIL cannot decode: shown as unreadable
                    log.debug("report: sample %d (%s) not decodable: %s", index, raw.key, e)
            self._cache[index] = item
            self.seconds += time.perf_counter() - t0
        return self._cache[index]


# ---------------------------------------------------------------- figures


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def curves_figure(steps: list[dict]) -> bytes | None:
    """One panel per logged quantity of the step records (each loss term, lr, images/s) over steps."""
    import matplotlib.pyplot as plt

    if not steps:
        return None
    names = [k for k in steps[-1] if k not in ("kind", "step", "epoch", "time")
             and isinstance(steps[-1][k], (int, float))]
    if not names:
        return None
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    x = [r["step"] for r in steps]
    for ax, name in zip(axes.flat, names, strict=False):
        ax.plot(x, [r.get(name, np.nan) for r in steps], lw=1.2, marker="." if len(x) < 50 else None)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def _cluster_colours(c: np.ndarray, k: int) -> np.ndarray:
    import matplotlib

    cmap = matplotlib.colormaps["tab20" if k > 10 else "tab10"]
    # Many clusters: a cyclic palette scrambled by a fixed permutation, so neighbouring ids differ.
    perm = np.random.default_rng(0).permutation(max(k, 1))
    return cmap((perm[c] % cmap.N) / max(cmap.N - 1, 1))


def map_figure(xy: np.ndarray, clusters: np.ndarray, labels: np.ndarray, k: int,
               class_names: list[str] | None) -> bytes:
    """The 2-D map coloured by cluster, and beside it by class where the sample has labels."""
    import matplotlib.pyplot as plt

    labelled = (labels >= 0).any()
    fig, axes = plt.subplots(1, 2 if labelled else 1, figsize=(12 if labelled else 6.5, 5.5), squeeze=False)
    s = 6 if len(xy) > 1000 else 12
    ax = axes[0, 0]
    ax.scatter(xy[:, 0], xy[:, 1], c=_cluster_colours(clusters, k), s=s, linewidths=0)
    ax.set_title(f"by cluster ({len(xy)} sampled images, K={k})", fontsize=10)
    if labelled:
        ax2 = axes[0, 1]
        keep = labels >= 0
        c = int(labels.max()) + 1
        sc = ax2.scatter(xy[keep, 0], xy[keep, 1], c=_cluster_colours(labels[keep], c), s=s, linewidths=0)
        del sc
        ax2.set_title("by class (labels)", fontsize=10)
        if c <= 20:
            for y in range(c):
                pts = xy[keep][labels[keep] == y]
                if len(pts):
                    name = class_names[y] if class_names and y < len(class_names) else str(y)
                    ax2.annotate(name, pts.mean(0), fontsize=9, weight="bold", ha="center",
                                 bbox={"boxstyle": "round,pad=0.15", "fc": "white", "alpha": 0.7, "lw": 0})
    for a in axes.flat:
        a.set_xticks([])
        a.set_yticks([])
    fig.tight_layout()
    return _png(fig)


def sizes_figure(sizes: np.ndarray) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 2.6))
    ordered = np.sort(sizes)[::-1]
    # A filled step, not bars: a thousand bar patches take seconds to draw.
    ax.fill_between(np.arange(len(ordered) + 1), np.append(ordered, ordered[-1:]), step="post", color="#4c72b0")
    ax.set_xlim(0, len(ordered))
    ax.set_xlabel("cluster, by size", fontsize=8)
    ax.set_ylabel("images", fontsize=8)
    ax.axhline(sizes.sum() / max(len(sizes), 1), color="k", lw=0.8, ls="--", label="uniform")
    ax.legend(fontsize=8)
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    return _png(fig)


def hungarian(label: np.ndarray, cluster: np.ndarray, num_classes: int, k: int) -> dict:
    """The class x cluster table over labelled samples and the one-to-one class -> cluster match that
    maximises the agreement (the ACC of metrics.cluster_acc)."""
    from scipy.optimize import linear_sum_assignment

    keep = label >= 0
    c = max(num_classes, int(label[keep].max()) + 1 if keep.any() else 0)
    table = np.zeros((c, k), dtype=np.int64)
    np.add.at(table, (label[keep], cluster[keep]), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    match = np.full(c, -1, dtype=np.int64)
    match[rows] = cols
    return {"table": table, "match": match, "acc": float(table[rows, cols].sum() / max(table.sum(), 1))}


def confusion_figure(table: np.ndarray, match: np.ndarray, class_names: list[str]) -> bytes:
    """Rows: classes; columns: the matched cluster of each class in class order, then the unmatched
    clusters by size; row-normalised, so the diagonal is each class's accuracy."""
    import matplotlib.pyplot as plt

    c, k = table.shape
    big = max(c, k) > 30
    matched = [int(m) for m in match if m >= 0]
    taken = set(matched)
    rest = [int(j) for j in np.argsort(-table.sum(0), kind="stable") if j not in taken]
    # Many clusters: only the matched ones (a C x C square whose diagonal shows), else every cluster.
    order = matched if big else matched + rest
    t = table[:, order].astype(np.float64) / np.maximum(table.sum(1, keepdims=True), 1)
    w = 6.5 if big else min(1.2 + 0.55 * len(order), 14)
    fig, ax = plt.subplots(figsize=(w, 6.0 if big else min(1.2 + 0.5 * c, 10)))
    im = ax.imshow(t, cmap="Blues", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.04, label="share of the class")
    if not big:
        ax.set_yticks(range(c), class_names[:c], fontsize=8)
        ax.set_xticks(range(len(order)), [str(j) for j in order], fontsize=8, rotation=90)
        for i in range(c):
            for j in range(len(order)):
                if table[i, order[j]]:
                    ax.text(j, i, str(table[i, order[j]]), ha="center", va="center", fontsize=7,
                            color="white" if t[i, j] > 0.5 else "black")
    ax.set_xlabel("matched cluster of each class (unmatched clusters not shown)" if big and rest else
                  "cluster (matched to the row's class first)", fontsize=9)
    ax.set_ylabel("class", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def tsne_map(features: np.ndarray, seed: int) -> np.ndarray:
    """t-SNE of the sampled features, after PCA to 50 dimensions (the usual denoising step, and
    t-SNE's neighbour search is cheaper there)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = features.astype(np.float32)
    if x.shape[1] > 50 and len(x) > 50:
        x = PCA(50, random_state=seed).fit_transform(x)
    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
    # 500 iterations (sklearn: 1000): the map settles well before, at half the time.
    return TSNE(2, perplexity=perplexity, init="pca", learning_rate="auto", max_iter=500,
                random_state=seed).fit_transform(x)


# ---------------------------------------------------------------- the page


@dataclass
class ReportResult:
    path: Path  # index.html
    pages: list[Path]  # every HTML file written (index first)
    figures: dict[str, bytes]  # name -> PNG (TensorBoard's copy, train.evaluate)
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def missing_dependencies() -> list[str]:
    import importlib.util

    return [m for m in _MIN_DEPS if importlib.util.find_spec(m) is None]


def _cluster_members(a: Assignments, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows grouped by cluster, most confident first, as (order, start, size) per cluster."""
    order = np.lexsort((-a.probability, a.cluster))
    sizes = np.bincount(a.cluster, minlength=k)[:k]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return order, starts, sizes


def _pick(order: np.ndarray, start: int, size: int, confident: int, random: int, seed: int,
          c: int) -> tuple[np.ndarray, np.ndarray]:
    members = order[start:start + size]
    top = members[:confident]
    rest = members[confident:]
    if len(rest) > random:
        rest = np.sort(np.random.default_rng([seed, c]).choice(rest, random, replace=False))
    return top, rest


def write_report(run: Path, *, cfg: DictConfig | None = None, data_root: str | None = None,
                 top_clusters: int = 40, confident: int = 8, random: int = 8, clusters_per_page: int = 100,
                 page_confident: int = 5, page_random: int = 5, search_queries: int = 4, search_k: int = 6,
                 thumb_px: int = THUMB_PX, feature_map: bool = True, search: str = "auto") -> ReportResult:
    """Write `<run>/report/index.html` (and `clusters-NNN.html` beside it) from the run's files:
    config.yaml, eval.json, metrics.jsonl, assignments_<split>.csv, report/features_sample.npz (if
    any), the training split's shards (data.root, or `data_root`)."""
    import jinja2

    from scp_dist.config import load_config
    from scp_dist.shards.manifest import read_manifest

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    notes: list[str] = []
    run = Path(run)
    out = run / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    if cfg is None:
        cfg = load_config(run / "config.yaml", [f"data.root={data_root}"] if data_root else None)
    root = Path(data_root or cfg.data.root)
    train_split = cfg.data.train_split
    k = int(cfg.head.num_clusters)
    seed = int(cfg.train.seed)

    t0 = time.perf_counter()
    ev = json.loads((run / "eval.json").read_text()) if (run / "eval.json").is_file() else {}
    records = read_metrics(run / "metrics.jsonl")
    assignments: dict[str, Assignments] = {}
    for split in ev.get("splits", {}) or [train_split]:
        path = run / f"assignments_{split}.csv"
        if path.is_file():
            assignments[split] = read_assignments(path)
    timings["read_run_files"] = time.perf_counter() - t0
    if train_split not in assignments:
        raise FileNotFoundError(f"{run}/assignments_{train_split}.csv: the report needs the assignments "
                                "(output.save_assignments=true)")
    a = assignments[train_split]
    split_dir = root / train_split
    manifest = read_manifest(split_dir, check_files=False)
    class_names = list(manifest.classes or [])

    figures: dict[str, bytes] = {}
    # Training curves: the last record per step.
    t0 = time.perf_counter()
    steps = step_records(records)
    png = curves_figure(steps)
    if png:
        figures["training_curves"] = png
    timings["curves"] = time.perf_counter() - t0

    # Cluster sizes and members.
    t0 = time.perf_counter()
    order, starts, sizes = _cluster_members(a, k)
    rank = np.argsort(-sizes, kind="stable")  # clusters by size, largest first
    position = np.empty(k, dtype=np.int64)
    position[rank] = np.arange(k)
    figures["cluster_sizes"] = sizes_figure(sizes)
    index_of_row = _row_index(split_dir, a, manifest.num_samples)
    labelled_train = (a.label >= 0).any()
    timings["clusters"] = time.perf_counter() - t0

    # Labels: confusion after Hungarian matching and per-class accuracy, per labelled split.
    t0 = time.perf_counter()
    label_sections = []
    for split, sa in assignments.items():
        if not (sa.label >= 0).any():
            continue
        h = hungarian(sa.label, sa.cluster, len(class_names), k)
        names = class_names + [str(i) for i in range(len(class_names), len(h["table"]))]
        figures[f"confusion_{split}"] = confusion_figure(h["table"], h["match"], names)
        per_class = []
        for y, m in enumerate(h["match"]):
            n_y = int(h["table"][y].sum())
            hit = int(h["table"][y, m]) if m >= 0 else 0
            per_class.append({"name": names[y], "n": n_y, "cluster": int(m), "correct": hit,
                              "acc": hit / n_y if n_y else float("nan")})
        label_sections.append({"split": split, "acc": h["acc"], "figure": f"confusion_{split}",
                               "per_class": per_class,
                               "eval_acc": ev.get("splits", {}).get(split, {}).get("scores", {}).get("acc")})
    timings["labels"] = time.perf_counter() - t0

    # The map: the evaluation's seeded sample of frozen features.
    t0 = time.perf_counter()
    map_info = None
    sample_path = out / SAMPLE_FILE
    if not feature_map:
        notes.append("feature map left out (asked for)")
    elif sample_path.is_file():
        with np.load(sample_path) as z:
            feats, s_clusters, s_labels = z["features"], z["clusters"], z["labels"]
        if len(feats) >= 5:
            xy = tsne_map(feats, seed)
            figures["feature_map"] = map_figure(xy, s_clusters, s_labels, k, class_names)
            map_info = {"n": len(feats), "dim": int(feats.shape[1])}
        else:
            notes.append(f"feature map left out: only {len(feats)} sampled rows")
    else:
        notes.append(f"feature map left out: no {REPORT_DIR}/{SAMPLE_FILE} in the run (it is written by the "
                     "evaluation when output.report=true)")
    timings["tsne_map"] = time.perf_counter() - t0

    # Galleries.
    t0 = time.perf_counter()
    thumbs = Thumbs(split_dir, thumb_px)

    def cluster_entry(c: int, n_conf: int, n_rand: int) -> dict:
        top, rest = _pick(order, int(starts[c]), int(sizes[c]), n_conf, n_rand, seed, c)
        entry = {"id": c, "size": int(sizes[c]), "page": _page_name(int(position[c]) // clusters_per_page),
                 "confident": [_thumb(thumbs, a, index_of_row, r) for r in top],
                 "random": [_thumb(thumbs, a, index_of_row, r) for r in rest],
                 "mean_prob": float(a.probability[order[starts[c]:starts[c] + sizes[c]]].mean()) if sizes[c] else None}
        if labelled_train and sizes[c]:
            lab = a.label[order[starts[c]:starts[c] + sizes[c]]]
            lab = lab[lab >= 0]
            if len(lab):
                counts = np.bincount(lab)
                y = int(counts.argmax())
                entry["majority"] = class_names[y] if y < len(class_names) else str(y)
                entry["purity"] = float(counts[y] / len(lab))
        return entry

    top = [cluster_entry(int(c), confident, random) for c in rank[:top_clusters] if sizes[c] > 0]
    num_pages = max(1, math.ceil(k / clusters_per_page))
    pages_meta = [{"name": _page_name(p), "first": p * clusters_per_page + 1,
                   "last": min(k, (p + 1) * clusters_per_page)} for p in range(num_pages)]
    cluster_pages = []
    for p in range(num_pages):
        ids = rank[p * clusters_per_page:(p + 1) * clusters_per_page]
        cluster_pages.append([cluster_entry(int(c), page_confident, page_random) for c in ids])
    timings["thumbnails"] = time.perf_counter() - t0
    timings["thumbnail_reads"] = thumbs.seconds

    # Nearest neighbours, from the search module another part of the project provides.
    t0 = time.perf_counter()
    neighbours, search_note = _neighbour_rows(run, thumbs, a, index_of_row, order, starts, rank, sizes,
                                              search_queries, search_k, search)
    if search_note:
        notes.append(search_note)
    timings["neighbours"] = time.perf_counter() - t0

    stages = [r for r in records if r.get("kind") == "stage"]
    scores = []
    for split, entry in (ev.get("splits") or {}).items():
        scores.append({"split": split, "n": entry.get("num_samples"), "scp": entry.get("scores", {}),
                       "kmeans": entry.get("kmeans"), "heads": entry.get("acc_over_heads")})
    config_text = (run / "config.yaml").read_text() if (run / "config.yaml").is_file() else ""
    empty = int((sizes == 0).sum())

    t0 = time.perf_counter()
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["pct"] = lambda v: "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"
    common = {"run": run.resolve().name, "run_path": str(run.resolve()), "data_root": str(root),
              "train_split": train_split, "k": k, "num_samples": len(a.keys), "pages": pages_meta,
              "thumb_px": thumb_px, "generated": time.strftime("%Y-%m-%d %H:%M:%S")}
    fig_uris = {name: data_uri(png, "image/png") for name, png in figures.items()}
    written = []
    index_html = env.get_template("report_index.html").render(
        **common, figures=fig_uris, scores=scores, ev=ev, chosen=ev.get("chosen_head"), select=ev.get("select"),
        steps=len(steps), top=top, top_clusters=top_clusters, confident=confident, random=random,
        sizes={"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max()), "empty": empty},
        all_clusters=[{"id": int(c), "size": int(sizes[c]), "page": _page_name(i // clusters_per_page)}
                      for i, c in enumerate(rank)],
        map_info=map_info, map_points=MAP_POINTS, labels=label_sections, neighbours=neighbours, stages=stages,
        config_text=config_text, notes=notes)
    atomic_write_text(out / "index.html", index_html)
    written.append(out / "index.html")
    for p, entries in enumerate(cluster_pages):
        html = env.get_template("report_clusters.html").render(
            **common, page=pages_meta[p], clusters=entries, confident=page_confident, random=page_random,
            prev=pages_meta[p - 1]["name"] if p else None,
            next=pages_meta[p + 1]["name"] if p + 1 < num_pages else None)
        atomic_write_text(out / f"{_page_name(p)}", html)
        written.append(out / _page_name(p))
    for stale in out.glob("clusters-*.html"):  # a rerun with fewer pages (other clusters_per_page)
        if stale not in written:
            stale.unlink()
    timings["render"] = time.perf_counter() - t0
    seconds = time.perf_counter() - t_start
    log.info("report: %s (%d pages, %.1f s: %s)", out / "index.html", len(written), seconds,
             ", ".join(f"{n} {v:.1f}" for n, v in timings.items()))
    return ReportResult(out / "index.html", written, figures, seconds, timings, notes)


def _page_name(p: int) -> str:
    return f"clusters-{p + 1:03d}.html"


def _row_index(split_dir: Path, a: Assignments, num_samples: int) -> Callable[[int], int]:
    """Assignment row -> global sample index (row itself when no sample was left out)."""
    if len(a.keys) == num_samples:
        return lambda r: int(r)
    where = key_index(split_dir)
    return lambda r: where.get(a.keys[r], -1)


def _thumb(thumbs: Thumbs, a: Assignments, index_of_row: Callable[[int], int], r: int) -> dict:
    t = thumbs.get(index_of_row(int(r)), a.keys[r])
    return {"key": a.keys[r], "prob": float(a.probability[r]), "label": int(a.label[r]),
            "src": t["src"] if t else None, "pixelated": bool(t and t["pixelated"])}


def _neighbour_rows(run: Path, thumbs: Thumbs, a: Assignments, index_of_row: Callable[[int], int],
                    order: np.ndarray, starts: np.ndarray, rank: np.ndarray, sizes: np.ndarray, queries: int,
                    k: int, search: str) -> tuple[list[dict], str | None]:
    """A few query rows: the most confident image of each of the largest clusters and its k nearest
    training images by scp_dist.search.training_neighbours (rows and neighbours are rows of
    assignments_<train>.csv, as that module counts them). Left out, with a note, where that module
    is not there or fails: the report must not fail for it. search="auto" uses the run's index when
    <run>/search/ holds one, and builds one only for a split of at most SEARCH_BUILD_MAX_ROWS rows:
    in streaming mode building it runs the backbone over the whole split again."""
    if queries <= 0 or search == "off":
        return [], None
    built = (run / "search").is_dir()
    if search == "auto" and not built and len(a.keys) > SEARCH_BUILD_MAX_ROWS:
        return [], (f"nearest neighbours left out: the run has no search index and building one for {len(a.keys)} "
                    "images is not done on the way (python -m scp_dist.search builds it; then rerun "
                    "python -m scp_dist.report, or pass --search build)")
    try:
        from scp_dist.search import training_neighbours
    except Exception as e:  # noqa: BLE001 - any import problem of an optional part: noted, not raised
        return [], f"nearest neighbours left out: scp_dist.search is not available ({type(e).__name__}: {e})"
    q_rows = [int(order[starts[c]]) for c in rank[:queries] if sizes[c] > 0]
    try:
        idx, sim = training_neighbours(run, q_rows, k)
    except Exception as e:  # noqa: BLE001 - any failure of the optional part
        return [], f"nearest neighbours left out: scp_dist.search.training_neighbours failed ({type(e).__name__}: {e})"
    idx, sim = np.asarray(idx), np.asarray(sim)
    rows = []
    for qi, r in enumerate(q_rows):
        nbrs = []
        for j in range(idx.shape[1] if idx.ndim == 2 else 0):
            n = int(idx[qi, j])
            if not 0 <= n < len(a.keys):  # fewer than k found: -1
                continue
            t = _thumb(thumbs, a, index_of_row, n)
            nbrs.append({**t, "sim": float(sim[qi, j]), "self": n == r, "cluster": int(a.cluster[n])})
        rows.append({"query": _thumb(thumbs, a, index_of_row, r), "cluster": int(a.cluster[r]), "neighbours": nbrs})
    return rows, None


# ---------------------------------------------------------------- end of a training run


def report_after_run(cfg: DictConfig, out_dir: Path, preds: dict, results: dict,
                     sample: tuple[np.ndarray, np.ndarray] | None) -> ReportResult | None:
    """Rank 0, after eval.json: save the feature sample, then write the page. A report that fails
    (a missing extra, a moved data set) is a warning naming the command that retries it, never a
    failed run: the run's results are already on disk."""
    missing = missing_dependencies()
    if missing:
        log.warning("no report: %s not installed (pip install 'scp_dist[report]'; then python -m scp_dist.report "
                    "--run %s)", ", ".join(missing), out_dir)
        return None
    if not cfg.output.save_assignments:
        log.info("no report: it reads the assignments, and output.save_assignments=false")
        return None
    try:
        if sample is not None:
            train = preds[cfg.data.train_split]
            chosen = int(results["chosen_head"])
            save_feature_sample(out_dir, Path(cfg.data.root) / cfg.data.train_split, sample[0], sample[1], train.keys,
                                train.clusters[chosen], train.confidence[chosen], train.labels)
        return write_report(out_dir, cfg=cfg)
    except Exception as e:  # noqa: BLE001 - see the docstring
        log.warning("report failed (%s: %s); the run's results are written. Retry with: python -m scp_dist.report "
                    "--run %s", type(e).__name__, e, out_dir, exc_info=log.isEnabledFor(logging.DEBUG))
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the run directory (holds config.yaml, eval.json, assignments)")
    p.add_argument("--data-root", default=None, help="the data set's folder, when not the run's data.root")
    p.add_argument("--top-clusters", type=int, default=40, help="largest clusters shown on the first page")
    p.add_argument("--thumbs", type=int, default=8,
                   help="first page: most confident and random members per cluster (each)")
    p.add_argument("--clusters-per-page", type=int, default=100)
    p.add_argument("--page-thumbs", type=int, default=5,
                   help="cluster pages: most confident and random members per cluster (each)")
    p.add_argument("--no-map", action="store_true", help="leave out the t-SNE map (the slowest part)")
    p.add_argument("--search", choices=("auto", "build", "off"), default="auto",
                   help=f"nearest neighbours: auto = the run's search index, built here only up to "
                        f"{SEARCH_BUILD_MAX_ROWS} images; build = always; off")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    missing = missing_dependencies()
    if missing:
        print(f"error: {', '.join(missing)} not installed: pip install 'scp_dist[report]'", file=sys.stderr)
        return 2
    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        print(f"error: {run} is not a run directory (no config.yaml)", file=sys.stderr)
        return 2
    try:
        res = write_report(run, data_root=args.data_root, top_clusters=args.top_clusters, confident=args.thumbs,
                           random=args.thumbs, clusters_per_page=args.clusters_per_page,
                           page_confident=args.page_thumbs, page_random=args.page_thumbs,
                           feature_map=not args.no_map, search=args.search)
    except (FileNotFoundError, ValueError, UserError) as e:  # a moved data set, a run without assignments
        print(f"error: {e}", file=sys.stderr)
        return 2
    for n in res.notes:
        print(f"note: {n}")
    print(f"report: {res.path} ({len(res.pages)} pages, {res.seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
