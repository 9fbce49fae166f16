"""`data`: images/s of the data path alone, through the project's real train loader.

Per backend and worker count: build_train_loader on synthetic JPEG shards; the first
max(1, workers) batches (worker start-up, DALI pipeline build) are untimed warm-up, the rest of
one epoch is timed. An image is one sample, i.e. two augmented views at the output size. Backends:
- `torch`: decode + augment in the DataLoader workers (PIL + torch ops);
- `dali-cpu`: workers read bytes, DALI decodes + augments in CPU-only mode (device_id=None);
- `dali-cuda`: the same with GPU `mixed` decode and GPU augmentation (only where a GPU is present).
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench import common as C
from benchmarks.bench.synth import DEFAULT_CACHE, mean_file_kib, synthetic_dataset
from scp_dist.config import ConfigError, load_config
from scp_dist.data.loader import build_train_loader

# ImageNet statistics: any mean/std costs the same; these make the numbers look like a real run.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)

COLUMNS = [
    C.Column("backend", "backend"),
    C.Column("workers", "workers"),
    C.Column("img_per_s", "images/s", ".1f"),
    C.Column("views_per_s", "views/s", ".1f"),
    C.Column("warmup_s", "warm-up s", ".2f"),
    C.Column("timed_images", "timed images"),
]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backends", nargs="+", default=["torch", "dali"],
                   choices=["torch", "dali"],
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
    cfg = load_config(None, [
        f"data.root={root}", "data.train_split=train", "data.test_split=", "data.prepare=",
        f"data.loader={loader}", f"data.num_workers={workers}", "data.on_error=raise",
    ])
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
    C.sync(device)
    t_warm = time.perf_counter() - t0
    if tuple(first.views[0].shape[1:]) != (3, image_size, image_size):
        raise AssertionError(f"views of shape {tuple(first.views[0].shape)}, expected (n, 3, {image_size}, {image_size})")
    n_images = 0
    t1 = time.perf_counter()
    for b in it:
        n_images += len(b.keys)
    C.sync(device)
    dt = time.perf_counter() - t1
    del it, ld, first
    gc.collect()
    ips = n_images / dt
    return {"img_per_s": ips, "views_per_s": 2 * ips, "warmup_s": t_warm, "warmup_batches": skip,
            "timed_images": n_images}


def run(args: argparse.Namespace) -> C.BenchResult:
    root = synthetic_dataset(args.cache_dir, args.n, args.width, args.height, args.quality)
    notes = [f"input: {args.n} synthetic {args.width}x{args.height} JPEGs (q{args.quality}, "
             f"{mean_file_kib(root):.0f} KiB each), output 2 views x {args.image_size}px; "
             "the first max(1, workers) batches (worker start-up, pipeline build) are warm-up, untimed"]
    runs: list[tuple[str, str, torch.device]] = []
    have_dali = C.dali_importable()
    for b in args.backends:
        if b == "torch":
            runs.append(("torch", "torch", torch.device("cpu")))
            continue
        if not have_dali:
            notes.append(f"{b}: skipped, nvidia.dali does not import")
            continue
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
            C.save_partial(args, C.BenchResult("data", params, COLUMNS, list(rows), list(notes)),
                           f"{label} workers={w}")
    return C.BenchResult("data", params, COLUMNS, rows, notes)
