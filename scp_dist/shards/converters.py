"""Converters for datasets on disk in their published formats: CIFAR-10/100/20 (python pickle batches),
STL-10 (binary .bin), ImageFolder trees (ImageNet train/val, ImageNet-10, ImageNet-Dogs) and image lists.

Every converter has the signature of `sources.fashion_mnist` (`converter` gives it to a body that takes
an `Output`) and returns {split: Manifest}; `CONVERTERS` names them for the CLI. Samples are
produced lazily (`writer.LazySample`) and written in the seeded random order of `writer.shuffled(seed)`
(`seed=None`: the source's order), the same on every run, so a re-run (resume) skips the finished
shards without reading or encoding their images again.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import os
import pickle
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from scp_dist.shards.manifest import Manifest, ShardError
from scp_dist.shards.sources import encode_png, png_samples
from scp_dist.shards.writer import LazySample, Sample, write_shards

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm"}
)
IMAGEFOLDER_SPLITS = ("train", "val")
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# USTAR member names without '/' are limited to 100 bytes; leave room for ".png"/".cls".
MAX_KEY_LEN = 90
# Image lists name their classes by id; a larger id is a typo, not a class (label counts are dense).
MAX_LIST_CLASSES = 100_000

CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
STL10_SIDE = 96


def _src_dir(src: str | os.PathLike | None, what: str) -> Path:
    if not src:
        raise ShardError(f"{what}: no source path given (--src)")
    path = Path(src).expanduser()
    if not path.is_dir():
        raise ShardError(f"{what} directory {path} does not exist")
    return path


Converter = Callable[..., dict[str, Manifest]]


@dataclass(frozen=True)
class Output:
    """Where a converter writes its splits (`root/<split>`) and the shard options every converter takes."""

    root: Path
    max_count: int = 10_000
    max_bytes: int = 0
    resume: bool = True
    progress: bool = True
    seed: int | None = 0

    def write(
        self, samples: Iterator[Sample], split: str, *, source: str, classes: list[str] | None, total: int
    ) -> Manifest:
        return write_shards(
            samples,
            self.root / split,
            source=source,
            split=split,
            classes=classes,
            max_count=self.max_count,
            max_bytes=self.max_bytes,
            total=total,
            resume=self.resume,
            progress=self.progress,
            seed=self.seed,
        )


def converter(
    body: Callable[..., dict[str, Manifest]], name: str | None = None, doc: str | None = None
) -> Converter:
    """`body(src, output, **options)` behind the signature of `sources.fashion_mnist`, the one the CLI
    calls, so that signature is written once for every on-disk format."""

    def convert(
        src: str | os.PathLike | None,
        out: str | os.PathLike,
        max_count: int = 10_000,
        max_bytes: int = 0,
        resume: bool = True,
        progress: bool = True,
        seed: int | None = 0,
        **options: Any,
    ) -> dict[str, Manifest]:
        return body(src, Output(Path(out), max_count, max_bytes, resume, progress, seed), **options)

    convert.__name__ = convert.__qualname__ = name or body.__name__
    convert.__doc__ = doc or body.__doc__
    return convert


def _check_labels(labels: np.ndarray, num_classes: int, where: Path, base: int = 0) -> None:
    """All labels in 0..num_classes-1, checked before anything is written; the error names the first bad
    image by its position in `where`, with the label as the file counts it (from `base`)."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise ShardError(
            f"{where}: image {i} has label {int(labels[i]) + base}, expected {base}..{num_classes - 1 + base} "
            f"({num_classes} classes; {bad.size} bad label(s) in all)"
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


@dataclass(frozen=True)
class CifarLayout:
    """What one CIFAR converter reads from a python-version archive; the variants differ only in these."""

    source: str
    what: str
    split_files: dict[str, tuple[str, ...]]
    meta_file: str
    names_key: str
    label_key: str
    doc: str


def _cifar(src: str | os.PathLike | None, output: Output, layout: CifarLayout) -> dict[str, Manifest]:
    root = _src_dir(src, layout.what)
    meta = root / layout.meta_file
    classes = _names(_unpickle(meta), layout.names_key, meta)
    result = {}
    for split, files in layout.split_files.items():
        images, labels = _cifar_arrays([root / f for f in files], layout.label_key, len(classes))
        samples = png_samples(len(images), images.__getitem__, labels, f"{layout.source}_{split}")
        result[split] = output.write(samples, split, source=layout.source, classes=classes, total=len(images))
    return result


