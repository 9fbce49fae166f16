"""GPU acceptance tests (marker `gpu`): what only a GPU run can show. Without CUDA they are skipped
(tests/conftest.py); `bash launch/gpu_check.sh` runs them on the GPU, and its dry run runs them on
the CPU (SCP_GPU_TESTS_ON_CPU=1) at small sizes so they cannot rot: there the GPU-vs-CPU
comparisons degenerate to CPU vs CPU, and what exists only on a GPU (inductor, NCCL, the job on
CUDA) skips.

Sizes stay small even on the GPU: the whole file has about two minutes in the GPU check.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.helpers import overrides, run_cli

pytestmark = pytest.mark.gpu

GPU = torch.cuda.is_available()
DEV = torch.device("cuda", 0) if GPU else torch.device("cpu")
CPU = torch.device("cpu")
MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


def gpu_only(what: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not GPU, reason=f"{what} exists only on a GPU")


# --- DALI: mixed (nvJPEG) decode + GPU views vs DALI's CPU mode -------------------------------------


def jpeg_raws(n: int, h: int, w: int, seed: int = 0) -> list:
    """Smooth random RGB images as JPEG samples (4:2:0, as photos are): low frequencies keep the
    decoders' rounding differences small, unlike pixel noise."""
    from scp_dist.data.reader import RawSample

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        coarse = rng.random((h // 8 + 1, w // 8 + 1, 3)) * 255
        img = Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=95)
        out.append(RawSample(i, f"k{i:04d}", buf.getvalue(), "jpg", i % 3))
    return out


def run_views(dv, raws: list):
    from scp_dist.data.batch import Batch

    return dv(Batch([], [], torch.zeros(0, dtype=torch.int64), [], raw=raws), 0)


@pytest.mark.parametrize("two_views", [False, True], ids=["eval-view", "train-views"])
def test_dali_mixed_decode_matches_cpu_decode(two_views):
    pytest.importorskip("nvidia.dali")
    from scp_dist.data.augment_dali import DaliViews
    from scp_dist.data.augment_torch import ViewSpec

    raws = jpeg_raws(12, 60, 80)
    # Default crop/blur probabilities: the draws come from the host-side generator, so the GPU
    # pipeline crops and blurs exactly what the CPU one does.
    spec = ViewSpec(32, MEAN, STD)
    dev = run_views(DaliViews(spec, two_views=two_views, seed=3, device=DEV), raws)
    ref = run_views(DaliViews(spec, two_views=two_views, seed=3, device=CPU), raws)
    assert dev.keys == ref.keys == [r.key for r in raws] and not dev.skipped
    assert len(dev.views) == len(ref.views) == (2 if two_views else 1)
    for v, r in zip(dev.views, ref.views, strict=True):
        assert v.device.type == DEV.type and v.dtype == torch.float32 and v.shape == r.shape == (12, 3, 32, 32)
        v = v.cpu()
        assert torch.isfinite(v).all()
        diff = (v - r).abs()
        # nvJPEG and libjpeg-turbo round the IDCT and the chroma upsampling differently (a level or
        # two of 255 = 0.015-0.03 here); swapped channels, a missing normalisation or other draws
        # are off by 0.3 or more.
        assert diff.mean() < 0.05 and diff.max() < 2.0, (float(diff.mean()), float(diff.max()))
        assert abs(float(v.min() - r.min())) < 0.3 and abs(float(v.max() - r.max())) < 0.3


def test_dali_train_loader_on_the_device_matches_torch_backend(digits_root):
    pytest.importorskip("nvidia.dali")
    pytest.importorskip("omegaconf")
    from omegaconf import OmegaConf

    from scp_dist.config import AugmentConfig, DataConfig
    from scp_dist.data.loader import build_train_loader

    aug = OmegaConf.structured(AugmentConfig())

    def loader(backend: str, device: torch.device):
        cfg = OmegaConf.structured(DataConfig(loader=backend, num_workers=0))
        return build_train_loader(digits_root / "train", cfg, aug, world_size=1, rank=0, global_batch=256,
                                  image_size=8, mean=(0.5,) * 3, std=(0.5,) * 3, seed=0, device=device)

    dali, ref = loader("dali", DEV), loader("torch", CPU)
    for i, (bd, bt) in enumerate(zip(dali, ref, strict=True)):
        assert bd.keys == bt.keys and torch.equal(bd.labels.cpu(), bt.labels) and not bd.skipped
        for vd, vt in zip(bd.views, bt.views, strict=True):
            assert vd.device.type == DEV.type and vd.shape == (256, 3, 8, 8)
            assert (vd.cpu() - vt).abs().mean() < 1e-2  # CPU mode: 5e-8 (tests/test_augment_dali.py)
        if i == 2:
            break


# --- bf16 autocast --------------------------------------------------------------------------------


def test_bf16_train_step_is_finite_and_close_to_fp32():
    pytest.importorskip("omegaconf")
    from benchmarks.bench.head import cached_features
    from scp_dist.config import load_config
    from scp_dist.models.head import SCPHead
    from scp_dist.train import build_optimizer, train_step

    # The paper's head on CIFAR-10-like features on the GPU; a small one on the CPU, where autocast
    # is off anyway (precision.autocast_context) and this only runs the plumbing.
    n, dim, hidden = (512, 512, [1024, 786, 512, 1024]) if GPU else (64, 32, [32, 16])
    cfg = load_config(None, ["head.num_clusters=10"])
    fa, fb = cached_features(n, dim, 10, DEV)
    feats = torch.cat([fa, fb])
    losses = {}
    for precision in ("fp32", "bf16"):
        head = SCPHead(dim, hidden, 10, num_heads=2, seed=0).to(DEV)
        opt = build_optimizer(cfg, head)
        scaler = torch.amp.GradScaler(DEV.type, enabled=False)
        per_step = [train_step(head, opt, scaler, feats, n, cfg, precision, 1e-3).total.float().cpu()
                    for _ in range(5)]
        losses[precision] = torch.stack(per_step)  # (steps, heads)
        assert all(torch.isfinite(p).all() for p in head.parameters()), precision
    assert torch.isfinite(losses["bf16"]).all()
    # bf16 keeps ~3 significant digits: the losses of 5 steps agree to ~1% (measured with CPU
    # autocast: at most 0.01 on losses of -6 to -8).
    torch.testing.assert_close(losses["bf16"], losses["fp32"], rtol=0.02, atol=0.05)


def test_clip_backbone_bf16_features_close_to_fp32():
    pytest.importorskip("open_clip")
    pytest.importorskip("omegaconf")
    from scp_dist.config import load_config
    from scp_dist.models.backbones import build_backbone
    from scp_dist.precision import autocast_context

    model, size = ("ViT-B-32", 224) if GPU else ("ViT-S-32", 64)
    cfg = load_config(None, ["backbone.name=open_clip", f"backbone.model={model}", "backbone.pretrained=",
                             f"backbone.image_size={size}"])
    backbone = build_backbone(cfg.backbone).to(DEV)
    x = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0)).to(DEV)
    with torch.no_grad():
        f32 = backbone(x)
        with autocast_context(DEV, "bf16"):
            fbf = backbone(x)
    assert f32.dtype == fbf.dtype == torch.float32 and torch.isfinite(fbf).all()
    if GPU:
        assert not torch.equal(f32, fbf), "bf16 autocast changed nothing: did it run in fp32?"
    cos = F.cosine_similarity(f32, fbf, dim=1)
    assert cos.min() > 0.995, cos  # ViT-B-32 under CPU bf16 autocast: 0.9999


