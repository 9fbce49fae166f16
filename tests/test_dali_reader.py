"""The native DALI reader backend (data.loader=dali_reader), CPU-only DALI here: epoch semantics per
rank (ranks built in one process with explicit world size and rank), determinism, coin-flip
frequencies, agreement of unaugmented views with the torch backend, labels, errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

pytest.importorskip("nvidia.dali")

from scp_dist.config import AugmentConfig, DataConfig, load_config  # noqa: E402
from scp_dist.data.augment_torch import ViewSpec, decode_rgb, plain_view  # noqa: E402
from scp_dist.data.dali_reader import (  # noqa: E402
    DaliReaderLoader,
    dali_shard_range,
    key_from_source_info,
    reader_steps_per_epoch,
)
from scp_dist.data.loader import DataError, build_eval_loader, build_train_loader  # noqa: E402
from scp_dist.shards.manifest import ShardError  # noqa: E402
from scp_dist.shards.sources import encode_png  # noqa: E402
from scp_dist.shards.writer import Sample, write_shards  # noqa: E402

CPU = torch.device("cpu")
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def encode_jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def smooth_images(n: int, h: int, w: int, seed: int = 0) -> list[np.ndarray]:
    """Low-frequency RGB images: resize and JPEG differences stay small, unlike on pixel noise."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((n, 3, h // 4 + 2, w // 4 + 2))).float()
    x = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
    return list((x * 255).round().byte().permute(0, 2, 3, 1).numpy())


def noise_images(n: int, h: int, w: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return list(rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8))


def make_dataset(root: Path, images: list[np.ndarray], per_shard: int, fmt: str = "png",
                 labeled: bool = True) -> dict[str, bytes]:
    """Shards of `images` (keys k00000...; label i % 4; fmt png | jpg | mixed); returns key -> bytes."""
    samples = []
    for i, im in enumerate(images):
        ext = fmt if fmt != "mixed" else ("png", "jpg")[i % 2]
        data = encode_png(im) if ext == "png" else encode_jpeg(im)
        samples.append(Sample(f"k{i:05d}", data, ext, i % 4 if labeled else None))
    write_shards(samples, root, source="t", split="train", classes=list("abcd") if labeled else None,
                 max_count=per_shard, progress=False)
    return {s.key: s.image for s in samples}


def loader(root: Path, world: int, rank: int, batch: int, seed: int = 0, image_size: int = 8,
           shuffle_buffer: int = 16, **aug) -> DaliReaderLoader:
    data = OmegaConf.structured(DataConfig(loader="dali_reader", num_workers=1, shuffle_buffer=shuffle_buffer))
    ld = build_train_loader(root, data, OmegaConf.structured(AugmentConfig(**aug)), world_size=world, rank=rank,
                            global_batch=batch, image_size=image_size, mean=MEAN, std=STD, seed=seed, device=CPU)
    assert isinstance(ld, DaliReaderLoader) and ld.backend == "dali_reader"
    return ld


def epoch(ld: DaliReaderLoader, e: int) -> list:
    ld.set_epoch(e)
    return list(ld)


def test_helpers():
    for n in (1, 7, 25, 100):
        for world in (1, 2, 3, 8):
            ranges = [dali_shard_range(n, world, r) for r in range(world)]
            assert [i for r in ranges for i in r] == list(range(n))
            assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    assert reader_steps_per_epoch(25, 6, 3) == 8 // 2
    assert key_from_source_info("/d/a:b.tar/x/shard-000001.tar:5632:k00012.png") == "k00012"
    assert key_from_source_info("/d/shard-000000.tar:512:img:1.jpg") == "img:1"


