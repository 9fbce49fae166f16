"""Converters for datasets on disk in their published formats: CIFAR-10/100/20 (python pickle batches),
STL-10 (binary .bin), ImageFolder trees (ImageNet train/val, ImageNet-10, ImageNet-Dogs) and image lists.

Every converter has the signature of `sources.fashion_mnist` and returns {split: Manifest}. Samples are
produced lazily and in a fixed order, so a re-run (resume) skips the finished shards without reading or
encoding their images again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import pickle
import re
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from scp_dist.shards.manifest import Manifest, ShardError
from scp_dist.shards.sources import encode_png
from scp_dist.shards.writer import Sample, write_shards

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm"}
)
IMAGEFOLDER_SPLITS = ("train", "val")
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# USTAR member names without '/' are limited to 100 bytes; leave room for ".png"/".cls".
MAX_KEY_LEN = 90

CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
STL10_SIDE = 96


class _LazySample(Sample):
    """A Sample whose image is read/encoded only when the writer needs it: on resume the writer walks
    the skipped samples too, and loading them would re-read a whole ImageNet for nothing."""

    def __init__(self, key: str, label: int | None, load: Callable[[], tuple[bytes, str]]):
        self.key, self.label, self._load = key, label, load
        self._loaded: tuple[bytes, str] | None = None

    def _get(self) -> tuple[bytes, str]:
        if self._loaded is None:
            self._loaded = self._load()
        return self._loaded

    @property
    def image(self) -> bytes:  # type: ignore[override]
        return self._get()[0]

    @property
    def ext(self) -> str:  # type: ignore[override]
        return self._get()[1]


def _src_dir(src: str | os.PathLike | None, what: str) -> Path:
    if not src:
        raise ShardError(f"{what}: no source path given (--src)")
    path = Path(src).expanduser()
    if not path.is_dir():
        raise ShardError(f"{what} directory {path} does not exist")
    return path


def _write(
    samples: Iterator[Sample],
    out: str | os.PathLike,
    split: str,
    *,
    source: str,
    classes: list[str] | None,
    total: int,
    max_count: int,
    max_bytes: int,
    resume: bool,
    progress: bool,
) -> Manifest:
    return write_shards(
        samples,
        Path(out) / split,
        source=source,
        split=split,
        classes=classes,
        max_count=max_count,
        max_bytes=max_bytes,
        total=total,
        resume=resume,
        progress=progress,
    )


def _array_samples(
    n: int, get_pixels: Callable[[int], np.ndarray], labels: np.ndarray | None, prefix: str
) -> Iterator[Sample]:
    def loader(i: int) -> Callable[[], tuple[bytes, str]]:
        return lambda: (encode_png(get_pixels(i)), "png")

    for i in range(n):
        yield _LazySample(f"{prefix}_{i:07d}", None if labels is None else int(labels[i]), loader(i))


def _check_labels(labels: np.ndarray, num_classes: int, where: Path) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ShardError(
            f"{where}: labels span {labels.min()}..{labels.max()}, expected 0..{num_classes - 1}"
        )


# --- CIFAR ---------------------------------------------------------------------------------------------


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise ShardError(f"{path} is missing; expected the extracted CIFAR python-version archive")
    try:
        with open(path, "rb") as f:
            # Pickled by Python 2: encoding="bytes" is needed to load its numpy arrays (keys become bytes).
            d = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise ShardError(f"{path} is not a CIFAR pickle batch: {e}") from e
    if not isinstance(d, dict):
        raise ShardError(f"{path}: expected a pickled dict, got {type(d).__name__}")
    return d


def _field(d: dict, name: str, path: Path):
    # Keys are bytes in the published files; accept str keys from batches re-pickled by Python 3.
    for k in (name.encode(), name):
        if k in d:
            return d[k]
    raise ShardError(f"{path}: no {name!r} entry (has {sorted(str(k) for k in d)})")


def _names(d: dict, name: str, path: Path) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in _field(d, name, path)]


def _cifar_arrays(paths: Sequence[Path], label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for path in paths:
        d = _unpickle(path)
        data = np.asarray(_field(d, "data", path))
        lab = np.asarray(_field(d, label_key, path), dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ShardError(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
        if len(lab) != len(data):
            raise ShardError(f"{path}: {len(data)} images but {len(lab)} {label_key}")
        _check_labels(lab, num_classes, path)
        # Rows are the R, G, B planes one after another (CHW); the shards want HWC.
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(lab)
    return np.concatenate(images), np.concatenate(labels)


def _cifar(
    src: str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    source: str,
    what: str,
    split_files: dict[str, Sequence[str]],
    meta_file: str,
    names_key: str,
    label_key: str,
    max_count: int,
    max_bytes: int,
    resume: bool,
    progress: bool,
) -> dict[str, Manifest]:
    root = _src_dir(src, what)
    classes = _names(_unpickle(root / meta_file), names_key, root / meta_file)
    result = {}
    for split, files in split_files.items():
        images, labels = _cifar_arrays([root / f for f in files], label_key, len(classes))
        result[split] = _write(
            _array_samples(len(images), images.__getitem__, labels, f"{source}_{split}"),
            out,
            split,
            source=source,
            classes=classes,
            total=len(images),
            max_count=max_count,
            max_bytes=max_bytes,
            resume=resume,
            progress=progress,
        )
    return result


def cifar10(
    src: str | os.PathLike | None,
    out: str | os.PathLike,
    max_count: int = 10_000,
    max_bytes: int = 0,
    resume: bool = True,
    progress: bool = True,
) -> dict[str, Manifest]:
    """`cifar-10-batches-py` (data_batch_1..5, test_batch, batches.meta) -> splits `train` and `test`,
    32x32 RGB stored as PNG."""
    return _cifar(
        src,
        out,
        source="cifar10",
        what="CIFAR-10 (cifar-10-batches-py)",
        split_files={"train": CIFAR10_TRAIN_BATCHES, "test": ("test_batch",)},
        meta_file="batches.meta",
        names_key="label_names",
        label_key="labels",
        max_count=max_count,
        max_bytes=max_bytes,
        resume=resume,
        progress=progress,
    )


def cifar100(
    src: str | os.PathLike | None,
    out: str | os.PathLike,
    max_count: int = 10_000,
    max_bytes: int = 0,
    resume: bool = True,
    progress: bool = True,
) -> dict[str, Manifest]:
    """`cifar-100-python` (train, test, meta) -> splits `train` and `test` with the 100 fine labels."""
    return _cifar(
        src,
        out,
        source="cifar100",
        what="CIFAR-100 (cifar-100-python)",
        split_files={"train": ("train",), "test": ("test",)},
        meta_file="meta",
        names_key="fine_label_names",
        label_key="fine_labels",
        max_count=max_count,
        max_bytes=max_bytes,
        resume=resume,
        progress=progress,
    )


def cifar20(
    src: str | os.PathLike | None,
    out: str | os.PathLike,
    max_count: int = 10_000,
    max_bytes: int = 0,
    resume: bool = True,
    progress: bool = True,
) -> dict[str, Manifest]:
    """`cifar-100-python` with the 20 coarse (superclass) labels, as clustering papers evaluate CIFAR-100."""
    return _cifar(
        src,
        out,
        source="cifar20",
        what="CIFAR-100 (cifar-100-python)",
        split_files={"train": ("train",), "test": ("test",)},
        meta_file="meta",
        names_key="coarse_label_names",
        label_key="coarse_labels",
        max_count=max_count,
        max_bytes=max_bytes,
        resume=resume,
        progress=progress,
    )


# --- STL-10 --------------------------------------------------------------------------------------------


def _stl_images(path: Path) -> np.ndarray:
    if not path.is_file():
        raise ShardError(f"{path} is missing; expected the extracted stl10_binary directory")
    per_image = 3 * STL10_SIDE * STL10_SIDE
    size = path.stat().st_size
    if size == 0 or size % per_image:
        raise ShardError(f"{path}: {size} bytes is not a whole number of 3x96x96 images (truncated?)")
    # memmap: unlabeled_X.bin is 2.7 GB; pages are read as samples are encoded.
    return np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, 3, STL10_SIDE, STL10_SIDE)


def _stl_pixels(images: np.ndarray) -> Callable[[int], np.ndarray]:
    # Each channel is stored column-major, so axis 2 is x and axis 3 is y: (3, W, H) -> (H, W, 3).
    return lambda i: np.asarray(images[i]).transpose(2, 1, 0)


def stl10(
    src: str | os.PathLike | None,
    out: str | os.PathLike,
    max_count: int = 10_000,
    max_bytes: int = 0,
    resume: bool = True,
    progress: bool = True,
) -> dict[str, Manifest]:
    """`stl10_binary` -> splits `train` (5k), `test` (8k) and, when unlabeled_X.bin is present,
    `unlabeled` (100k, no labels); 96x96 RGB stored as PNG."""
    root = _src_dir(src, "STL-10 (stl10_binary)")
    names_path = root / "class_names.txt"
    if not names_path.is_file():
        raise ShardError(f"{names_path} is missing; expected the extracted stl10_binary directory")
    classes = [line.strip() for line in names_path.read_text().splitlines() if line.strip()]
    result = {}
    for split in ("train", "test", "unlabeled"):
        x_path = root / f"{split}_X.bin"
        if split == "unlabeled" and not x_path.exists():
            continue
        images = _stl_images(x_path)
        labels = split_classes = None
        if split != "unlabeled":
            y_path = root / f"{split}_y.bin"
            if not y_path.is_file():
                raise ShardError(f"{y_path} is missing; expected the extracted stl10_binary directory")
            labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1  # the files count from 1
            if len(labels) != len(images):
                raise ShardError(f"{y_path}: {len(labels)} labels for {len(images)} images in {x_path.name}")
            _check_labels(labels, len(classes), y_path)
            split_classes = classes
        result[split] = _write(
            _array_samples(len(images), _stl_pixels(images), labels, f"stl10_{split}"),
            out,
            split,
            source="stl10",
            classes=split_classes,
            total=len(images),
            max_count=max_count,
            max_bytes=max_bytes,
            resume=resume,
            progress=progress,
        )
    return result


# --- image files: ImageFolder trees and lists ----------------------------------------------------------


def load_image_file(path: Path) -> tuple[bytes, str]:
    """(encoded bytes, "jpg" | "png"): JPEG and PNG files are kept byte for byte, anything else is
    re-encoded losslessly as PNG. The codec comes from the content, not the name: ImageNet has a PNG
    named .JPEG, and the shard extension must name the real codec."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ShardError(f"cannot read image {path}: {e}") from e
    if data.startswith(JPEG_MAGIC):
        return data, "jpg"
    if data.startswith(PNG_MAGIC):
        return data, "png"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.seek(0)  # first frame of an animated GIF/WebP
            im = im.convert("RGB") if im.mode not in ("L", "RGB") else im.copy()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ShardError(f"{path} is not a readable image: {e}") from e
    return encode_png(np.asarray(im)), "png"


