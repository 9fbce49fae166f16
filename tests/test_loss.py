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


# ---------------------------------------------------------------- loss.marginal=ema (MarginalEstimate)


def _logits(seed: int, heads: int = 2, n: int = 24, k: int = 9, grad: bool = True):
    g = torch.Generator().manual_seed(seed)
    za = torch.randn(heads, n, k, generator=g, dtype=torch.float64, requires_grad=grad)
    zb = torch.randn(heads, n, k, generator=g, dtype=torch.float64, requires_grad=grad)
    return za, zb


def _grads(out, za, zb):
    return torch.autograd.grad(out.loss, (za, zb))


def test_marginal_none_is_the_batch_loss_bit_for_bit():
    za, zb = _logits(10)
    ref = scp_loss(za, zb, alpha=1.5, ce_reduction="mean")
    got = scp_loss(za, zb, alpha=1.5, ce_reduction="mean", marginal=None)
    for name in ("total", "ce", "con", "entropy", "loss"):
        assert torch.equal(getattr(ref, name), getattr(got, name)), name
    for a, b in zip(_grads(ref, za, zb), _grads(got, za, zb), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("momentum", [0.0, 0.9, 0.999])
def test_ema_first_step_and_zero_momentum_equal_the_batch_loss(momentum):
    """Bias correction: step 1 of any momentum, and every step of momentum 0, is the batch loss."""
    from scp_dist.loss import MarginalEstimate

    est = MarginalEstimate(2, 9, momentum)
    for step in range(3 if momentum == 0.0 else 1):
        za, zb = _logits(20 + step)
        ref = scp_loss(za, zb, alpha=1.3, ce_reduction="mean")
        got = scp_loss(za, zb, alpha=1.3, ce_reduction="mean", marginal=est)
        torch.testing.assert_close(got.entropy, ref.entropy)
        torch.testing.assert_close(got.total, ref.total)
        for a, b in zip(_grads(got, za, zb), _grads(ref, za, zb), strict=True):
            torch.testing.assert_close(a, b)
    assert int(est.steps) == (3 if momentum == 0.0 else 1)


def test_ema_update_value_and_gradient():
    """E_t = m E_{t-1} + (1-m) P_t, Q = E_t / (1 - m^t); the logged entropy is H(Q) over both views and
    the gradient is that of -sum_k log(Q_k).detach() * P_k (P: this batch's marginals)."""
    from scp_dist.loss import MarginalEstimate

    m, k = 0.8, 9
    est = MarginalEstimate(2, k, m)
    ema = torch.zeros(2, 2, k, dtype=torch.float64)
    for t in range(1, 5):
        za, zb = _logits(30 + t)
        out = scp_loss(za, zb, alpha=2.0, ce_reduction="mean", marginal=est)
        p = torch.stack([za.softmax(-1).mean(1), zb.softmax(-1).mean(1)], dim=1)  # (H, 2, K)
        ema = m * ema + (1 - m) * p.detach()
        q = ema / (1 - m**t)
        torch.testing.assert_close(est.ema, ema)
        torch.testing.assert_close(est.estimate(), q)
        torch.testing.assert_close(out.entropy, -(q * q.log()).sum(dim=(-2, -1)))
        no_entropy = scp_loss(za, zb, alpha=0.0, ce_reduction="mean")  # L_e and L_con are untouched
        want = no_entropy.loss - 2.0 * (-(p * q.log()).sum())
        for a, b in zip(_grads(out, za, zb), torch.autograd.grad(want, (za, zb)), strict=True):
            torch.testing.assert_close(a, b)


def test_ema_state_dict_resumes_exactly():
    from scp_dist.loss import MarginalEstimate

    whole, first = MarginalEstimate(2, 9, 0.95), MarginalEstimate(2, 9, 0.95)
    for t in range(3):
        za, zb = _logits(40 + t, grad=False)
        scp_loss(za, zb, marginal=whole)
        scp_loss(za, zb, marginal=first)
    state = torch.load(_roundtrip(first.state_dict()), weights_only=True)
    resumed = MarginalEstimate(2, 9, 0.95)
    resumed.load_state_dict(state)
    for t in range(3, 6):
        za, zb = _logits(40 + t, grad=False)
        a, b = scp_loss(za, zb, marginal=whole), scp_loss(za, zb, marginal=resumed)
        assert torch.equal(a.entropy, b.entropy) and torch.equal(a.total, b.total)
    assert torch.equal(whole.ema, resumed.ema) and int(whole.steps) == int(resumed.steps) == 6
    with pytest.raises(ValueError, match="shape"):
        MarginalEstimate(3, 9, 0.95).load_state_dict(state)


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_ema_heads_are_independent():
    from scp_dist.loss import MarginalEstimate

    za, zb = _logits(50, heads=3, grad=False)
    together = MarginalEstimate(3, 9, 0.9)
    out = scp_loss(za, zb, marginal=together)
    for h in range(3):
        alone = MarginalEstimate(1, 9, 0.9)
        torch.testing.assert_close(scp_loss(za[h], zb[h], marginal=alone).entropy[0], out.entropy[h])
        torch.testing.assert_close(alone.ema[0], together.ema[h])


def test_build_marginal_and_config_keys():
    from scp_dist.config import ConfigError, load_config
    from scp_dist.loss import MarginalEstimate, build_marginal

    assert build_marginal(load_config(None).loss, 1, 10) is None  # the default: the exact batch entropy
    cfg = load_config(None, ["loss.marginal=ema", "loss.ema_momentum=0.99", "head.num_clusters=7"])
    est = build_marginal(cfg.loss, 2, cfg.head.num_clusters, "cpu")
    assert isinstance(est, MarginalEstimate) and est.momentum == 0.99 and tuple(est.ema.shape) == (2, 2, 7)
    with pytest.raises(ConfigError, match="loss.marginal"):
        load_config(None, ["loss.marginal=window"])
    with pytest.raises(ConfigError, match="loss.ema_momentum"):
        load_config(None, ["loss.marginal=ema", "loss.ema_momentum=1.0"])
