"""Converters from published on-disk formats (CIFAR pickles, STL-10 .bin, ImageFolder, image lists) to shards.

Each test writes a tiny dataset in the source's exact on-disk layout and reads the shards back with
`tarfile`, so pixel-order mistakes (CHW vs HWC, STL-10's column-major planes) show up as mismatches.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scp_dist.shards import converters, sources
from scp_dist.shards.__main__ import main
from scp_dist.shards.manifest import ShardError, read_manifest

RNG = np.random.default_rng(0)


def read_split(split_dir: Path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for every sample, in manifest (canonical) order."""
    out: list[tuple[str, dict[str, bytes]]] = []
    for path in read_manifest(split_dir).shard_paths():
        with tarfile.open(path) as t:
            for m in t:
                key, _, ext = m.name.partition(".")
                if not out or out[-1][0] != key:
                    out.append((key, {}))
                out[-1][1][ext] = t.extractfile(m).read()
    return out


def by_key(samples: list[tuple[str, dict[str, bytes]]]) -> list[tuple[str, dict[str, bytes]]]:
    """Samples in key order: the source's order for keys `<prefix>_<index>` (shards are shuffled)."""
    return sorted(samples, key=lambda kv: kv[0])


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def labels_of(samples) -> list[int | None]:
    return [int(files["cls"]) if "cls" in files else None for _, files in samples]


def jpeg_bytes(seed: int, size: tuple[int, int] = (12, 10)) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def mtimes(split_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(split_dir.glob("shard-*"))}


# --- CIFAR ---------------------------------------------------------------------------------------------


def dump(path: Path, obj: dict) -> None:
    # protocol 2 and bytes keys, as in the published Python 2 pickles
    path.write_bytes(pickle.dumps(obj, protocol=2))