def _key(rel: str, used: set[str]) -> str:
    """A webdataset key from a relative path: no '.' or '/', short enough for a USTAR member name, and
    unique. On a clash (`a b.jpg` vs `a_b.jpg`, or `x.jpg` vs `x.png`) a hash of the path is appended,
    so keys are the same on every run over the same files."""
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", os.path.splitext(rel)[0]) or "_"
    digest = hashlib.sha1(rel.encode("utf-8", "surrogateescape")).hexdigest()[:10]
    hashed = f"{stem[: MAX_KEY_LEN - 11]}_{digest}"
    key = stem if len(stem) <= MAX_KEY_LEN and stem not in used else hashed
    n = 0
    while key in used:  # a clash of the hashed names too: astronomically rare, but keys must be unique
        n += 1
        key = f"{hashed[: MAX_KEY_LEN - 8]}_{n:07d}"
    used.add(key)
    return key


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()


def _class_images(class_dir: Path) -> list[Path]:
    # Recursive like torchvision's ImageFolder; sorted so every run yields the same order.
    return sorted(
        (p for p in class_dir.rglob("*") if _is_image(p)), key=lambda p: p.relative_to(class_dir).parts
    )


def _file_samples(files: Sequence[tuple[Path, str, int | None]]) -> Iterator[Sample]:
    used: set[str] = set()
    for path, rel, label in files:
        yield _LazySample(_key(rel, used), label, lambda p=path: load_image_file(p))


