"""The SCP loss in one process: the paper's formula, stability, gradients, multi-head batching."""

import math

import pytest
import torch

from scp_dist.loss import scp_loss


def naive_terms(za: torch.Tensor, zb: torch.Tensor, alpha: float, reduction: str = "sum"):
    """The paper's formulas written out plainly on probabilities (reference, not the implementation)."""
    ya, yb = za.softmax(-1), zb.softmax(-1)
    n = za.shape[0]
    l_e = -(ya * yb.log()).sum()
    if reduction == "mean":
        l_e = l_e / n
    l_con = -torch.log((ya * yb).sum())
    pa, pb = ya.mean(0), yb.mean(0)
    h = -(pa * pa.log()).sum() - (pb * pb.log()).sum()
    return l_e, l_con, h, l_e + l_con - alpha * h


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_matches_paper_formula(reduction):
    g = torch.Generator().manual_seed(0)
    za = torch.randn(37, 6, generator=g, dtype=torch.float64)
    zb = torch.randn(37, 6, generator=g, dtype=torch.float64)
    out = scp_loss(za, zb, alpha=2.0, ce_reduction=reduction)
    l_e, l_con, h, total = naive_terms(za, zb, 2.0, reduction)
    torch.testing.assert_close(out.ce[0], l_e)
    torch.testing.assert_close(out.con[0], l_con)
    torch.testing.assert_close(out.entropy[0], h)
    torch.testing.assert_close(out.total[0], total)
    torch.testing.assert_close(out.loss, total)  # one process: backward loss == reported loss
    assert out.batch_size == 37


def test_gradients_match_naive_formula():
    g = torch.Generator().manual_seed(1)
    za = torch.randn(20, 5, generator=g, dtype=torch.float64, requires_grad=True)
    zb = torch.randn(20, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ga = torch.autograd.grad(scp_loss(za, zb, alpha=1.5).loss, (za, zb))
    gb = torch.autograd.grad(naive_terms(za, zb, 1.5)[3], (za, zb))
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda a, b: scp_loss(a, b, alpha=1.0).loss, (za, zb))


def test_entropy_bounds_and_collapse():
    k = 8
    uniform = torch.zeros(16, k)
    # Uniform predictions on both views: each marginal is uniform, H = 2 log K.
    assert math.isclose(float(scp_loss(uniform, uniform).entropy[0]), 2 * math.log(k), rel_tol=1e-5)
    collapsed = torch.full((16, k), -1e4)
    collapsed[:, 0] = 1e4
    out = scp_loss(collapsed, collapsed)
    assert float(out.entropy[0]) == pytest.approx(0.0, abs=1e-5)


def test_one_hot_and_near_zero_probabilities_stay_finite():
    k = 4
    za = torch.full((8, k), -1e4, requires_grad=True)
    zb = torch.full((8, k), -1e4, requires_grad=True)
    with torch.no_grad():
        za[:, 0] = 1e4  # every sample one-hot on cluster 0 in view a
        zb[:, 1] = 1e4  # and on cluster 1 in view b: zero agreement, log(0) in a naive L_con
    out = scp_loss(za, zb, alpha=1.0)
    for t in (out.total, out.ce, out.con, out.entropy, out.loss):
        assert torch.isfinite(t).all(), t
    out.loss.backward()
    assert torch.isfinite(za.grad).all() and torch.isfinite(zb.grad).all()
    # Empty clusters (P_k = 0) also keep gradients finite.
    zc = torch.randn(8, k, requires_grad=True)
    scp_loss(zc, zc.detach() * 50).loss.backward()
    assert torch.isfinite(zc.grad).all()


def test_multi_head_equals_separate_heads():
    g = torch.Generator().manual_seed(2)
    za = torch.randn(3, 10, 4, generator=g, dtype=torch.float64)
    zb = torch.randn(3, 10, 4, generator=g, dtype=torch.float64)
    alphas = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    out = scp_loss(za, zb, alpha=alphas)
    for h in range(3):
        single = scp_loss(za[h], zb[h], alpha=float(alphas[h]))
        torch.testing.assert_close(out.total[h], single.total[0])
        torch.testing.assert_close(out.entropy[h], single.entropy[0])
    torch.testing.assert_close(out.loss, out.total.sum())


def test_bf16_logits_are_upcast():
    za = torch.randn(6, 3).bfloat16()
    out = scp_loss(za, za)
    assert out.total.dtype == torch.float32 and torch.isfinite(out.total).all()


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        scp_loss(torch.zeros(4, 3), torch.zeros(4, 5))