@pytest.mark.parametrize(("n", "per_shard"), [(50, 7), (50, 100), (37, 5)])  # 100: fewer shards than ranks
def test_epoch_semantics_per_rank(tmp_path, n, per_shard):
    root = tmp_path / "ds"
    make_dataset(root, noise_images(n, 6, 7), per_shard)
    g = 6
    for world in (1, 2, 3):
        b = g // world
        orders = []
        for e in (0, 1):
            per_rank = []
            for rank in range(world):
                ld = loader(root, world, rank, g, seed=1)
                batches = epoch(ld, e)
                assert len(batches) == len(ld) == reader_steps_per_epoch(n, g, world)  # same steps on every rank
                keys = []
                for bt in batches:
                    assert len(bt.keys) == b and [v.shape for v in bt.views] == [(b, 3, 8, 8)] * 2
                    assert bt.views[0].dtype == torch.float32 and bt.flips.shape == (4, b)
                    assert bt.labels.tolist() == [int(k[1:]) % 4 for k in bt.keys]  # the manifest's labels
                    keys.extend(bt.keys)
                # A rank reads only its own DALI range of the canonical order.
                assert {int(k[1:]) for k in keys} <= set(dali_shard_range(n, world, rank))
                per_rank.append(keys)
            everything = [k for keys in per_rank for k in keys]
            assert len(everything) == len(set(everything))  # disjoint across ranks, no repeat within an epoch
            assert n - len(everything) < g  # all but fewer than world x per-rank batch samples used
            orders.append(per_rank)
        assert orders[0] != orders[1]  # another epoch, another order


def test_unequal_per_rank_batches_are_refused(tmp_path):
    root = tmp_path / "ds"
    make_dataset(root, noise_images(20, 6, 6), 10)
    with pytest.raises(ShardError, match="multiple of the world size"):
        loader(root, 2, 0, 7)
    with pytest.raises(ShardError, match="fewer than train.global_batch"):
        loader(root, 1, 0, 32)


def test_same_seed_same_order_and_views(tmp_path):
    root = tmp_path / "ds"
    make_dataset(root, smooth_images(40, 16, 20, seed=3), 9, fmt="mixed")

    def run(seed, e=2, ld=None):
        ld = ld or loader(root, 2, 1, 8, seed=seed)
        return epoch(ld, e)

    first = run(5)
    ld = loader(root, 2, 1, 8, seed=5)
    for again in (run(5), run(5, ld=ld), run(5, ld=ld)):  # a fresh loader, and one iterated twice
        assert [b.keys for b in first] == [b.keys for b in again]
        for x, y in zip(first, again, strict=True):
            assert torch.equal(x.flips, y.flips)
            assert all(torch.equal(u, v) for u, v in zip(x.views, y.views, strict=True))
    for other in (run(6), run(5, e=3)):
        assert [b.keys for b in first] != [b.keys for b in other]
        by_key = {k: v for b in other for k, v in zip(b.keys, b.views[0], strict=True)}
        mine = {k: v for b in first for k, v in zip(b.keys, b.views[0], strict=True)}
        assert any(not torch.equal(mine[k], by_key[k]) for k in mine.keys() & by_key.keys())


def test_coin_flip_frequencies_and_views_differ(tmp_path):
    n = 300  # 600 views per flip kind
    root = tmp_path / "ds"
    make_dataset(root, smooth_images(n, 12, 14, seed=2), 100)
    batches = epoch(loader(root, 1, 0, 50, shuffle_buffer=64, blur_sigma=[0.5, 2.0]), 0)
    flips = torch.cat([b.flips for b in batches], dim=1)  # (crop a, blur a, crop b, blur b) x n
    assert flips.shape == (4, n)
    bound = 4 * np.sqrt(2 * n * 0.25)
    for name, rows in (("crop", [0, 2]), ("blur", [1, 3])):
        count = int(flips[rows].sum())
        assert abs(count - n) < bound, (name, count)
    # The four flips are independent draws: pairwise agreement near 1/2, not 0 or 1.
    for i in range(4):
        for j in range(i + 1, 4):
            agree = float((flips[i] == flips[j]).float().mean())
            assert 0.3 < agree < 0.7, (i, j, agree)
    a = torch.cat([b.views[0] for b in batches])
    b = torch.cat([b.views[1] for b in batches])
    differ = (a - b).abs().flatten(1).amax(1) > 1e-4
    untouched = ~flips.any(0)  # neither view cropped nor blurred: both are the plain view
    assert untouched.any() and not differ[untouched].any()
    assert differ[~untouched].float().mean() > 0.9