def _split_classes(split_dir: Path, subset: Sequence[str] | None) -> list[str]:
    if subset is None:
        classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise ShardError(f"{split_dir} has no class sub-directories (expected <split>/<class>/<image>)")
        return classes
    missing = [c for c in subset if not (split_dir / c).is_dir()]
    if missing:
        raise ShardError(
            f"{split_dir}: {len(missing)} of {len(subset)} class folders are missing: "
            f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''} "
            "(expected <split>/<class>/<image>; ImageNet val must be sorted into class folders)"
        )
    return list(subset)


def imagefolder(
    src: str | os.PathLike | None,
    out: str | os.PathLike,
    max_count: int = 10_000,
    max_bytes: int = 0,
    resume: bool = True,
    progress: bool = True,
    classes_subset: Sequence[str] | None = None,
    source: str = "imagefolder",
) -> dict[str, Manifest]:
    """A class-per-folder tree. With `train/` and/or `val/` sub-directories (the ImageNet layout, val
    sorted into class folders) each becomes a split; otherwise `src` itself is the split `train`.

    Classes are the sorted folder names, or `classes_subset` in its order (label = position). All
    splits must have the same class folders so label ids mean the same thing in every split."""
    root = _src_dir(src, source)
    if len(set(classes_subset or ())) != len(classes_subset or ()):
        raise ShardError(f"{source}: classes_subset lists a class twice")
    split_dirs = {s: root / s for s in IMAGEFOLDER_SPLITS if (root / s).is_dir()} or {"train": root}
    classes_by_split = {s: _split_classes(d, classes_subset) for s, d in split_dirs.items()}
    first, classes = next(iter(classes_by_split.items()))
    for split, cls in classes_by_split.items():
        if cls != classes:
            only = sorted(set(cls) ^ set(classes))
            raise ShardError(
                f"{root}: splits {first!r} and {split!r} have different class folders "
                f"(in one only: {', '.join(only[:10])})"
            )
    result = {}
    for split, split_dir in split_dirs.items():
        files = [
            (p, p.relative_to(split_dir).as_posix(), label)
            for label, c in enumerate(classes)
            for p in _class_images(split_dir / c)
        ]
        if not files:
            raise ShardError(
                f"{split_dir}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in its class folders"
            )
        result[split] = _write(
            _file_samples(files),
            out,
            split,
            source=source,
            classes=classes,
            total=len(files),
            max_count=max_count,
            max_bytes=max_bytes,
            resume=resume,
            progress=progress,
        )
    return result