# --- faiss ----------------------------------------------------------------------------------------


def test_faiss_kmeans_finds_the_mixture_on_the_device():
    faiss = pytest.importorskip("faiss")
    from benchmarks.bench.kmeans import mixture
    from scp_dist.kmeans import kmeans_fit, kmeans_predict
    from scp_dist.metrics import cluster_acc

    if GPU and getattr(faiss, "get_num_gpus", lambda: 0)() == 0:
        pytest.skip("faiss sees no GPU (faiss-cpu is installed, not a CUDA build)")
    x, labels = mixture(5000, 64, 10)
    km = kmeans_fit(x, 10, seed=0, niter=20, nredo=5, use_gpu=GPU)
    assert cluster_acc(labels, kmeans_predict(km, x)) > 0.9
    if GPU:  # the GPU index reaches the CPU index's objective
        ref = kmeans_fit(x, 10, seed=0, niter=20, nredo=5, use_gpu=False)
        assert abs(km.obj[-1] - ref.obj[-1]) <= 0.02 * abs(ref.obj[-1])


# --- NCCL -----------------------------------------------------------------------------------------


def _nccl_worker(rank: int, world: int, port: int, sizes: list[int], out_path: str) -> None:
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from scp_dist.loss import scp_loss
    from scp_dist.models.head import SCPHead

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    try:
        fa, fb = _nccl_inputs(sum(sizes))
        lo = sum(sizes[:rank])
        dev = torch.device("cuda", rank)
        model = DDP(SCPHead(12, [16, 8], 5, num_heads=2, seed=7).double().to(dev), device_ids=[rank])
        out = scp_loss(model(fa[lo: lo + sizes[rank]].to(dev)), model(fb[lo: lo + sizes[rank]].to(dev)))
        out.loss.backward()
        got = (out.total.cpu(), [p.grad.cpu() for p in model.module.parameters()])
        gathered = [None] * world
        dist.all_gather_object(gathered, got)
        if rank == 0:
            torch.save(gathered, out_path)
    finally:
        dist.destroy_process_group()


