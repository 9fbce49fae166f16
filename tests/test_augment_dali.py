"""The DALI backend's views (CPU-only DALI here): agreement with augment_torch, draw frequencies,
determinism, corrupt images, and the loader end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

pytest.importorskip("nvidia.dali")

from scp_dist.config import AugmentConfig, DataConfig  # noqa: E402
from scp_dist.data.augment_dali import DaliViews  # noqa: E402
from scp_dist.data.augment_torch import ViewSpec, decode_rgb, plain_view, sample_rng, two_views  # noqa: E402
from scp_dist.data.loader import Batch, build_train_loader  # noqa: E402
from scp_dist.data.reader import CORRUPT_IMAGE, RawSample  # noqa: E402
from scp_dist.shards.sources import encode_png, prepare_digits  # noqa: E402

CPU = torch.device("cpu")
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def smooth_images(n: int, h: int, w: int, seed: int = 0) -> list[np.ndarray]:
    """Random low-frequency RGB images: resize differences stay small, unlike on pixel noise."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((n, 3, h // 4 + 2, w // 4 + 2))).float()
    x = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
    return list((x * 255).round().byte().permute(0, 2, 3, 1).numpy())


def raw_batch(images: list[np.ndarray], first_index: int = 0) -> list[RawSample]:
    return [RawSample(first_index + i, f"k{first_index + i:05d}", encode_png(im), "png", i % 5)
            for i, im in enumerate(images)]


def run(dv: DaliViews, raws: list[RawSample], epoch: int = 0, skipped=None) -> Batch:
    return dv(Batch([], [], torch.zeros(0, dtype=torch.int64), list(skipped or []), raw=raws), epoch)


def torch_plain(raws: list[RawSample], spec: ViewSpec) -> torch.Tensor:
    return torch.stack([plain_view(decode_rgb(r.image), spec) for r in raws])


@pytest.mark.parametrize(("hw", "size", "mean_tol", "max_tol"), [
    # Downscaling 48x40 -> 32: DALI's and torch's antialiased linear filters differ slightly.
    # Normalised units (std 0.2..0.3). Measured mean 3e-4, max 0.016; resizing without antialias
    # would be off by a mean of ~0.04, so 5e-3 still tells the filters apart.
    ((40, 48), 32, 5e-3, 0.1),
    ((8, 8), 8, 1e-5, 1e-5),  # same size: no resampling at all, so only float rounding
])
def test_plain_views_match_torch(hw, size, mean_tol, max_tol):
    raws = raw_batch(smooth_images(12, *hw))
    spec = ViewSpec(size, MEAN, STD, crop_p=0.0, blur_p=0.0)
    ref = torch_plain(raws, spec)
    train = run(DaliViews(spec, two_views=True, seed=0, device=CPU), raws)
    evalb = run(DaliViews(spec, two_views=False, seed=0, device=CPU), raws)
    assert len(train.views) == 2 and len(evalb.views) == 1
    for v in (*train.views, *evalb.views):
        assert v.shape == (12, 3, size, size) and v.dtype == torch.float32
        diff = (v - ref).abs()
        assert diff.mean() < mean_tol and diff.max() < max_tol, (diff.mean(), diff.max())
    assert train.keys == evalb.keys == [r.key for r in raws]
    assert train.labels.tolist() == [r.label for r in raws] and train.raw is None


def test_augmented_views_follow_the_torch_backends_draws():
    """Both backends draw from sample_rng(seed, epoch, index): same crops and blurs, close pixels."""
    raws = raw_batch(smooth_images(24, 40, 48, seed=1), first_index=100)
    spec = ViewSpec(32, MEAN, STD, crop_p=0.5, blur_p=0.5)
    b = run(DaliViews(spec, two_views=True, seed=7, device=CPU, return_draws=True), raws, epoch=3)
    ref = [two_views(decode_rgb(r.image), spec, sample_rng(7, 3, r.index)) for r in raws]
    for v in range(2):
        diff = (b.views[v] - torch.stack([p[v] for p in ref])).abs()
        # Measured: mean 3e-4, max 0.06 (blur/crop edges); a draw from another epoch gives mean ~0.7.
        assert diff.mean() < 5e-3 and diff.max() < 0.25, (v, diff.mean(), diff.max())
    assert b.draws["crop"].any() and b.draws["blur"].any() and not b.draws["crop"].all()