def read_wnids(name: str) -> list[str]:
    """The shipped wnid list `scp_dist/data/wnids/<name>.txt` (one wnid per line)."""
    text = (resources.files("scp_dist") / "data" / "wnids" / f"{name}.txt").read_text()
    return [w.strip() for w in text.splitlines() if w.strip() and not w.lstrip().startswith("#")]


def imagenet10(
    src: str | os.PathLike | None,
    out: str | os.PathLike,
    max_count: int = 10_000,
    max_bytes: int = 0,
    resume: bool = True,
    progress: bool = True,
) -> dict[str, Manifest]:
    """ImageNet-10 (DAC, Chang et al. 2017): the 10 classes of `wnids/imagenet10.txt` from an ImageNet
    ImageFolder tree (`src` with train/ and/or val/, or a single split's class folders)."""
    return imagefolder(
        src,
        out,
        max_count=max_count,
        max_bytes=max_bytes,
        resume=resume,
        progress=progress,
        classes_subset=read_wnids("imagenet10"),
        source="imagenet10",
    )


def imagenet_dogs(
    src: str | os.PathLike | None,
    out: str | os.PathLike,
    max_count: int = 10_000,
    max_bytes: int = 0,
    resume: bool = True,
    progress: bool = True,
) -> dict[str, Manifest]:
    """ImageNet-Dogs (DAC, Chang et al. 2017): the 15 dog breeds of `wnids/imagenet_dogs.txt`."""
    return imagefolder(
        src,
        out,
        max_count=max_count,
        max_bytes=max_bytes,
        resume=resume,
        progress=progress,
        classes_subset=read_wnids("imagenet_dogs"),
        source="imagenet_dogs",
    )


