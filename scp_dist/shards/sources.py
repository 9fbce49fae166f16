"""Built-in sources that need no download: scikit-learn's digits and Debian's Fashion-MNIST.

Converters for datasets on disk in their published formats (CIFAR, STL-10, ImageFolder/ImageNet,
image lists) live in `converters.py`; `python -m scp_dist.shards` exposes both.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from scp_dist.shards.manifest import MANIFEST_NAME, Manifest, ShardError, read_manifest
from scp_dist.shards.writer import Sample, write_shards

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 (H, W) grey or (H, W, 3) RGB -> PNG bytes (lossless, so shards hold the exact pixels)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def array_samples(images: np.ndarray, labels: np.ndarray | None, prefix: str) -> Iterator[Sample]:
    for i, img in enumerate(images):
        yield Sample(f"{prefix}_{i:07d}", encode_png(img), "png", None if labels is None else int(labels[i]))


def _is_written(split_dir: Path) -> bool:
    return (split_dir / MANIFEST_NAME).is_file()


def prepare_digits(root: str | Path, max_count: int = 1000, progress: bool = False) -> dict[str, Manifest]:
    """scikit-learn's bundled digits (1797 real 8x8 handwritten digits, grey 0..16) as split `train`.

    The dataset has no official test split; the demo clusters all 1797 images, as clustering
    papers do for their datasets' train+test union. Already-written shards are reused."""
    from sklearn.datasets import load_digits

    split_dir = Path(root) / "train"
    if _is_written(split_dir):
        return {"train": read_manifest(split_dir)}
    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    m = write_shards(array_samples(images, d.target, "digits"), split_dir, source="sklearn.load_digits",
                     split="train", classes=[str(c) for c in d.target_names], max_count=max_count,
                     total=len(images), progress=progress)
    return {"train": m}


def read_idx(path: Path) -> np.ndarray:
    """An MNIST-style idx file (optionally gzipped): magic (2 zero bytes, dtype 0x08, ndim) + big-endian dims."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ShardError(f"{path}: not an unsigned-byte idx file (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ShardError(f"{path}: header says {dims} but holds {data.size} bytes (truncated?)")
    return data.reshape(dims)


def _find(src: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (src / name).is_file():
            return src / name
    raise ShardError(f"{src}: missing {stem}(.gz); expected the Fashion-MNIST idx files "
                     "(Debian: apt-get install dataset-fashion-mnist)")


def fashion_mnist(src: str | Path | None, out: str | Path, max_count: int = 10_000, max_bytes: int = 0,
                  resume: bool = True, progress: bool = True) -> dict[str, Manifest]:
    """Fashion-MNIST idx files (train-*, t10k-*) -> splits `train` (60k) and `test` (10k)."""
    src = Path(src) if src else FASHION_MNIST_DIR
    if not src.is_dir():
        raise ShardError(f"Fashion-MNIST directory {src} does not exist (apt-get install dataset-fashion-mnist)")
    out_m = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find(src, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find(src, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
        if len(images) != len(labels):
            raise ShardError(f"{src}: {len(images)} {prefix} images but {len(labels)} labels")
        out_m[split] = write_shards(array_samples(images, labels, f"fmnist_{split}"), Path(out) / split,
                                    source="fashion_mnist", split=split, classes=FASHION_MNIST_CLASSES,
                                    max_count=max_count, max_bytes=max_bytes, total=len(images), resume=resume,
                                    progress=progress)
    return out_m


def digits(src: str | Path | None, out: str | Path, max_count: int = 1000, max_bytes: int = 0,
           resume: bool = True, progress: bool = True) -> dict[str, Manifest]:
    del src, max_bytes, resume  # bundled with scikit-learn
    return prepare_digits(out, max_count=max_count, progress=progress)
