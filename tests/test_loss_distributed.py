"""The heart of the project: under DDP, loss and head gradients equal one process on the whole batch.

Each case spawns W gloo processes on CPU; rank r takes an unequal slice of a fixed random batch of
backbone features, runs head -> loss -> backward through DDP (which averages gradients over ranks),
and rank 0 saves what it got. The reference is a single process on the concatenated batch.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from scp_dist.loss import scp_loss
from scp_dist.models.head import SCPHead
from tests.dist_helpers import run_gloo

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]  # several processes or whole jobs: tens of seconds

D_IN, K = 12, 5


def make_inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    fa = torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    fb = fa + 0.3 * torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    return fa, fb


def make_head(heads: int) -> SCPHead:
    return SCPHead(D_IN, [16, 8], K, num_heads=heads, seed=7).double()


def step(head: torch.nn.Module, fa, fb, alpha, reduction):
    out = scp_loss(head(fa), head(fb), alpha=alpha, ce_reduction=reduction)
    out.loss.backward()
    return out


def _worker(rank, world, sizes, heads, alpha, reduction, out_path):
    fa, fb = make_inputs(sum(sizes))
    lo = sum(sizes[:rank])
    sl = slice(lo, lo + sizes[rank])
    model = DDP(make_head(heads))
    out = step(model, fa[sl], fb[sl], alpha, reduction)
    grads = [p.grad.clone() for p in model.module.parameters()]
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, (out.total, out.ce, out.con, out.entropy, grads))
    if rank == 0:
        torch.save(gathered, out_path)
    del model


CASES = [
    pytest.param([16], 1, 1.0, "sum", id="w1"),
    pytest.param([5, 11], 1, 1.0, "sum", id="w2-unequal"),
    pytest.param([7, 1, 8], 2, 2.0, "sum", id="w3-unequal-2heads"),
    pytest.param([9, 0, 7], 1, 3.0, "mean", id="w3-empty-rank-mean"),
]


@pytest.mark.parametrize("sizes,heads,alpha,reduction", CASES)
def test_ddp_loss_and_grads_equal_single_process(tmp_path, sizes, heads, alpha, reduction):
    out_path = tmp_path / "ranks.pt"
    run_gloo(_worker, len(sizes), sizes, heads, alpha, reduction, str(out_path))
    per_rank = torch.load(out_path)

    fa, fb = make_inputs(sum(sizes))
    ref_head = make_head(heads)
    ref = step(ref_head, fa, fb, alpha, reduction)
    ref_grads = [p.grad for p in ref_head.parameters()]

    for total, ce, con, ent, grads in per_rank:
        for got, want in ((total, ref.total), (ce, ref.ce), (con, ref.con), (ent, ref.entropy)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
        for g, r in zip(grads, ref_grads, strict=True):
            rel = (g - r).norm() / r.norm()
            assert rel <= 1e-5, f"gradient relative error {rel:.2e}"


def _naive_worker(rank, world, sizes, out_path):
    """Counter-check: a loss computed per rank on LOCAL batch terms (what a careless port does)
    gives different gradients, so the test above can tell right from wrong."""
    fa, fb = make_inputs(sum(sizes))
    lo = sum(sizes[:rank])
    sl = slice(lo, lo + sizes[rank])
    model = DDP(make_head(1))
    import scp_dist.distributed as D

    D_all_gather = D.all_gather_stack
    D.all_gather_stack = lambda t: t.unsqueeze(0)  # local-only batch terms
    try:
        step(model, fa[sl], fb[sl], 1.0, "sum")
    finally:
        D.all_gather_stack = D_all_gather
    if rank == 0:
        torch.save([p.grad.clone() for p in model.module.parameters()], out_path)
    del model


def test_local_batch_terms_would_be_wrong(tmp_path):
    sizes = [5, 11]
    out_path = tmp_path / "naive.pt"
    run_gloo(_naive_worker, 2, sizes, str(out_path))
    grads = torch.load(out_path)
    fa, fb = make_inputs(sum(sizes))
    ref_head = make_head(1)
    step(ref_head, fa, fb, 1.0, "sum")
    rel = max(float((g - p.grad).norm() / p.grad.norm()) for g, p in zip(grads, ref_head.parameters(), strict=True))
    assert rel > 1e-3