def _list_entries(list_path: Path) -> Iterator[tuple[int, str]]:
    """(line number, path) for each entry of a plain list or a CSV (column `path`, else the first)."""
    with open(list_path, newline="") as f:
        if list_path.suffix.lower() != ".csv":
            for n, line in enumerate(f, 1):
                entry = line.strip()
                if entry and not entry.startswith("#"):
                    yield n, entry
            return
        column = 0
        for n, row in enumerate(csv.reader(f), 1):
            cells = [c.strip() for c in row]
            if not cells or not cells[0] or cells[0].startswith("#"):
                continue
            if n == 1 and "path" in (c.lower() for c in cells):
                column = [c.lower() for c in cells].index("path")
                continue
            if column >= len(cells) or not cells[column]:
                raise ShardError(f"{list_path}:{n}: no path in column {column + 1}")
            yield n, cells[column]


def image_list(
    src: str | os.PathLike | None,
    out: str | os.PathLike,
    max_count: int = 10_000,
    max_bytes: int = 0,
    resume: bool = True,
    progress: bool = True,
) -> dict[str, Manifest]:
    """A text file with one image path per line (or a CSV) -> unlabeled split `train`. Relative paths
    are relative to the list file; blank lines and '#' comments are skipped."""
    if not src:
        raise ShardError("image list: no source path given (--src)")
    list_path = Path(src).expanduser()
    if not list_path.is_file():
        raise ShardError(f"image list {list_path} does not exist")
    base = list_path.parent.absolute()
    paths: list[Path] = []
    seen: dict[Path, int] = {}
    # Every entry is checked before anything is written, so a bad line fails fast instead of mid-way.
    for n, entry in _list_entries(list_path):
        # normpath, not resolve(): keys should follow the listed path, not where symlinks point.
        path = Path(os.path.normpath(base / Path(entry).expanduser()))
        if not path.is_file():
            raise ShardError(f"{list_path}:{n}: listed image {entry!r} does not exist ({path})")
        if path in seen:
            raise ShardError(f"{list_path}:{n}: {entry!r} was already listed on line {seen[path]}")
        seen[path] = n
        paths.append(path)
    if not paths:
        raise ShardError(f"image list {list_path} lists no images")
    # Keys from the paths below the images' common folder: short, and independent of where the list lives.
    common = Path(os.path.commonpath([p.parent for p in paths]))
    files: list[tuple[Path, str, int | None]] = [(p, p.relative_to(common).as_posix(), None) for p in paths]
    return {
        "train": _write(
            _file_samples(files),
            out,
            "train",
            source="image_list",
            classes=None,
            total=len(files),
            max_count=max_count,
            max_bytes=max_bytes,
            resume=resume,
            progress=progress,
        )
    }