def _cifar_converter(layout: CifarLayout) -> Converter:
    return converter(functools.partial(_cifar, layout=layout), layout.source, layout.doc)


CIFAR100_SPLIT_FILES = {"train": ("train",), "test": ("test",)}

cifar10 = _cifar_converter(CifarLayout(
    "cifar10", "CIFAR-10 (cifar-10-batches-py)", {"train": CIFAR10_TRAIN_BATCHES, "test": ("test_batch",)},
    "batches.meta", "label_names", "labels",
    """`cifar-10-batches-py` (data_batch_1..5, test_batch, batches.meta) -> splits `train` and `test`,
    32x32 RGB stored as PNG.""",
))
cifar100 = _cifar_converter(CifarLayout(
    "cifar100", "CIFAR-100 (cifar-100-python)", CIFAR100_SPLIT_FILES,
    "meta", "fine_label_names", "fine_labels",
    """`cifar-100-python` (train, test, meta) -> splits `train` and `test` with the 100 fine labels.""",
))
cifar20 = _cifar_converter(CifarLayout(
    "cifar20", "CIFAR-100 (cifar-100-python)", CIFAR100_SPLIT_FILES,
    "meta", "coarse_label_names", "coarse_labels",
    """`cifar-100-python` with the 20 coarse (superclass) labels, as clustering papers evaluate CIFAR-100.""",
))


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


@converter
def stl10(src: str | os.PathLike | None, output: Output) -> dict[str, Manifest]:
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
            _check_labels(labels, len(classes), y_path, base=1)
            split_classes = classes
        samples = png_samples(len(images), _stl_pixels(images), labels, f"stl10_{split}")
        result[split] = output.write(samples, split, source="stl10", classes=split_classes, total=len(images))
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
        yield LazySample(_key(rel, used), label, lambda p=path: load_image_file(p))


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