def _nccl_inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    fa = torch.randn(n, 12, generator=g, dtype=torch.float64)
    return fa, fa + 0.3 * torch.randn(n, 12, generator=g, dtype=torch.float64)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL across GPUs needs 2+ GPUs (gloo: test_loss_distributed)")
@pytest.mark.multiprocess
def test_nccl_loss_and_gradients_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    from scp_dist.loss import scp_loss
    from scp_dist.models.head import SCPHead
    from tests.dist_helpers import free_port

    sizes = [5, 11]  # unequal per-rank batches, as skipped samples make them
    out_path = tmp_path / "nccl.pt"
    mp.start_processes(_nccl_worker, args=(2, free_port(), sizes, str(out_path)), nprocs=2, join=True,
                       start_method="spawn")
    ranks = torch.load(out_path, weights_only=False)
    head = SCPHead(12, [16, 8], 5, num_heads=2, seed=7).double().cuda()
    fa, fb = _nccl_inputs(sum(sizes))
    ref = scp_loss(head(fa.cuda()), head(fb.cuda()))
    ref.loss.backward()
    for total, grads in ranks:  # every rank: the whole batch's loss, and its gradient after DDP's average
        torch.testing.assert_close(total, ref.total.cpu(), rtol=1e-5, atol=1e-8)
        for g, p in zip(grads, head.parameters(), strict=True):
            assert (g - p.grad.cpu()).norm() <= 1e-5 * p.grad.norm()


# --- the job ------------------------------------------------------------------------------------


@gpu_only("the training job on CUDA (the CPU job: tests/test_train_e2e.py)")
@pytest.mark.multiprocess
def test_training_job_runs_on_the_gpu(tmp_path, digits_root):
    pytest.importorskip("omegaconf")
    # data.loader=auto: DALI's mixed decode where DALI is installed, the torch loader otherwise; the
    # k-means baseline only where faiss imports (a bare GPU host has none).
    try:
        import faiss  # noqa: F401

        kmeans = True
    except ImportError:
        kmeans = False
    args = overrides(tmp_path, digits_root, **{"output.run_name": "gpu", "train.device": "cuda", "train.epochs": 1,
                                               "data.loader": "auto", "output.kmeans": str(kmeans).lower()})
    proc = run_cli(["--config", "demo_digits", *args])
    assert "ACC" in proc.stdout


# --- torch.compile (last: its compile time is the least predictable) -----------------------------


@gpu_only("inductor's GPU code (on the CPU it needs a C compiler and minutes)")
def test_compiled_backbone_forward_equals_eager():
    import shutil

    pytest.importorskip("triton")
    timm = pytest.importorskip("timm")
    if not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        pytest.skip("Triton builds its launcher with a C compiler at run time: none on PATH")
    from scp_dist.models.backbones import TimmBackbone

    # A two-block CLIP ViT-B/32: the product's compile path (Backbone.forward with compile=True)
    # at a fraction of the full model's compile time.
    model = timm.create_model("vit_base_patch32_clip_224", pretrained=False, num_classes=0, depth=2).eval()

    def backbone(compile: bool) -> TimmBackbone:
        return TimmBackbone(model, name="timm", feature_dim=model.num_features, image_size=224, mean=MEAN,
                            std=STD, compile=compile).to(DEV)

    x = torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(DEV)
    compiled = backbone(True)
    with torch.no_grad():
        eager_out = backbone(False)(x)
        compiled_out = compiled(x)
    assert compiled._compiled is not None
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-3, atol=1e-3 * float(eager_out.abs().max()))