def test_crop_is_a_window_of_the_chosen_fraction(tmp_path):
    """crop_scale=(0.5, 0.5) on 16x16 images resized to 8: a crop view is exactly an 8x8 window of
    the image (no resampling), at a position that varies between samples."""
    images = noise_images(40, 16, 16, seed=4)
    root = tmp_path / "ds"
    make_dataset(root, images, 40)
    batches = epoch(loader(root, 1, 0, 20, crop_p=1.0, blur_p=0.0, crop_scale=[0.5, 0.5]), 0)
    spec = ViewSpec(8, MEAN, STD)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    corners = set()
    for bt in batches:
        assert bt.flips[[0, 2]].all() and not bt.flips[[1, 3]].any()
        for k, va, vb in zip(bt.keys, *bt.views, strict=True):
            img = torch.from_numpy(images[int(k[1:])]).permute(2, 0, 1).float() / 255
            for v in (va, vb):
                found = [(t, left) for t in range(9) for left in range(9)
                         if torch.allclose(v, (img[:, t:t + 8, left:left + 8] - mean) / std, atol=1e-4)]
                assert len(found) == 1, (k, found)
                corners.add(found[0])
    assert len(corners) > 10 and spec.image_size == 8


@pytest.mark.parametrize(("fmt", "hw", "size", "mean_tol", "max_tol"), [
    # Downscaling 40x48 -> 32: DALI's and torch's antialiased linear filters differ slightly (the
    # tolerances of test_augment_dali.test_plain_views_match_torch, normalised units).
    ("png", (40, 48), 32, 5e-3, 0.1),
    ("png", (8, 8), 8, 1e-5, 1e-5),  # same size: no resampling, only float rounding
    # JPEG: DALI's CPU decoder and PIL agreed to float rounding here (measured mean 4.5e-4, max
    # 0.024 after the resize), so the PNG tolerances hold.
    ("jpg", (40, 48), 32, 5e-3, 0.1),
])
def test_plain_views_match_torch(tmp_path, fmt, hw, size, mean_tol, max_tol):
    root = tmp_path / "ds"
    encoded = make_dataset(root, smooth_images(24, *hw, seed=5), 10, fmt=fmt)
    spec = ViewSpec(size, MEAN, STD, crop_p=0.0, blur_p=0.0)
    batches = epoch(loader(root, 2, 0, 6, image_size=size, crop_p=0.0, blur_p=0.0), 0)
    assert not any(b.flips.any() for b in batches)
    for bt in batches:
        ref = torch.stack([plain_view(decode_rgb(encoded[k]), spec) for k in bt.keys])
        for v in bt.views:
            diff = (v - ref).abs()
            assert diff.mean() < mean_tol and diff.max() < max_tol, (diff.mean(), diff.max())


def test_unlabeled_split(tmp_path):
    root = tmp_path / "ds"
    make_dataset(root, noise_images(20, 6, 6), 8, labeled=False)
    batches = epoch(loader(root, 2, 1, 4), 0)
    assert len(batches) == 5 and all(b.labels.tolist() == [-1] * 2 for b in batches)


def test_corrupt_image_stops_with_the_shard_named(tmp_path):
    root = tmp_path / "ds"
    images = smooth_images(20, 12, 12, seed=6)
    make_dataset(root, images, 10)
    # Rewrite shard 1 with a truncated PNG in it (same sample count and keys).
    bad = [Sample(f"k{i:05d}", encode_png(images[i]), "png", i % 4) for i in range(20)]
    bad[13] = Sample("k00013", bad[13].image[: len(bad[13].image) // 2], "png", 1)
    write_shards(bad, root, source="t", split="train", classes=list("abcd"), max_count=10, progress=False,
                 resume=False)
    epoch(loader(root, 2, 0, 4), 0)  # rank 0 reads shard 0 only: fine
    with pytest.raises(DataError, match=r"rank 1.*shard-000001\.tar.*data.loader=dali or torch"):
        epoch(loader(root, 2, 1, 4), 0)


def test_config_and_eval_use_the_plan_path(tmp_path):
    cfg = load_config(None, ["data.loader=dali_reader", "data.num_workers=0"])
    assert cfg.data.loader == "dali_reader"
    root = tmp_path / "ds"
    make_dataset(root, noise_images(7, 6, 6), 3)
    ev = build_eval_loader(root, cfg.data, world_size=2, rank=1, batch_size=2, image_size=6, mean=MEAN, std=STD,
                           device=CPU)
    assert ev.backend == "dali"  # every sample exactly once, in order
    assert [k for b in ev for k in b.keys] == ["k00004", "k00005", "k00006"]