def test_draw_frequencies_and_views_differ():
    n = 1000  # 2000 views
    raws = raw_batch(smooth_images(n, 12, 14, seed=2))
    spec = ViewSpec(8, MEAN, STD, crop_p=0.5, blur_p=0.5, crop_scale=(0.5, 1.0), blur_sigma=(0.5, 2.0))
    b = run(DaliViews(spec, two_views=True, seed=0, device=CPU, return_draws=True), raws)
    assert b.draws["crop"].shape == b.draws["blur"].shape == (2, n)
    bound = 4 * np.sqrt(2 * n * 0.25)
    for name in ("crop", "blur"):
        assert abs(int(b.draws[name].sum()) - n) < bound, (name, int(b.draws[name].sum()))
    a, bb = b.views
    differ = (a - bb).abs().flatten(1).amax(1) > 1e-4
    assert differ.float().mean() > 0.8
    # Neither view cropped nor blurred: both are the plain view, hence equal.
    untouched = ~(b.draws["crop"].any(0) | b.draws["blur"].any(0))
    assert untouched.any() and not differ[untouched].any()


def test_same_seed_and_epoch_give_same_views():
    raws = raw_batch(smooth_images(16, 20, 24, seed=3))
    spec = ViewSpec(16, MEAN, STD)
    dv = DaliViews(spec, two_views=True, seed=5, device=CPU)
    first = run(dv, raws, epoch=1).views
    again = run(DaliViews(spec, two_views=True, seed=5, device=CPU), raws, epoch=1).views
    for x, y in zip(first, again, strict=True):
        assert torch.equal(x, y)
    # A sample's views do not depend on its batch: same views when it comes alone.
    alone = run(dv, raws[3:4], epoch=1).views
    assert all(torch.equal(x[3:4], y) for x, y in zip(first, alone, strict=True))
    other_epoch = run(dv, raws, epoch=2).views
    other_seed = run(DaliViews(spec, two_views=True, seed=6, device=CPU), raws, epoch=1).views
    for other in (other_epoch, other_seed):
        assert not torch.equal(first[0], other[0]) and not torch.equal(first[1], other[1])


def test_corrupt_images_are_skipped_and_the_rest_kept():
    rng = np.random.default_rng(4)
    raws = raw_batch(smooth_images(6, 20, 24, seed=4))
    good = [raws[i] for i in (0, 2, 4, 5)]
    garbage = b"\x89PNG\r\n\x1a\n" + rng.integers(0, 256, 300, dtype=np.uint8).tobytes()  # header unreadable
    truncated = raws[3].image[: len(raws[3].image) // 2]  # header fine: DALI fails the whole batch on it
    raws[1] = RawSample(1, "bad_garbage", garbage, "png", 0)
    raws[3] = RawSample(3, "bad_truncated", truncated, "png", 0)
    spec = ViewSpec(16, MEAN, STD, crop_p=0.0, blur_p=0.0)
    dv = DaliViews(spec, two_views=True, seed=0, device=CPU)
    earlier = ("missing_shard", "kx", "from the reader")
    b = run(dv, raws, skipped=[earlier])
    assert b.skipped[0] == earlier
    bad = {(CORRUPT_IMAGE, "bad_garbage"), (CORRUPT_IMAGE, "bad_truncated")}
    assert {(r, k) for r, k, _ in b.skipped[1:]} == bad
    assert all(detail for _, _, detail in b.skipped)
    assert b.keys == [r.key for r in good] and b.labels.tolist() == [r.label for r in good]
    ref = torch_plain(good, spec)
    for v in b.views:
        assert v.shape == (4, 3, 16, 16) and (v - ref).abs().mean() < 5e-3
    # The pipeline still works after the failure, and an all-bad batch gives empty views.
    assert run(dv, good).keys == b.keys
    empty = run(dv, [raws[1], raws[3]])
    assert [v.shape for v in empty.views] == [(0, 3, 16, 16)] * 2
    assert empty.keys == [] and len(empty.skipped) == 2


@pytest.mark.slow
def test_train_loader_dali_matches_torch_backend(tmp_path):
    prepare_digits(tmp_path)
    aug = OmegaConf.structured(AugmentConfig())

    def loader(backend: str):
        cfg = OmegaConf.structured(DataConfig(loader=backend, num_workers=0))
        return build_train_loader(tmp_path / "train", cfg, aug, world_size=1, rank=0, global_batch=256,
                                  image_size=8, mean=(0.5,) * 3, std=(0.5,) * 3, seed=0, device=CPU)

    dali, ref = loader("dali"), loader("torch")
    assert dali.backend == "dali" and ref.backend == "torch"
    steps = 0
    for bd, bt in zip(dali, ref, strict=True):
        steps += 1
        assert bd.keys == bt.keys and torch.equal(bd.labels, bt.labels) and not bd.skipped
        for vd, vt in zip(bd.views, bt.views, strict=True):
            assert vd.shape == (256, 3, 8, 8)
            # Same draws as the torch backend. Crops of the 8x8 digits are scaled UP to 8, where DALI's
            # and torch's linear filters coincide (measured mean diff 5e-8; a vs b differ by ~0.4).
            assert (vd - vt).abs().mean() < 1e-3
    assert steps == 1797 // 256 and dali.stats.as_dict()[CORRUPT_IMAGE] == 0