def cifar_images(n: int) -> np.ndarray:
    """HWC images; the batch files hold them as CHW rows."""
    return RNG.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def chw_rows(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


@pytest.fixture
def cifar10_dir(tmp_path):
    src = tmp_path / "cifar-10-batches-py"
    src.mkdir()
    names = [f"class{i}" for i in range(10)]
    dump(src / "batches.meta", {b"label_names": [n.encode() for n in names], b"num_vis": 3072})
    train_imgs, train_labels = [], []
    for b, n in enumerate([3, 2, 1, 2, 3], 1):  # a few images per batch, not 10000
        imgs, labels = cifar_images(n), RNG.integers(0, 10, n).tolist()
        dump(src / f"data_batch_{b}", {b"batch_label": b"x", b"data": chw_rows(imgs), b"labels": labels})
        train_imgs.append(imgs)
        train_labels += labels
    test_imgs, test_labels = cifar_images(4), [9, 0, 5, 5]
    dump(src / "test_batch", {b"data": chw_rows(test_imgs), b"labels": test_labels})
    want = {"train": (np.concatenate(train_imgs), train_labels), "test": (test_imgs, test_labels)}
    return src, names, want


def test_cifar10_roundtrip(cifar10_dir, tmp_path):
    src, names, want = cifar10_dir
    out = tmp_path / "out"
    ms = converters.cifar10(src, out, max_count=4, progress=False)
    assert set(ms) == {"train", "test"}
    assert [s.num_samples for s in ms["train"].shards] == [4, 4, 3]
    for split, (imgs, labels) in want.items():
        m = read_manifest(out / split)
        assert m.source == "cifar10" and m.classes == names and m.num_classes == 10
        assert m.num_samples == len(imgs)
        assert m.order == "shuffled" and m.order_seed == 0
        got = by_key(read_split(out / split))
        assert [k for k, _ in got] == [f"cifar10_{split}_{i:07d}" for i in range(len(imgs))]
        assert labels_of(got) == labels
        assert all(set(files) == {"png", "cls"} for _, files in got)
        np.testing.assert_array_equal(np.stack([pixels(f["png"]) for _, f in got]), imgs)


def test_cifar10_rerun_skips_finished_shards(cifar10_dir, tmp_path, monkeypatch):
    src, _, _ = cifar10_dir
    out = tmp_path / "out"
    first = converters.cifar10(src, out, max_count=4, progress=False)
    before = mtimes(out / "train")

    def no_encode(_):
        raise AssertionError("a finished shard's image was encoded again")

    monkeypatch.setattr(sources, "encode_png", no_encode)  # array images are encoded there
    again = converters.cifar10(src, out, max_count=4, progress=False)
    assert mtimes(out / "train") == before
    assert {s: m.to_json() for s, m in again.items()} == {s: m.to_json() for s, m in first.items()}


def test_cifar_errors(cifar10_dir, tmp_path):
    src, _, _ = cifar10_dir
    with pytest.raises(ShardError, match="does not exist"):
        converters.cifar10(tmp_path / "nowhere", tmp_path / "out", progress=False)
    (src / "data_batch_3").unlink()
    with pytest.raises(ShardError, match="data_batch_3"):
        converters.cifar10(src, tmp_path / "out", progress=False)
    dump(src / "data_batch_3", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(ShardError, match=r"data_batch_3.*\(N, 3072\)"):
        converters.cifar10(src, tmp_path / "out", progress=False)
    dump(src / "data_batch_3", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})
    with pytest.raises(ShardError, match=r"data_batch_3: image 1 has label 10, expected 0\.\.9"):
        converters.cifar10(src, tmp_path / "out", progress=False)


def test_cifar100_fine_and_cifar20_coarse(tmp_path):
    src = tmp_path / "cifar-100-python"
    src.mkdir()
    fine_names = [f"fine{i}" for i in range(100)]
    coarse_names = [f"coarse{i}" for i in range(20)]
    dump(
        src / "meta",
        {
            b"fine_label_names": [n.encode() for n in fine_names],
            b"coarse_label_names": [n.encode() for n in coarse_names],
        },
    )
    data = {}
    for split, n in (("train", 5), ("test", 3)):
        imgs = cifar_images(n)
        fine, coarse = RNG.integers(0, 100, n).tolist(), RNG.integers(0, 20, n).tolist()
        dump(src / split, {b"data": chw_rows(imgs), b"fine_labels": fine, b"coarse_labels": coarse})
        data[split] = (imgs, fine, coarse)
    fine_ms = converters.cifar100(src, tmp_path / "c100", progress=False)
    coarse_ms = converters.cifar20(src, tmp_path / "c20", progress=False)
    for split, (imgs, fine, coarse) in data.items():
        assert fine_ms[split].classes == fine_names and fine_ms[split].num_samples == len(imgs)
        assert coarse_ms[split].classes == coarse_names and coarse_ms[split].num_classes == 20
        got_fine, got_coarse = by_key(read_split(tmp_path / "c100" / split)), by_key(read_split(tmp_path / "c20" / split))
        assert labels_of(got_fine) == fine and labels_of(got_coarse) == coarse
        assert got_coarse[0][0] == f"cifar20_{split}_0000000"
        np.testing.assert_array_equal(np.stack([pixels(f["png"]) for _, f in got_fine]), imgs)


# --- STL-10 --------------------------------------------------------------------------------------------


def write_stl(src: Path, split: str, imgs: np.ndarray, labels: list[int] | None) -> None:
    # Each 96x96 plane is stored column-major: (N, H, W, C) -> (N, C, W, H), row-major bytes.
    (src / f"{split}_X.bin").write_bytes(imgs.transpose(0, 3, 2, 1).tobytes())
    if labels is not None:
        (src / f"{split}_y.bin").write_bytes(bytes(labels))


def test_stl10_column_major_and_unlabeled(tmp_path):
    src = tmp_path / "stl10_binary"
    src.mkdir()
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (src / "class_names.txt").write_text("\n".join(names) + "\n")
    want = {
        "train": (RNG.integers(0, 256, (3, 96, 96, 3), dtype=np.uint8), [1, 10, 4]),
        "test": (RNG.integers(0, 256, (2, 96, 96, 3), dtype=np.uint8), [2, 7]),
        "unlabeled": (RNG.integers(0, 256, (2, 96, 96, 3), dtype=np.uint8), None),
    }
    for split, (imgs, labels) in want.items():
        write_stl(src, split, imgs, labels)
    ms = converters.stl10(src, tmp_path / "out", max_count=2, progress=False)
    assert set(ms) == {"train", "test", "unlabeled"}
    for split, (imgs, labels) in want.items():
        got = by_key(read_split(tmp_path / "out" / split))
        assert len(got) == ms[split].num_samples == len(imgs)
        np.testing.assert_array_equal(np.stack([pixels(f["png"]) for _, f in got]), imgs)
        if labels is None:
            assert ms[split].classes is None and ms[split].num_classes == 0
            assert labels_of(got) == [None] * len(imgs)
        else:
            assert ms[split].classes == names
            assert labels_of(got) == [y - 1 for y in labels]  # the files count classes from 1


def test_stl10_without_unlabeled_and_errors(tmp_path):
    src = tmp_path / "stl10_binary"
    src.mkdir()
    (src / "class_names.txt").write_text("\n".join(f"c{i}" for i in range(10)))
    imgs = RNG.integers(0, 256, (2, 96, 96, 3), dtype=np.uint8)
    for split in ("train", "test"):
        write_stl(src, split, imgs, [1, 2])
    assert set(converters.stl10(src, tmp_path / "out", progress=False)) == {"train", "test"}
    (src / "test_y.bin").write_bytes(bytes([1, 11]))  # the files count classes 1..10
    with pytest.raises(ShardError, match=r"test_y.bin: image 1 has label 11, expected 1\.\.10"):
        converters.stl10(src, tmp_path / "out", progress=False)
    (src / "test_y.bin").write_bytes(bytes([1, 2, 3]))
    with pytest.raises(ShardError, match="test_y.bin: 3 labels for 2 images"):
        converters.stl10(src, tmp_path / "out", progress=False)
    (src / "test_X.bin").write_bytes(b"\0" * 1000)
    with pytest.raises(ShardError, match="test_X.bin.*not a whole number"):
        converters.stl10(src, tmp_path / "out", progress=False)


# --- ImageFolder / ImageNet ----------------------------------------------------------------------------


def save(path: Path, data: bytes) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def encoded(fmt: str, seed: int) -> tuple[bytes, np.ndarray]:
    arr = np.random.default_rng(seed).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue(), arr


def test_imagefolder_train_val(tmp_path):
    root = tmp_path / "imagenet"
    png, png_arr = encoded("PNG", 1)
    bmp, bmp_arr = encoded("BMP", 2)
    mislabeled_png, _ = encoded("PNG", 3)
    files = {
        "train/dog/b.jpg": save(root / "train/dog/b.jpg", jpeg_bytes(1)),
        "train/dog/a.JPEG": save(root / "train/dog/a.JPEG", jpeg_bytes(2)),
        "train/dog/sub/c.jpeg": save(root / "train/dog/sub/c.jpeg", jpeg_bytes(3)),
        "train/cat/p.png": save(root / "train/cat/p.png", png),
        "train/cat/m.bmp": save(root / "train/cat/m.bmp", bmp),
        # ImageNet really has a PNG named .JPEG: the shard extension must follow the content
        "train/cat/n.JPEG": save(root / "train/cat/n.JPEG", mislabeled_png),
        "val/cat/v.jpg": save(root / "val/cat/v.jpg", jpeg_bytes(4)),
        "val/dog/w.jpg": save(root / "val/dog/w.jpg", jpeg_bytes(5)),
    }
    save(root / "train/dog/notes.txt", b"not an image")
    save(root / "train/dog/.hidden.jpg", b"junk")
    # seed=None keeps the listing order, which this test is about (shuffling: test_shard_order.py)
    ms = converters.imagefolder(root, tmp_path / "out", max_count=4, progress=False, seed=None)
    assert set(ms) == {"train", "val"}
    assert ms["train"].classes == ms["val"].classes == ["cat", "dog"]
    assert ms["train"].num_samples == 6 and ms["val"].num_samples == 2
    got = dict(read_split(tmp_path / "out" / "train"))
    # sorted by class, then by path inside the class folder; the extension is dropped from the key
    assert list(got) == ["cat_m", "cat_n", "cat_p", "dog_a", "dog_b", "dog_sub_c"]
    assert [int(f["cls"]) for f in got.values()] == [0, 0, 0, 1, 1, 1]
    assert got["dog_a"]["jpg"] == files["train/dog/a.JPEG"]  # JPEG bytes kept as they are
    assert got["dog_sub_c"]["jpg"] == files["train/dog/sub/c.jpeg"]
    assert got["cat_p"]["png"] == png
    assert got["cat_n"]["png"] == mislabeled_png
    assert set(got["cat_m"]) == {"png", "cls"}  # BMP re-encoded losslessly
    np.testing.assert_array_equal(pixels(got["cat_m"]["png"]), bmp_arr)
    np.testing.assert_array_equal(pixels(got["cat_p"]["png"]), png_arr)
    val = read_split(tmp_path / "out" / "val")
    assert [(k, int(f["cls"]), f["jpg"]) for k, f in val] == [
        ("cat_v", 0, files["val/cat/v.jpg"]),
        ("dog_w", 1, files["val/dog/w.jpg"]),
    ]


def test_imagefolder_single_split_subset_and_keys(tmp_path):
    root = tmp_path / "folder"
    long_name = "x" * 150 + ".jpg"
    for rel in ("b/a b.jpg", "b/a_b.jpg", "b/x.y.jpg", "b/x_y.png", f"b/{long_name}", "a/1.jpg", "c/1.jpg"):
        save(root / rel, jpeg_bytes(len(rel)))
    ms = converters.imagefolder(root, tmp_path / "out", classes_subset=["b", "a"], progress=False, seed=None)
    assert list(ms) == ["train"] and ms["train"].classes == ["b", "a"]
    got = read_split(tmp_path / "out" / "train")
    keys = [k for k, _ in got]
    assert len(keys) == len(set(keys)) == 6
    assert all("." not in k and "/" not in k and len(k) <= converters.MAX_KEY_LEN for k in keys)
    assert labels_of(got) == [0] * 5 + [1]  # label = position in classes_subset; c is left out
    again = converters.imagefolder(root, tmp_path / "out2", classes_subset=["b", "a"], progress=False, seed=None)
    assert [k for k, _ in read_split(tmp_path / "out2" / "train")] == keys  # deterministic keys
    assert again["train"].num_samples == 6


def test_imagefolder_errors(tmp_path):
    with pytest.raises(ShardError, match="does not exist"):
        converters.imagefolder(tmp_path / "missing", tmp_path / "out", progress=False)
    flat = tmp_path / "flat"
    save(flat / "a.jpg", jpeg_bytes(0))
    with pytest.raises(ShardError, match="no class sub-directories"):
        converters.imagefolder(flat, tmp_path / "out", progress=False)
    root = tmp_path / "tree"
    save(root / "train/cat/a.jpg", jpeg_bytes(0))
    save(root / "train/dog/a.jpg", jpeg_bytes(1))
    save(root / "val/cat/a.jpg", jpeg_bytes(2))
    with pytest.raises(ShardError, match="different class folders.*dog"):
        converters.imagefolder(root, tmp_path / "out", progress=False)
    save(root / "val/dog/bad.jpg", b"\0\1\2 not an image")
    with pytest.raises(ShardError, match="bad.jpg is not a readable image"):
        converters.imagefolder(root, tmp_path / "out", progress=False)


def test_wnid_lists():
    ten, dogs = converters.read_wnids("imagenet10"), converters.read_wnids("imagenet_dogs")
    assert len(ten) == len(set(ten)) == 10 and len(dogs) == len(set(dogs)) == 15
    assert ten == sorted(ten) and dogs == sorted(dogs)
    assert all(w.startswith("n") and len(w) == 9 and w[1:].isdigit() for w in ten + dogs)
    assert "n02085936" in ten and "n02085936" in dogs  # the Maltese dog is in both


def test_imagenet10_subset_and_missing_wnid(tmp_path):
    root = tmp_path / "imagenet"
    wnids = converters.read_wnids("imagenet10")
    for i, w in enumerate([*wnids, "n01440764"]):  # plus a class outside the subset
        save(root / "train" / w / f"{w}_{i}.JPEG", jpeg_bytes(i, (6, 6)))
    ms = converters.imagenet10(root, tmp_path / "out", progress=False, seed=None)
    assert list(ms) == ["train"] and ms["train"].classes == wnids and ms["train"].source == "imagenet10"
    got = read_split(tmp_path / "out" / "train")
    assert labels_of(got) == list(range(10))
    assert [k for k, _ in got] == [f"{w}_{w}_{i}" for i, w in enumerate(wnids)]
    for f in (root / "train" / wnids[3]).iterdir():
        f.unlink()
    (root / "train" / wnids[3]).rmdir()
    with pytest.raises(ShardError, match=f"missing: {wnids[3]}"):
        converters.imagenet10(root, tmp_path / "out", progress=False)
    with pytest.raises(ShardError, match="class folders are missing"):
        converters.imagenet_dogs(root, tmp_path / "dogs", progress=False)


def test_imagefolder_rerun_reads_only_unfinished_shards(tmp_path, monkeypatch):
    root = tmp_path / "folder"
    for i in range(7):
        save(root / f"c{i % 2}" / f"{i}.jpg", jpeg_bytes(i, (5, 5)))
    out = tmp_path / "out" / "train"
    converters.imagefolder(root, tmp_path / "out", max_count=3, progress=False)
    before = mtimes(out)
    loaded: list[Path] = []
    real_load = converters.load_image_file

    def counting_load(path):
        loaded.append(path)
        return real_load(path)

    monkeypatch.setattr(converters, "load_image_file", counting_load)
    m = converters.imagefolder(root, tmp_path / "out", max_count=3, progress=False)
    assert loaded == [] and mtimes(out) == before and m["train"].num_samples == 7
    # lose the last shard: only its one image is read again
    (out / "shard-000002.tar").unlink()
    converters.imagefolder(root, tmp_path / "out", max_count=3, progress=False)
    assert len(loaded) == 1
    assert read_manifest(out).num_samples == 7


# --- image lists ---------------------------------------------------------------------------------------


def test_image_list_text_and_csv(tmp_path):
    imgs = tmp_path / "imgs"
    a = save(imgs / "a.jpg", jpeg_bytes(0))
    b = save(imgs / "sub" / "b.jpg", jpeg_bytes(1))
    elsewhere = save(tmp_path / "other" / "c.jpg", jpeg_bytes(2))
    listing = tmp_path / "lists" / "files.txt"
    listing.parent.mkdir()
    listing.write_text(
        f"# images to cluster\n../imgs/a.jpg\n\n  ../imgs/sub/b.jpg  \n{tmp_path}/other/c.jpg\n"
    )
    ms = converters.image_list(listing, tmp_path / "out", progress=False, seed=None)  # the listed order
    m = ms["train"]
    assert list(ms) == ["train"] and m.classes is None and m.num_classes == 0 and m.num_samples == 3
    got = read_split(tmp_path / "out" / "train")
    assert [f["jpg"] for _, f in got] == [a, b, elsewhere]
    assert labels_of(got) == [None] * 3
    assert [k for k, _ in got] == ["imgs_a", "imgs_sub_b", "other_c"]  # below the common folder

    csv_list = tmp_path / "imgs" / "list.csv"
    csv_list.write_text('id,path,note\n1,a.jpg,x\n# skipped\n2,sub/b.jpg,"y, z"\n')
    got = read_split(converters.image_list(csv_list, tmp_path / "out_csv", progress=False, seed=None)["train"].root)
    assert [f["jpg"] for _, f in got] == [a, b]
    headerless = tmp_path / "imgs" / "plain.csv"
    headerless.write_text("sub/b.jpg,3\n")
    got = read_split(converters.image_list(headerless, tmp_path / "out_plain", progress=False)["train"].root)
    assert [f["jpg"] for _, f in got] == [b]


def test_image_list_errors(tmp_path):
    save(tmp_path / "a.jpg", jpeg_bytes(0))
    listing = tmp_path / "list.txt"
    listing.write_text("a.jpg\n# fine\nmissing.jpg\n")
    with pytest.raises(ShardError, match=r"list.txt:3: listed image 'missing.jpg' does not exist"):
        converters.image_list(listing, tmp_path / "out", progress=False)
    listing.write_text("a.jpg\n./a.jpg\n")
    with pytest.raises(ShardError, match="already listed on line 1"):
        converters.image_list(listing, tmp_path / "out", progress=False)
    with pytest.raises(ShardError, match="does not exist"):
        converters.image_list(tmp_path / "nope.txt", tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "train" / "manifest.json").exists()


# --- CLI -----------------------------------------------------------------------------------------------


def test_cli(cifar10_dir, tmp_path, capsys):
    src, names, want = cifar10_dir
    out = tmp_path / "ds"
    assert main(["cifar10", "--src", str(src), "--out", str(out), "--max-count", "5"]) == 0
    assert "11 samples in 3 shards, 10 classes" in capsys.readouterr().out
    assert read_manifest(out / "test").num_samples == len(want["test"][0])
    listing = tmp_path / "l.txt"
    listing.write_text("gone.jpg\n")
    assert main(["list", "--src", str(listing), "--out", str(tmp_path / "l")]) == 2
    assert "l.txt:1: listed image 'gone.jpg' does not exist" in capsys.readouterr().err
    assert main(["stl10", "--src", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
