"""`data`: images/s of the data path alone, through the project's real train loader.

Per backend and worker count, one epoch of build_train_loader on synthetic JPEG shards; an image is
one sample, i.e. two augmented views at the output size. Backends: `torch` (decode + augment in the
DataLoader workers), `dali-cpu` (workers read bytes, DALI decodes and augments in CPU-only mode),
`dali-cuda` (the same with GPU `mixed` decode and GPU augmentation).
"""

from __future__ import annotations

import argparse
import gc
import io
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks import bench as B
from benchmarks import harness as H
from scp_dist.config import ConfigError, load_config
from scp_dist.data.loader import build_train_loader
from scp_dist.shards.manifest import MANIFEST_NAME, read_manifest
from scp_dist.shards.writer import Sample, write_shards

DEFAULT_CACHE = Path("/tmp/scp_bench_data")
NUM_CLASSES = 10
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's: any costs the same
COLUMNS = [H.Column("backend", "backend"), H.Column("workers", "workers"), H.Column("img_per_s", "images/s", ".1f"),
           H.Column("views_per_s", "views/s", ".1f"), H.Column("warmup_s", "warm-up s", ".2f"),
           H.Column("timed_images", "timed images")]


def _synthetic_jpeg(job: tuple[int, int, int, int, int]) -> Sample:
    """A random linear gradient per channel, a few soft blobs and mild noise, as a JPEG: decode cost
    depends on how compressible the content is (noise decodes much slower than a photo, a flat
    colour much faster), and these land at photo-like sizes (tens of KiB at 500x375, quality 90)."""
    i, width, height, quality, seed = job
    rng = np.random.default_rng([seed, i])
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = y / max(height - 1, 1), x / max(width - 1, 1)
    img = np.empty((height, width, 3), np.float32)
    for c in range(3):
        gx, gy = rng.uniform(-120, 120, 2)
        img[..., c] = rng.uniform(40, 215) + gx * (x - 0.5) + gy * (y - 0.5)
    for _ in range(int(rng.integers(2, 6))):
        cx, cy = rng.uniform(0, 1, 2)
        r = rng.uniform(0.05, 0.3)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r)).astype(np.float32)
        img += blob[..., None] * rng.uniform(-90, 90, 3).astype(np.float32)
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return Sample(f"synth_{i:07d}", buf.getvalue(), "jpg", i % NUM_CLASSES)


def synthetic_dataset(cache_dir: Path = DEFAULT_CACHE, n: int = 512, width: int = 500, height: int = 375,
                      quality: int = 90, seed: int = 0) -> Path:
    """A dataset root (holding split `train`) of `n` synthetic JPEGs; written on first use only."""
    root = Path(cache_dir) / f"jpeg-{width}x{height}-q{quality}-n{n}-s{seed}"
    split = root / "train"
    if (split / MANIFEST_NAME).is_file() and read_manifest(split).num_samples == n:
        return root
    jobs = [(i, width, height, quality, seed) for i in range(n)]
    # ~40 ms per 500x375 image: thousands are worth the cores. map keeps the order, which the shard
    # writer needs for reproducible shards.
    with ProcessPoolExecutor(H.usable_cores()) as pool:
        samples = pool.map(_synthetic_jpeg, jobs, chunksize=32) if n >= 256 else map(_synthetic_jpeg, jobs)
        write_shards(samples, split, source="benchmarks.bench.data", split="train",
                     classes=[str(c) for c in range(NUM_CLASSES)], max_count=256, total=n, progress=False)
    return root


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backends", nargs="+", default=["torch", "dali"], choices=["torch", "dali"],
                   help="loader backends; dali runs in CPU mode, and also on the GPU when one is present")
    p.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2], help="DataLoader workers per run")
    p.add_argument("--n", type=int, default=512, help="synthetic images (one epoch is timed)")
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--image-size", type=int, default=224, help="output side of each view")
    p.add_argument("--batch", type=int, default=64, help="global batch (one rank)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the synthetic shards are kept")
    p.add_argument("--no-cuda", action="store_true", help="skip dali-cuda even when a GPU is present")
    p.add_argument("--keep-going", action="store_true",
                   help="a backend that fails is noted in the result and the others still run")
    p.add_argument("--dali-devices", nargs="+", default=["cpu", "cuda"], choices=["cpu", "cuda"],
                   help="DALI runs in this order: cpu (CPU-only mode) and cuda (mixed nvJPEG decode + GPU "
                        "augmentation; only where a GPU is present)")


