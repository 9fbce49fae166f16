"""SYNTHETIC scale test of the report generator (scp_dist/report.py): a fabricated run with K = 1,000
clusters and N images, written as real shards (tiny 12x12 PNG tiles, one colour per cluster, so a
wrong thumbnail shows) and the run files a finished job leaves (config.yaml, assignments_train.csv,
eval.json, metrics.jsonl with a resume that repeats steps, report/features_sample.npz). Nothing here
was trained: the numbers in eval.json are made up; only the page's size and generation time mean
anything.

    python -m benchmarks.report_scale --images 1000000 --dir /tmp/report_scale   # prints the timings
    tests/test_report.py runs it at 20,000 images and opens the pages in a browser.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import time
from pathlib import Path

import numpy as np

from scp_dist import report as R
from scp_dist.config import load_config, save_config
from scp_dist.shards.sources import encode_png
from scp_dist.shards.writer import Sample, write_shards

SCHEMA_NOTE = "synthetic: fabricated run files for a scale test of the report, not a training result"


def _tile(c: int, k: int) -> bytes:
    rng = np.random.default_rng(c)
    base = rng.integers(40, 256, 3)
    px = np.clip(base + rng.integers(-30, 30, (12, 12, 3)), 0, 255).astype(np.uint8)
    px[c % 12, :] = 255 - base  # a stripe whose row encodes the id, so neighbouring ids differ
    return encode_png(px)


def fabricate_run(root: Path, n: int, k: int = 1000, classes: int = 100, seed: int = 0,
                  shard_size: int = 50_000) -> Path:
    """Shards under root/data/train and a finished-looking run in root/runs/synthetic_k<K>; returns the run."""
    rng = np.random.default_rng(seed)
    # Zipf-like cluster sizes, the tail left empty: the report must show both.
    weights = 1.0 / np.arange(1, k + 1) ** 0.8
    weights[-k // 50:] = 0
    weights /= weights.sum()
    cluster = rng.choice(k, n, p=weights)
    tiles = [_tile(c, k) for c in range(k)]
    data = root / "data"
    # Unlabeled shards (labels live in the assignments): half the bytes per sample in the tar.
    samples = (Sample(f"s{i:07d}", tiles[cluster[i]], "png") for i in range(n))
    write_shards(samples, data / "train", source="synthetic", split="train", classes=None, max_count=shard_size,
                 total=n, progress=False)
    run = root / "runs" / f"synthetic_k{k}"
    run.mkdir(parents=True, exist_ok=True)
    cfg = load_config(None, [f"data.root={data}", "data.prepare=", f"head.num_clusters={k}",
                             f"output.dir={root / 'runs'}", f"output.run_name=synthetic_k{k}"])
    save_config(cfg, run / "config.yaml")
    label = np.where(rng.random(n) < 0.7, cluster % classes, rng.integers(0, classes, n))
    prob = np.clip(rng.beta(5, 2, n), 1.0 / k, 1.0)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["key", "cluster", "probability", "label"])
    for i in range(n):
        w.writerow([f"s{i:07d}", int(cluster[i]), f"{prob[i]:.6f}", int(label[i])])
    (run / "assignments_train.csv").write_text(buf.getvalue())
    scores = {"acc": 0.5, "nmi": 0.7, "ari": 0.4, "n": n}
    (run / "eval.json").write_text(json.dumps({
        "note": SCHEMA_NOTE, "chosen_head": 0, "select": "loss", "head_losses": [-5.0], "head_agreement": None,
        "splits": {"train": {"scores": scores, "num_samples": n, "kmeans": {**scores, "acc": 0.45}}}}))
    recs = [{"kind": "start", "step": 0, "epoch": 0, "world_size": 8}]
    for s in range(1, 301):  # steps 201..250 are repeated after a resume from step 200
        recs.append({"kind": "step", "step": s, "epoch": s // 100, "lr": 1e-3 * (1 - s / 400), "img_per_s": 5000.0,
                     "loss": -5 - s / 100, "l_e": 2 - s / 300, "l_con": -3.0, "entropy": 6.5})
        if s == 250:
            recs.append({"kind": "resume", "step": 200, "epoch": 2, "world_size": 8})
    for name, sec in (("backbone", 5.0), ("features", 3600.0), ("train", 1800.0), ("predict", 300.0),
                      ("kmeans", 120.0), ("report", 20.0)):
        recs.append({"kind": "stage", "stage": name, "seconds": sec, "peak_rss_mib": 9000.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    m = min(n, R.MAP_POINTS)
    rows = np.sort(rng.choice(n, m, replace=False))
    centres = rng.normal(size=(k, 64))
    feats = centres[cluster[rows]] + 0.5 * rng.normal(size=(m, 64))
    (run / "report").mkdir(exist_ok=True)
    np.savez(run / "report" / "features_sample.npz", rows=rows, indices=rows, keys=np.array([f"s{i:07d}" for i in rows]),
             clusters=cluster[rows], confidence=prob[rows].astype(np.float32), labels=label[rows],
             features=feats.astype(np.float16))
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1_000_000)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--dir", type=Path, required=True, help="scratch folder (removed first)")
    p.add_argument("--keep", action="store_true", help="keep the shards and the run afterwards")
    args = p.parse_args(argv)
    from scp_dist.report import write_report

    shutil.rmtree(args.dir, ignore_errors=True)
    t0 = time.perf_counter()
    run = fabricate_run(args.dir, args.images, args.clusters)
    made = time.perf_counter() - t0
    res = write_report(run)
    sizes = {p.name: p.stat().st_size for p in res.pages}
    print(json.dumps({"note": SCHEMA_NOTE, "images": args.images, "clusters": args.clusters,
                      "fabricate_s": round(made, 1), "report_s": round(res.seconds, 1),
                      "timings_s": {k: round(v, 2) for k, v in res.timings.items()}, "pages": len(res.pages),
                      "index_bytes": sizes["index.html"], "largest_page_bytes": max(sizes.values())}, indent=1))
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
