"""Honest batches: converters write samples in a seeded random order, so any run of consecutive samples
(a batch read in shard order) is a uniform random sample of the split; class-sorted shards are flagged.

The data is a 10-class ImageFolder tree of tiny PNGs. "Shard order" is the canonical order readers
go through: the manifest's shards in turn, each tar's members in turn.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from scp_dist.shards import converters
from scp_dist.shards.__main__ import main
from scp_dist.shards.manifest import MANIFEST_NAME, ShardError, order_problem, read_manifest
from scp_dist.shards.writer import PROGRESS_NAME, shuffled

NUM_CLASSES, PER_CLASS, SHARD, BLOCK = 10, 40, 64, 64


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    for c in range(NUM_CLASSES):
        (root / f"class{c}").mkdir()
        for i in range(PER_CLASS):
            (root / f"class{c}" / f"{i:03d}.png").write_bytes(png(c * PER_CLASS + i))
    return root


def convert(tree: Path, out: Path, **kw):
    return converters.imagefolder(tree, out, max_count=SHARD, progress=False, **kw)["train"]


def shard_order(split_dir: Path) -> list[tuple[str, int]]:
    """(key, label) of every sample, in shard order."""
    out = []
    for path in read_manifest(split_dir).shard_paths():
        with tarfile.open(path) as t:
            out += [(m.name.split(".")[0], int(t.extractfile(m).read())) for m in t if m.name.endswith(".cls")]
    return out


def block_uniformity_p(labels: list[int], block: int = BLOCK) -> float:
    """p-value that the class counts of consecutive blocks are those of uniform random sampling: each
    full block's counts against the split's class proportions (scipy's chisquare), statistics pooled."""
    labels_arr = np.asarray(labels)
    share = np.bincount(labels_arr, minlength=NUM_CLASSES) / len(labels_arr)
    blocks = [labels_arr[i:i + block] for i in range(0, len(labels_arr) - block + 1, block)]
    chi2 = sum(stats.chisquare(np.bincount(b, minlength=NUM_CLASSES), block * share).statistic for b in blocks)
    return float(stats.chi2.sf(chi2, len(blocks) * (NUM_CLASSES - 1)))


# --- (a) shuffled at write time ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_shard_order_is_a_uniform_random_sample(tree, tmp_path, seed):
    m = convert(tree, tmp_path / "out", seed=seed)
    order = shard_order(tmp_path / "out" / "train")
    assert len(m.shards) == 7 and len(order) == m.num_samples == NUM_CLASSES * PER_CLASS
    assert sorted(k for k, _ in order) == sorted(f"class{c}_{i:03d}" for c in range(NUM_CLASSES)
                                                 for i in range(PER_CLASS))
    assert block_uniformity_p([y for _, y in order]) > 1e-3


def test_the_uniformity_check_fails_on_class_sorted_shards(tree, tmp_path):
    convert(tree, tmp_path / "out", seed=None)  # the source's order: class by class
    labels = [y for _, y in shard_order(tmp_path / "out" / "train")]
    assert labels == sorted(labels)
    assert block_uniformity_p(labels) < 1e-6
    assert block_uniformity_p(sorted(np.arange(400) % NUM_CLASSES)) < 1e-6


def test_shuffled_is_a_seeded_permutation():
    class S:
        def __init__(self, key):
            self.key = key

    items = [S(f"k{i}") for i in range(1000)]
    a, b = shuffled(items, 0), shuffled(items[::-1], 0)
    assert [s.key for s in a] == [s.key for s in b]  # depends on the keys, not on the listing order
    assert sorted(s.key for s in a) == sorted(s.key for s in items)
    assert [s.key for s in shuffled(items, 1)] != [s.key for s in a]
    # Not merely rotated or reversed: Spearman correlation with the input order near 0.
    rho = stats.spearmanr(np.arange(1000), [int(s.key[1:]) for s in a]).statistic
    assert abs(rho) < 0.15


# --- (b) deterministic: same seed, same shards; resume-safe --------------------------------------------


def test_same_seed_same_shards_different_seed_different_order(tree, tmp_path):
    a, b = convert(tree, tmp_path / "a", seed=0), convert(tree, tmp_path / "b", seed=0)
    assert a.to_json() == b.to_json()  # sha256 of every shard included
    c = convert(tree, tmp_path / "c", seed=7)
    assert c.order_seed == 7 and [s.sha256 for s in c.shards] != [s.sha256 for s in a.shards]
    keys_a, keys_c = (shard_order(tmp_path / d / "train") for d in ("a", "c"))
    assert keys_a != keys_c and sorted(keys_a) == sorted(keys_c)


def test_interrupted_conversion_resumes_to_the_same_shards(tree, tmp_path, monkeypatch):
    fresh = convert(tree, tmp_path / "fresh", seed=3)
    real_load, calls, dies_at = converters.load_image_file, [], [3 * SHARD + 5]  # inside shard 4

    def dies_mid_way(path):
        calls.append(path)
        if len(calls) in dies_at:
            raise OSError("disk went away")
        return real_load(path)

    monkeypatch.setattr(converters, "load_image_file", dies_mid_way)
    with pytest.raises(OSError, match="went away"):
        convert(tree, tmp_path / "out", seed=3)
    split = tmp_path / "out" / "train"
    assert sorted(p.name for p in split.glob("*.tar")) == [f"shard-00000{i}.tar" for i in range(3)]
    calls.clear()
    dies_at.clear()
    resumed = convert(tree, tmp_path / "out", seed=3)
    assert len(calls) == fresh.num_samples - 3 * SHARD  # the finished shards were not read again
    assert resumed.to_json() == fresh.to_json()


def test_resume_with_another_seed_rewrites_instead_of_mixing_orders(tree, tmp_path, caplog):
    convert(tree, tmp_path / "out", seed=0)
    (tmp_path / "out" / "train" / MANIFEST_NAME).unlink()  # as if interrupted after the last shard
    with caplog.at_level(logging.WARNING, logger="scp_dist"):
        m = convert(tree, tmp_path / "out", seed=1)
    assert "written shuffled with seed 0, this run asks for shuffled with seed 1; rewriting them" in caplog.text
    assert m.to_json() == convert(tree, tmp_path / "fresh", seed=1).to_json()


def test_progress_file_from_before_orders_were_recorded(tree, tmp_path):
    """An old .progress.json is a bare list and its shards are in the source's order: a shuffled run
    must not resume from them, a --no-shuffle run may."""
    convert(tree, tmp_path / "out", seed=None)
    split = tmp_path / "out" / "train"
    progress = split / PROGRESS_NAME
    old = json.loads(progress.read_text())["shards"]
    for shard in old:
        del shard["label_counts"]
    progress.write_text(json.dumps(old))
    stamps = {p.name: p.stat().st_mtime_ns for p in split.glob("*.tar")}
    assert convert(tree, tmp_path / "out", seed=None).order == "as_given"
    assert {p.name: p.stat().st_mtime_ns for p in split.glob("*.tar")} == stamps  # resumed, nothing rewritten
    progress.write_text(json.dumps(old))
    m = convert(tree, tmp_path / "out", seed=0)
    assert m.order == "shuffled" and m.to_json() == convert(tree, tmp_path / "fresh", seed=0).to_json()


# --- (c) the manifest records the order; class-sorted shards are flagged --------------------------------


def test_manifest_records_order_seed_and_label_counts(tree, tmp_path):
    convert(tree, tmp_path / "out", seed=5)
    raw = json.loads((tmp_path / "out" / "train" / MANIFEST_NAME).read_text())
    assert raw["order"] == "shuffled" and raw["order_seed"] == 5
    counts = np.array([s["label_counts"] for s in raw["shards"]])
    assert counts.shape == (7, NUM_CLASSES)
    assert counts.sum(1).tolist() == [s["num_samples"] for s in raw["shards"]]
    assert counts.sum(0).tolist() == [PER_CLASS] * NUM_CLASSES
    m = convert(tree, tmp_path / "sorted", seed=None)
    assert (m.order, m.order_seed) == ("as_given", None)


def test_class_sorted_shards_warn_once_and_shuffled_ones_do_not(tree, tmp_path, caplog):
    convert(tree, tmp_path / "shuffled", seed=0)
    convert(tree, tmp_path / "sorted", seed=None)
    with caplog.at_level(logging.WARNING, logger="scp_dist"):
        read_manifest(tmp_path / "shuffled" / "train")
        assert not caplog.records
        for _ in range(3):  # once per manifest, not once per reader
            read_manifest(tmp_path / "sorted" / "train")
    [record] = caplog.records
    assert record.name == "scp_dist" and record.levelno == logging.WARNING
    msg = record.getMessage()
    assert "class-sorted" in msg and "chi-square" in msg
    assert "python -m scp_dist.shards imagefolder" in msg and "data.order=global" in msg


def test_single_label_shards_are_named(tmp_path, tree):
    m = converters.imagefolder(tree, tmp_path / "out", max_count=PER_CLASS, progress=False, seed=None)["train"]
    why = order_problem(m)
    assert why is not None and "10 of 10 shards hold a single label" in why


def test_old_manifests_read_and_old_imagefolder_ones_warn(tree, tmp_path, caplog):
    convert(tree, tmp_path / "out", seed=None)
    path = tmp_path / "out" / "train" / MANIFEST_NAME
    raw = json.loads(path.read_text())
    for key in ("order", "order_seed"):
        del raw[key]
    for shard in raw["shards"]:
        del shard["label_counts"]
    path.write_text(json.dumps(raw, indent=1))
    with caplog.at_level(logging.WARNING, logger="scp_dist"):
        m = read_manifest(path.parent)
    assert m.order == "unknown" and m.order_seed is None and m.shards[0].label_counts is None
    assert "class by class" in caplog.text  # the old imagefolder converter always sorted by class
    caplog.clear()
    raw["source"] = "cifar10"  # whose published batches are already in random order
    path.write_text(json.dumps(raw, indent=1))
    with caplog.at_level(logging.WARNING, logger="scp_dist"):
        assert order_problem(read_manifest(path.parent)) is None
    assert not caplog.records


def test_cli_seed_and_no_shuffle(tree, tmp_path, capsys):
    assert main(["imagefolder", "--src", str(tree), "--out", str(tmp_path / "a"), "--max-count", "64",
                 "--seed", "9"]) == 0
    assert "400 samples in 7 shards, 10 classes, shuffled (seed 9)" in capsys.readouterr().out
    assert read_manifest(tmp_path / "a" / "train").order_seed == 9
    assert main(["imagefolder", "--src", str(tree), "--out", str(tmp_path / "b"), "--no-shuffle"]) == 0
    assert "in the source's order" in capsys.readouterr().out


# --- (d) labels from image lists -----------------------------------------------------------------------


@pytest.fixture
def images(tmp_path) -> Path:
    for name in ("a", "b", "c d", "e"):
        (tmp_path / f"{name}.png").write_bytes(png(ord(name[0])))
    return tmp_path


def list_labels(out: Path) -> dict[str, int]:
    return dict(shard_order(out / "train"))


@pytest.mark.parametrize("name, text", [
    ("l.txt", "# comment\na.png 2\nb.png\t0\n\nc d.png   1\ne.png 2\n"),
    ("l.csv", "id,label,path\n1,2,a.png\n2,0,b.png\n3,1,c d.png\n4,2,e.png\n"),
    ("l.tsv", "path\tlabel\na.png\t2\nb.png\t0\nc d.png\t1\ne.png\t2\n"),
])
def test_image_list_with_labels(images, name, text):
    (images / name).write_text(text)
    m = converters.image_list(images / name, images / "out", max_count=2, progress=False)["train"]
    assert m.classes == ["0", "1", "2"] and m.num_classes == 3 and m.order == "shuffled"
    assert list_labels(images / "out") == {"a": 2, "b": 0, "c_d": 1, "e": 2}
    assert sum(np.array([s.label_counts for s in m.shards])).tolist() == [1, 1, 2]


def test_image_list_paths_with_spaces_stay_unlabeled(images):
    (images / "l.txt").write_text("c d.png\na.png\n")
    m = converters.image_list(images / "l.txt", images / "out", progress=False)["train"]
    assert m.classes is None and m.num_samples == 2


@pytest.mark.parametrize("name, text, error", [
    ("l.txt", "a.png cat\n", r"l.txt:1: label 'cat' is not an integer"),
    ("l.txt", "a.png 1\nb.png 1.5\n", r"l.txt:2: label '1.5' is not an integer"),
    ("l.txt", "a.png 0\nb.png -1\n", r"l.txt:2: label -1 is negative"),
    ("l.txt", "a.png 0\nb.png\n", r"l.txt:2: no label after the path; line 1 has one"),
    ("l.txt", "a.png 1000000\n", r"l.txt:1: label 1000000 is too large"),
    ("l.csv", "path,label\na.png,0\nb.png,\n", r"l.csv:3: no label"),
    ("l.csv", "path,label\na.png,x\n", r"l.csv:2: label 'x' is not an integer"),
    ("l.csv", "file,label\na.png,1\n", r"l.csv:1: the header names a `label` column but no `path` column"),
])
def test_image_list_bad_labels(images, name, text, error):
    (images / name).write_text(text)
    with pytest.raises(ShardError, match=error):
        converters.image_list(images / name, images / "out", progress=False)
    assert not (images / "out" / "train" / MANIFEST_NAME).exists()