def time_loader(root: Path, loader: str, workers: int, batch: int, image_size: int,
                device: torch.device) -> dict[str, Any]:
    """One epoch through the real train loader, rate measured after the first max(1, workers)
    batches: W workers start W batches at once, so timing from the first arrival would credit the
    next W-1 batches' head start to the steady state."""
    cfg = load_config(None, [f"data.root={root}", "data.train_split=train", "data.test_split=", "data.prepare=",
                             f"data.loader={loader}", f"data.num_workers={workers}", "data.on_error=raise"])
    ld = build_train_loader(root / "train", cfg.data, cfg.augment, world_size=1, rank=0, global_batch=batch,
                            image_size=image_size, mean=_MEAN, std=_STD, seed=0, device=device)
    ld.set_epoch(0)
    skip = max(1, workers)
    if len(ld) <= skip:
        raise ValueError(f"{len(ld)} batches per epoch, need more than {skip} (warm-up): raise --n to at least "
                         f"{(skip + 1) * batch}")
    t0 = time.perf_counter()
    it = iter(ld)
    for _ in range(skip):
        first = next(it)
    B.sync(device)
    t_warm = time.perf_counter() - t0
    if tuple(first.views[0].shape[1:]) != (3, image_size, image_size):
        raise AssertionError(f"views of shape {tuple(first.views[0].shape)}, expected (n, 3, {image_size}, {image_size})")
    t1 = time.perf_counter()
    n_images = sum(len(b.keys) for b in it)
    B.sync(device)
    ips = n_images / (time.perf_counter() - t1)
    del it, ld, first
    gc.collect()
    return {"img_per_s": ips, "views_per_s": 2 * ips, "warmup_s": t_warm, "warmup_batches": skip,
            "timed_images": n_images}


def run(args: argparse.Namespace) -> B.BenchResult:
    root = synthetic_dataset(args.cache_dir, args.n, args.width, args.height, args.quality)
    kib = sum(s.bytes for s in read_manifest(root / "train").shards) / args.n / 1024
    notes = [f"input: {args.n} synthetic {args.width}x{args.height} JPEGs (q{args.quality}, {kib:.0f} KiB each), "
             f"output 2 views x {args.image_size}px; the first max(1, workers) batches (worker start-up, pipeline "
             "build) are warm-up, untimed"]
    runs: list[tuple[str, str, torch.device]] = []
    have_dali = H.dali_importable()
    for b in args.backends:
        if b == "torch":
            runs.append(("torch", "torch", torch.device("cpu")))
        elif not have_dali:
            notes.append(f"{b}: skipped, nvidia.dali does not import")
        else:
            for d in dict.fromkeys(args.dali_devices):
                if d == "cpu":
                    runs.append((f"{b}-cpu", b, torch.device("cpu")))
                elif torch.cuda.is_available() and not args.no_cuda:
                    runs.append((f"{b}-cuda", b, torch.device("cuda", 0)))
    if "dali" in args.backends and have_dali:
        notes.append("dali: the DataLoader workers only read bytes; decode + augment run in one DALI "
                     "pipeline with 2 threads in the main process")
    rows: list[dict[str, Any]] = []
    params = {"n": args.n, "size": f"{args.width}x{args.height}", "quality": args.quality,
              "image_size": args.image_size, "batch": args.batch}
    for label, loader, device in runs:
        for w in args.workers:
            try:
                res = time_loader(root, loader, w, args.batch, args.image_size, device)
            except (ConfigError, ImportError) as e:  # a backend this install or config cannot run
                notes.append(f"{label}: skipped, {e}")
                break
            except Exception as e:
                if not args.keep_going:
                    raise
                notes.append(f"{label}: FAILED, {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
                print(f"  {label}: FAILED ({type(e).__name__}: {e})", flush=True)
                break
            rows.append({"backend": label, "workers": w, **res})
            print(f"  {label:<18} workers={w}: {res['img_per_s']:.1f} images/s", flush=True)
            B.save_partial(args, B.BenchResult("data", params, COLUMNS, list(rows), list(notes)), f"{label} workers={w}")
    return B.BenchResult("data", params, COLUMNS, rows, notes)