def _imagefolder(
    src: str | os.PathLike | None,
    output: Output,
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
        samples = _file_samples(files)
        result[split] = output.write(samples, split, source=source, classes=classes, total=len(files))
    return result


imagefolder = converter(_imagefolder, "imagefolder")


def read_wnids(name: str) -> list[str]:
    """The shipped wnid list `scp_dist/data/wnids/<name>.txt` (one wnid per line)."""
    text = (resources.files("scp_dist") / "data" / "wnids" / f"{name}.txt").read_text()
    return [w.strip() for w in text.splitlines() if w.strip() and not w.lstrip().startswith("#")]


def _wnid_subset(name: str, doc: str) -> Converter:
    """The ImageNet subset of the shipped wnid list `name`, from an ImageNet ImageFolder tree."""

    def body(src: str | os.PathLike | None, output: Output) -> dict[str, Manifest]:
        return _imagefolder(src, output, classes_subset=read_wnids(name), source=name)

    return converter(body, name, doc)


imagenet10 = _wnid_subset(
    "imagenet10",
    """ImageNet-10 (DAC, Chang et al. 2017): the 10 classes of `wnids/imagenet10.txt` from an ImageNet
    ImageFolder tree (`src` with train/ and/or val/, or a single split's class folders).""",
)
imagenet_dogs = _wnid_subset(
    "imagenet_dogs",
    """ImageNet-Dogs (DAC, Chang et al. 2017): the 15 dog breeds of `wnids/imagenet_dogs.txt`.""",
)


def _resolve(base: Path, entry: str) -> Path:
    # normpath, not resolve(): keys should follow the listed path, not where symlinks point.
    return Path(os.path.normpath(base / Path(entry).expanduser()))


def _text_entries(list_path: Path, lines: Iterable[str]) -> Iterator[tuple[int, str, str | None]]:
    """A plain list: `path` or `path label` per line. Whether the list has labels is decided once, by its
    first entry: it has when that entry has several whitespace-separated fields and is not itself an
    existing file (paths with spaces stay readable in unlabeled lists); then every line needs a label,
    the last field."""
    labeled: bool | None = None
    first = 0
    for n, line in enumerate(lines, 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if labeled is None:
            labeled = len(entry.split()) > 1 and not _resolve(list_path.parent.absolute(), entry).is_file()
            first = n
        if not labeled:
            yield n, entry, None
            continue
        parts = entry.rsplit(None, 1)
        if len(parts) < 2:
            raise ShardError(f"{list_path}:{n}: no label after the path; line {first} has one, so every line "
                             "needs one (`path label`)")
        yield n, parts[0], parts[1]


def _table_entries(list_path: Path, f: Iterable[str], delimiter: str) -> Iterator[tuple[int, str, str | None]]:
    """A CSV/TSV: the columns named `path` and `label` when the first row is such a header, else the
    first column and no labels."""
    path_col, label_col = 0, None
    for n, row in enumerate(csv.reader(f, delimiter=delimiter), 1):
        cells = [c.strip() for c in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        names = [c.lower() for c in cells]
        if n == 1 and "path" in names:
            path_col, label_col = names.index("path"), names.index("label") if "label" in names else None
            continue
        if n == 1 and "label" in names:
            raise ShardError(f"{list_path}:1: the header names a `label` column but no `path` column")
        if path_col >= len(cells) or not cells[path_col]:
            raise ShardError(f"{list_path}:{n}: no path in column {path_col + 1}")
        label = None if label_col is None else (cells[label_col] if label_col < len(cells) else "")
        yield n, cells[path_col], label


def _list_entries(list_path: Path) -> Iterator[tuple[int, str, str | None]]:
    """(line number, path, label text or None) for each entry of a plain list, a CSV or a TSV."""
    with open(list_path, newline="") as f:
        suffix = list_path.suffix.lower()
        if suffix in (".csv", ".tsv"):
            yield from _table_entries(list_path, f, "\t" if suffix == ".tsv" else ",")
        else:
            yield from _text_entries(list_path, f)


def _parse_label(text: str, where: str) -> int:
    if not text:
        raise ShardError(f"{where}: no label (the list has a label column, so every entry needs one)")
    if not re.fullmatch(r"[+-]?\d+", text):
        raise ShardError(f"{where}: label {text!r} is not an integer (labels are class ids 0, 1, 2, ...)")
    label = int(text)
    if label < 0:
        raise ShardError(f"{where}: label {label} is negative (labels are class ids 0, 1, 2, ...)")
    if label >= MAX_LIST_CLASSES:
        raise ShardError(f"{where}: label {label} is too large (class ids must be < {MAX_LIST_CLASSES}; "
                         "number the classes 0..K-1)")
    return label


def _list_classes(labels: list[int | None]) -> list[str] | None:
    """Class names "0".."K-1" for a labeled list (K = the largest id + 1), None for an unlabeled one."""
    ids = [y for y in labels if y is not None]
    return [str(c) for c in range(max(ids) + 1)] if ids else None


@converter
def image_list(src: str | os.PathLike | None, output: Output) -> dict[str, Manifest]:
    """A list of image paths -> split `train`. Relative paths are relative to the list file; blank lines
    and '#' comments are skipped. Formats: a text file with `path` or `path label` per line; a CSV (or
    .tsv) whose header names the `path` column and optionally a `label` column (without a header: the
    first column, unlabeled). Labels are integer class ids 0..K-1; the classes are named "0".."K-1"."""
    if not src:
        raise ShardError("image list: no source path given (--src)")
    list_path = Path(src).expanduser()
    if not list_path.is_file():
        raise ShardError(f"image list {list_path} does not exist")
    base = list_path.parent.absolute()
    paths: list[Path] = []
    labels: list[int | None] = []
    seen: dict[Path, int] = {}
    # Every entry is checked before anything is written, so a bad line fails fast instead of mid-way.
    for n, entry, label in _list_entries(list_path):
        path = _resolve(base, entry)
        if not path.is_file():
            raise ShardError(f"{list_path}:{n}: listed image {entry!r} does not exist ({path})")
        if path in seen:
            raise ShardError(f"{list_path}:{n}: {entry!r} was already listed on line {seen[path]}")
        seen[path] = n
        paths.append(path)
        labels.append(None if label is None else _parse_label(label, f"{list_path}:{n}"))
    if not paths:
        raise ShardError(f"image list {list_path} lists no images")
    # Keys from the paths below the images' common folder: short, and independent of where the list lives.
    common = Path(os.path.commonpath([p.parent for p in paths]))
    files = [(p, p.relative_to(common).as_posix(), y) for p, y in zip(paths, labels, strict=True)]
    samples, classes = _file_samples(files), _list_classes(labels)
    return {"train": output.write(samples, "train", source="image_list", classes=classes, total=len(files))}


# By the names users type (`python -m scp_dist.shards <name>`), which are not always the functions' names.
CONVERTERS: dict[str, Converter] = {
    "cifar10": cifar10,
    "cifar100": cifar100,
    "cifar20": cifar20,
    "stl10": stl10,
    "imagefolder": imagefolder,
    "imagenet10": imagenet10,
    "imagenet_dogs": imagenet_dogs,
    "list": image_list,
}
