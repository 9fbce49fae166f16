"""Many clusters (issue 12): the EMA marginal estimate (loss.marginal=ema) is world-size invariant,
and the large-K rehearsal's CI slice runs through the job's cached-feature path and reports numbers.

The default path (loss.marginal=batch) keeps its exactness tests in tests/test_loss_distributed.py
and tests/test_world_size.py; tests/test_loss.py checks the estimate's update, value and gradient.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from scp_dist.loss import MarginalEstimate, scp_loss
from scp_dist.models.head import SCPHead
from tests.dist_helpers import run_gloo

D_IN, K, STEPS, MOMENTUM = 10, 6, 4, 0.7


def _batches(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """STEPS global batches of n samples (two views), in float64."""
    g = torch.Generator().manual_seed(99)
    fa = torch.randn(STEPS, n, D_IN, generator=g, dtype=torch.float64)
    return fa, fa + 0.3 * torch.randn(STEPS, n, D_IN, generator=g, dtype=torch.float64)


def _train(model: torch.nn.Module, head: SCPHead, fa: torch.Tensor, fb: torch.Tensor) -> tuple[MarginalEstimate, list]:
    """STEPS steps of head -> scp_loss(ema) -> backward -> SGD; returns the estimate and the entropies."""
    est = MarginalEstimate(2, K, MOMENTUM)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    entropies = []
    for t in range(STEPS):
        out = scp_loss(model(fa[t]), model(fb[t]), alpha=2.0, ce_reduction="mean", marginal=est)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        entropies.append(out.entropy)
    return est, entropies


def _head() -> SCPHead:
    return SCPHead(D_IN, [12], K, num_heads=2, seed=3).double()


def _worker(rank: int, world: int, sizes: list[int], out_path: str) -> None:
    fa, fb = _batches(sum(sizes))
    lo = sum(sizes[:rank])
    sl = slice(lo, lo + sizes[rank])
    head = _head()
    model = DDP(head)
    est, entropies = _train(model, head, fa[:, sl], fb[:, sl])
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, (est.state_dict(), entropies, [p.detach().clone() for p in
                                                                                   head.parameters()]))
    if rank == 0:
        torch.save(gathered, out_path)
    del model


@pytest.mark.slow
@pytest.mark.parametrize("sizes", [pytest.param([5, 11], id="w2-unequal"), pytest.param([7, 0, 9], id="w3-empty-rank")])
@pytest.mark.multiprocess
def test_ema_state_and_training_are_world_size_invariant(tmp_path, sizes):
    """W gloo ranks with unequal shares of each global batch: every rank holds the same EMA state
    (bit for bit), and state, logged entropy and trained head equal one process on the whole batch."""
    out_path = tmp_path / "ranks.pt"
    run_gloo(_worker, len(sizes), sizes, str(out_path))
    per_rank = torch.load(out_path, weights_only=False)

    fa, fb = _batches(sum(sizes))
    head = _head()
    ref_est, ref_entropies = _train(head, head, fa, fb)

    first = per_rank[0][0]
    for state, entropies, params in per_rank:
        assert torch.equal(state["ema"], first["ema"]) and int(state["steps"]) == STEPS  # identical on every rank
        torch.testing.assert_close(state["ema"], ref_est.ema, rtol=1e-10, atol=1e-12)
        for got, want in zip(entropies, ref_entropies, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        for p, r in zip(params, head.parameters(), strict=True):
            torch.testing.assert_close(p, r.detach(), rtol=1e-8, atol=1e-10)


@pytest.mark.slow
@pytest.mark.bench
def test_ci_slice_runs_through_the_job_and_reports(tmp_path, monkeypatch):
    """The rehearsal's CI slice: synthetic features in the feature cache's format, read by the job
    (train.train, cached mode) without re-extraction, batch and EMA cells, JSON and markdown with
    numbers next to k-means."""
    from benchmarks import largek
    from scp_dist import train as job

    if "marginal" not in __import__("inspect").signature(job.train_step).parameters:
        pytest.fail("scp_dist/train.py does not wire loss.marginal yet (train_step(..., marginal=...)); "
                    "see docs/RESULTS.md, 'Many clusters (K = 1,000)'")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    preset = largek.PRESETS["ci"]()
    sp = next(iter(preset.synth.values()))
    work, out = tmp_path / "work", tmp_path / "results" / "largek-ci.json"
    base, plain, y = largek.prepare(work, sp, preset.seeds, preset.num_pairs)
    parts = sorted(p for p in work.rglob("*.npy"))
    stamps = {p: p.stat().st_mtime_ns for p in parts}

    record = largek.run("ci", work, out, log=lambda s: None)

    assert {p: p.stat().st_mtime_ns for p in parts} == stamps  # the job read the cache, never rewrote it
    from scp_dist.feature_cache import load_kind

    cached = load_kind(next(work.glob("cache-*")), "train", "plain")
    np.testing.assert_array_equal(cached.labels, y)
    np.testing.assert_allclose(cached.feats[0].float().numpy(), plain, atol=2e-2, rtol=2e-3)  # fp16 storage

    saved = json.loads(out.read_text())
    assert saved["runs"] == record["runs"] and len(saved["runs"]) == len(preset.cells) * len(preset.seeds)
    for r in saved["runs"]:
        assert all(0.0 <= r[m] <= 1.0 for m in ("acc", "nmi", "ari"))
        assert 1 <= r["used"] <= sp.k and r["final"]["entropy"] > 0
    assert {c["marginal"] for c in saved["cells"]} == {"batch", "ema"}
    assert 0.0 < saved["kmeans"][str(sp.k)]["0"]["acc"] <= 1.0

    md = largek.update_markdown(out.parent, tmp_path / "largek.md").read_text()
    assert "k-means (faiss)" in md and "EMA 0.9" in md and "ΔACC vs k-means" in md
    # A rerun finds every run done and trains nothing.
    again = largek.run("ci", work, out, log=lambda s: None)
    assert again["runs"] == record["runs"]
