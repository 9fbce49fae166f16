"""Synthetic ImageNet-like JPEG shards for the data and scaling benchmarks.

Decode cost depends on the size and on how compressible the content is: pure noise is much slower
to decode than a photo, a flat colour much faster. Smooth gradients and blobs plus mild noise,
encoded at quality 90, land at photo-like file sizes (tens of KiB at 500x375). Written once with
the project's shard writer into a cache directory named after the parameters, then reused.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.bench.common import usable_cores
from scp_dist.shards.manifest import MANIFEST_NAME, read_manifest
from scp_dist.shards.writer import Sample, write_shards

DEFAULT_CACHE = Path("/tmp/scp_bench_data")
NUM_CLASSES = 10


def synthetic_image(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """uint8 (H, W, 3): a random linear gradient per channel, a few soft blobs, Gaussian noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y /= max(height - 1, 1)
    x /= max(width - 1, 1)
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
    return np.clip(img, 0, 255).astype(np.uint8)


def encode_jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _make(job: tuple[int, int, int, int, int]) -> Sample:
    i, width, height, quality, seed = job
    rng = np.random.default_rng([seed, i])
    return Sample(f"synth_{i:07d}", encode_jpeg(synthetic_image(rng, width, height), quality), "jpg", i % NUM_CLASSES)


def _samples(n: int, width: int, height: int, quality: int, seed: int, procs: int) -> Iterator[Sample]:
    jobs = ((i, width, height, quality, seed) for i in range(n))
    if procs <= 1 or n < 256:
        yield from map(_make, jobs)
        return
    # ~40 ms per 500x375 image: thousands are worth the cores. map keeps the order, which the
    # shard writer needs for resumable, reproducible shards.
    with ProcessPoolExecutor(procs) as pool:
        yield from pool.map(_make, jobs, chunksize=32)


def synthetic_dataset(cache_dir: str | Path = DEFAULT_CACHE, n: int = 512, width: int = 500, height: int = 375,
                      quality: int = 90, seed: int = 0, shard_size: int = 256) -> Path:
    """A dataset root (holding split `train`) of `n` synthetic JPEGs; written on first use only."""
    root = Path(cache_dir) / f"jpeg-{width}x{height}-q{quality}-n{n}-s{seed}"
    split = root / "train"
    if (split / MANIFEST_NAME).is_file() and read_manifest(split).num_samples == n:
        return root
    write_shards(_samples(n, width, height, quality, seed, usable_cores()), split, source="benchmarks.bench.synth", split="train",
                 classes=[str(c) for c in range(NUM_CLASSES)], max_count=shard_size, total=n, progress=False)
    return root


def mean_file_kib(root: Path) -> float:
    m = read_manifest(Path(root) / "train")
    return sum(s.bytes for s in m.shards) / max(m.num_samples, 1) / 1024
