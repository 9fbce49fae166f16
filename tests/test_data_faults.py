"""Fault injection on the data path (issue 10, "never lose work, never hang"): unreadable shards,
all-skipped global batches, 16-bit PNGs, read-only data sets, shards the manifest does not describe,
bad labels, and truncated images on the DALI path."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from scp_dist.config import AugmentConfig, DataConfig
from scp_dist.data.augment_torch import ViewSpec, decode_rgb, plain_view, structure_problem
from scp_dist.data.batch import DataError
from scp_dist.data.loader import build_eval_loader, build_train_loader
from scp_dist.data.reader import SampleReader, check_shards
from scp_dist.shards.manifest import MANIFEST_NAME, ShardError, read_manifest
from scp_dist.shards.sources import encode_png
from scp_dist.shards.writer import Sample, write_index, write_shards

REPO = Path(__file__).resolve().parent.parent
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
CPU = torch.device("cpu")


def data_cfg(**kw):
    return OmegaConf.structured(DataConfig(**{"loader": "torch", "num_workers": 0, **kw}))


def make_dataset(root: Path, n: int = 30, per_shard: int = 10, same_bytes: bool = False) -> Path:
    """n labelled samples (4 classes) in shards of per_shard. same_bytes: one image for all, so every
    full shard has the same size (a swapped shard passes the size check)."""
    rng = np.random.default_rng(1)
    one = encode_png(rng.integers(0, 256, (12, 14, 3), dtype=np.uint8))
    items = [Sample(f"k{i:05d}", one if same_bytes else encode_png(rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)),
                    "png", i % 4) for i in range(n)]
    write_shards(items, root, source="t", split="train", classes=list("abcd"), max_count=per_shard, progress=False)
    return root


def train_loader(root: Path, batch: int = 10, world: int = 1, rank: int = 0, **kw):
    return build_train_loader(root, data_cfg(**kw), OmegaConf.structured(AugmentConfig()), world_size=world,
                              rank=rank, global_batch=batch, image_size=8, mean=MEAN, std=STD, seed=0, device=CPU)


def epoch_keys(loader) -> list[str]:
    loader.set_epoch(0)
    return [k for b in loader for k in b.keys]


def _listing(d: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in d.iterdir()}


# -- 1. an unindexed empty or garbage shard --------------------------------------------------------

@pytest.mark.parametrize("content", ["empty", "garbage"])
def test_unreadable_unindexed_shard_is_skipped_or_raised_in_one_line_naming_it(tmp_path, monkeypatch, caplog,
                                                                               content):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = make_dataset(tmp_path / "ds")
    tar = root / "shard-000001.tar"
    size = tar.stat().st_size
    tar.write_bytes(b"" if content == "empty" else np.random.default_rng(0).bytes(size))
    tar.with_suffix(".idx").unlink()
    with pytest.raises(tarfile.ReadError), tarfile.open(tar, "r:"):  # the fault is real: no tar to open
        pass

    ld = train_loader(root)
    keys = epoch_keys(ld)
    assert ld.stats.as_dict()["bad_shard"] == 10 and len(keys) == 20
    assert not any(k.startswith("k0001") for k in keys)
    assert "shard-000001.tar" in caplog.text

    with pytest.raises(DataError, match=r"bad_shard: .*shard-000001\.tar: unreadable") as err:
        epoch_keys(train_loader(root, on_error="raise"))
    assert "\n" not in str(err.value)


# -- 2. a global batch whose samples were all skipped ----------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_all_skipped_batches_are_yielded_empty_on_every_rank(tmp_path, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    root = tmp_path / "ds"
    items = [Sample(f"k{i:03d}", b"\x89PNG\r\n\x1a\n" + b"garbage" * 9, "png", 0) for i in range(20)]
    write_shards(items, root, source="t", split="train", classes=["a"], max_count=10, progress=False)
    for rank in range(2):
        ld = train_loader(root, batch=8, world=2, rank=rank, loader=backend)
        ld.set_epoch(0)
        batches = list(ld)
        # A step is never dropped: the training step runs collectives, so every rank must reach it.
        assert len(batches) == len(ld) == 2
        assert all(b.keys == [] and [v.shape for v in b.views] == [(0, 3, 8, 8)] * 2 for b in batches)
        assert ld.stats.as_dict()["corrupt_image"] == 8


def test_an_empty_global_batch_gives_an_empty_step_not_an_error():
    from scp_dist.loss import scp_loss

    za = torch.zeros(0, 5, requires_grad=True)
    out = scp_loss(za, za * 1.0)  # every rank sees the same gathered count, so every rank takes this branch
    assert out.batch_size == 0 and torch.isfinite(out.total).all()
    out.loss.backward()  # DDP's gradient all-reduce must still run on every rank


# -- 3. 16-bit PNGs --------------------------------------------------------------------------------

def png16(a: np.ndarray) -> bytes:
    """A 16-bit grey (H, W) or RGB (H, W, 3) PNG, written by hand: PIL cannot write 16-bit RGB."""
    h, w = a.shape[:2]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\0" + a[i].astype(">u2").tobytes() for i in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 0 if a.ndim == 2 else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


GREY16 = np.array([[0, 1, 127, 128, 255, 256], [257, 19136, 32768, 65280, 65534, 65535]], np.uint16)


def test_16bit_grey_png_is_scaled_not_saturated():
    data = png16(GREY16)
    want = np.rint(GREY16 * (255 / 65535)).astype(np.uint8)
    saturated = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[..., 0]
    assert not np.array_equal(saturated, want)  # the fault: PIL's convert clips at 255
    got = decode_rgb(data)
    assert got.shape == (3, 2, 6) and got.dtype == torch.uint8
    for c in range(3):
        np.testing.assert_array_equal(got[c].numpy(), want)
    # In the [0, 1] range the view normalises from: 19136 is 0.292 of full scale, not 1.
    view = plain_view(decode_rgb(png16(np.full((6, 6), 19136, np.uint16))), ViewSpec(6, (0, 0, 0), (1, 1, 1)))
    assert abs(float(view.mean()) - 0.292) < 0.003


def test_16bit_rgb_png_and_the_dali_decoder_agree():
    rgb = np.stack([GREY16, GREY16[:, ::-1], GREY16 // 2], axis=-1)
    got = decode_rgb(png16(rgb)).permute(1, 2, 0).numpy()
    assert np.abs(got.astype(int) - np.rint(rgb * (255 / 65535))).max() <= 1  # PIL keeps the high byte
    if not _has_dali():
        return
    grey = decode_rgb(png16(GREY16)).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(_dali_decode(png16(GREY16)), grey)  # both backends: the same pixels
    assert np.abs(_dali_decode(png16(rgb)).astype(int) - got).max() <= 1


def _has_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _dali_decode(data: bytes) -> np.ndarray:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipe():
        enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
        return fn.decoders.image(enc, device="cpu", output_type=types.RGB)

    p = pipe()
    p.build()
    return np.array(p.run(enc=[np.frombuffer(data, np.uint8)])[0].as_tensor())[0]


# -- 4. no index on a read-only data set -----------------------------------------------------------

def test_unindexed_shards_are_read_without_writing_into_the_data_set(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    root = make_dataset(tmp_path / "ds")
    for idx in root.glob("*.idx"):
        idx.unlink()
    before = _listing(root)
    keys = epoch_keys(train_loader(root))
    assert len(keys) == 30 and _listing(root) == before  # nothing appeared or changed in the data set
    assert len(list((cache / "scp_dist" / "index").glob("*.idx"))) == 3  # the index went to the cache
    again = train_loader(root)
    assert epoch_keys(again) == keys and sum(again.stats.as_dict().values()) == 0


def test_unindexed_shards_on_a_read_only_system_are_indexed_in_memory(tmp_path, monkeypatch):
    """Root ignores chmod, so a read-only file system is simulated: every atomic write fails."""
    import scp_dist.fileio as fileio

    root = make_dataset(tmp_path / "ds")
    for idx in root.glob("*.idx"):
        idx.unlink()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tried: list[Path] = []

    def read_only(path, write):
        tried.append(Path(path))
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(fileio, "atomic_write", read_only)
    with pytest.raises(OSError, match="Read-only"):  # the simulation bites: the old in-place index write fails
        write_index(root / "shard-000000.tar", root / "shard-000000.idx")
    tried.clear()
    ld = train_loader(root)
    assert len(epoch_keys(ld)) == 30 and sum(ld.stats.as_dict().values()) == 0
    assert tried and not any(root in p.parents for p in tried)  # only the cache was tried


# -- 5. shards the manifest does not describe ------------------------------------------------------

def _edit_manifest(root: Path, shard: int, num_samples: int) -> None:
    m = json.loads((root / MANIFEST_NAME).read_text())
    m["shards"][shard]["num_samples"] = num_samples
    m["num_samples"] = sum(s["num_samples"] for s in m["shards"])
    (root / MANIFEST_NAME).write_text(json.dumps(m))


@pytest.mark.parametrize("says", [8, 12], ids=["undercount", "overcount"])
def test_a_manifest_miscounting_a_shard_is_an_error_naming_it(tmp_path, monkeypatch, says):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = make_dataset(tmp_path / "ds")
    _edit_manifest(root, 1, says)
    msg = rf"shard-000001\.tar: holds 10 samples, the manifest says {says}"
    with pytest.raises(ShardError, match=msg):  # indexed: at open, on every rank alike
        train_loader(root)
    (root / "shard-000001.idx").unlink()
    ld = train_loader(root, on_error="skip")  # unindexed: found when the shard is first read
    with pytest.raises(ShardError, match=msg) as err:
        epoch_keys(ld)
    assert not isinstance(err.value, DataError)  # not a bad sample: on_error=skip does not hide it


def test_a_longer_shard_is_an_error_and_a_shorter_one_keeps_its_readable_samples(tmp_path):
    root = make_dataset(tmp_path / "ds")
    tar = root / "shard-000001.tar"
    data = tar.read_bytes()
    tar.write_bytes(data + b"\0" * 512)
    with pytest.raises(ShardError, match=r"shard-000001\.tar: \d+ bytes, the manifest says"):
        train_loader(root)
    tar.write_bytes(data[:4096])  # the first sample or two left
    ld = train_loader(root)
    left = sum(k.startswith("k0001") for k in epoch_keys(ld))
    assert 0 < left < 10 and ld.stats.as_dict()["truncated"] == 10 - left


def test_a_swapped_shard_is_caught_by_verify(tmp_path):
    root = make_dataset(tmp_path / "ds", same_bytes=True)
    for ext in ("tar", "idx"):
        shutil.copy(root / f"shard-000000.{ext}", root / f"shard-000001.{ext}")
    m = read_manifest(root)
    assert m.shards[0].bytes == m.shards[1].bytes  # the cheap check cannot see this swap ...
    keys = epoch_keys(train_loader(root))
    assert len(keys) > len(set(keys))  # ... and training reads duplicates: the fault
    with pytest.raises(ShardError, match=r"shard-000001\.tar: sha256 differs"):
        SampleReader(m, verify=True)
    check_shards(m, verify=True, part=(0, 2))  # rank 0 of 2 hashes shards 0 and 2 only
    with pytest.raises(ShardError, match=r"shard-000001\.tar"):
        check_shards(m, verify=True, part=(1, 2))


# -- 6. bad labels ---------------------------------------------------------------------------------

def _set_labels(root: Path, labels: dict[str, bytes]) -> None:
    """Rewrite shard 0 with other .cls contents (every member fits one 512-byte block either way)."""
    tar = root / "shard-000000.tar"
    with tarfile.open(tar) as t:
        members = [(m.name, t.extractfile(m).read()) for m in t]
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in members:
            data = labels.get(name, data)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    write_index(tar, tar.with_suffix(".idx"))


def test_bad_labels_are_counted_as_bad_label_not_as_corrupt_images(tmp_path, caplog):
    root = make_dataset(tmp_path / "ds")
    _set_labels(root, {"k00001.cls": b"x", "k00002.cls": b"42", "k00003.cls": b"-1", "k00004.cls": b"-7"})
    ev = build_eval_loader(root, data_cfg(), world_size=1, rank=0, batch_size=30, image_size=8, mean=MEAN, std=STD,
                           device=CPU)
    got = {k: int(y) for b in ev for k, y in zip(b.keys, b.labels, strict=True)}
    stats = ev.stats.as_dict()
    assert stats["bad_label"] == 3 and stats["corrupt_image"] == 0
    assert {"k00001", "k00002", "k00004"}.isdisjoint(got) and len(got) == 27
    assert got["k00003"] == -1  # -1 is "unlabelled": kept, and the metrics leave it out
    assert set(got.values()) <= {-1, 0, 1, 2, 3}  # no 43rd class
    assert "label 42 outside 0..3" in caplog.text and "k00002" in caplog.text
    with pytest.raises(DataError, match=r"bad_label: sample k0000[124]: .*shard-000000\.tar: label"):
        epoch_keys(train_loader(root, batch=30, on_error="raise"))


# -- 7. truncated images never reach DALI ----------------------------------------------------------

def _jpeg(im: np.ndarray, progressive: bool = False) -> bytes:
    b = io.BytesIO()
    Image.fromarray(im).save(b, "JPEG", quality=90, progressive=progressive)
    return b.getvalue()


def test_structure_check_passes_good_images_and_stops_truncated_ones():
    from scp_dist.data.augment_dali import _image_hw

    im = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    goods = [encode_png(im), _jpeg(im), _jpeg(im, progressive=True), png16(GREY16)]
    assert [structure_problem(g) for g in goods] == [None] * 4
    for good in goods:
        for cut in (len(good) // 2, len(good) - 4, len(good) - 2):
            bad = good[:cut]
            assert structure_problem(bad) is not None, (good[:4], cut)
            with pytest.raises(ValueError, match="truncated"):
                decode_rgb(bad)  # the torch backend rejects it too: both backends skip the same files
    # PIL still reads the headers of half a PNG or JPEG: a header check alone would pass them to DALI.
    assert _image_hw(goods[0][: len(goods[0]) // 2]) == _image_hw(goods[1][: len(goods[1]) // 2]) == (40, 48)


_DALI_SCRIPT = """
import io, sys, numpy as np, torch
from PIL import Image
from scp_dist.data.augment_dali import DaliViews
from scp_dist.data.augment_torch import ViewSpec
from scp_dist.data.batch import Batch
from scp_dist.data.reader import RawSample
from scp_dist.shards.sources import encode_png
im = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
b = io.BytesIO(); Image.fromarray(im).save(b, "JPEG", quality=90)
for ext, good in (("png", encode_png(im)), ("jpg", b.getvalue())):
    for cut in (len(good) // 2, len(good) - 12, len(good) - 2):
        raws = [RawSample(0, "good0", good, ext, 0), RawSample(1, "bad", good[:cut], ext, 0),
                RawSample(2, "good2", good, ext, 0)]
        for two in (True, False):
            dv = DaliViews(ViewSpec(16, (0.5,) * 3, (0.25,) * 3), two_views=two, seed=0, device=torch.device("cpu"))
            out = dv(Batch([], [], torch.zeros(0, dtype=torch.int64), [], raw=raws), 0)
            assert out.keys == ["good0", "good2"], out.keys
            (reason, key, detail), = out.skipped
            assert (reason, key) == ("corrupt_image", "bad") and detail.startswith(("PNG", "JPEG")), detail
print("ok")
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_truncated_png_and_jpeg_are_skipped_before_dali_sees_them():
    pytest.importorskip("nvidia.dali")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _DALI_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    # A subprocess, so a crash inside DALI shows as a return code (-11 for a segfault), not a dead pytest.
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", f"rc={proc.returncode}\n{proc.stderr[-3000:]}"
