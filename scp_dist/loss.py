"""SCP loss, L = L_e + L_con - alpha * H(Y), with every batch-level term over the GLOBAL batch.

Per rank r with local logits for views a and b:
  L_e   = -sum_i sum_k y^a_ik log y^b_ik          (sum-decomposable over ranks)
  L_con = -log sum_i (y^a_i . y^b_i)             (needs the global sum inside the log)
  H(Y)  = -sum_k (P^a_k log P^a_k + P^b_k log P^b_k),  P = global mean of y over the batch

Exactness under DDP. One all_gather (differentiable) carries each rank's column sums of y^a, y^b and
the log of its local agreement sum, so every rank computes the same global L_con and H. Autograd
through the gather returns to rank r the SUM over ranks of the upstream gradients, i.e. W times the
gradient of the global terms; DDP then AVERAGES over W ranks, which cancels that W. The local L_e
part is not gathered, so it is scaled by W before backward for DDP's averaging to give its sum.
Net effect: after backward + DDP sync, every rank holds exactly the gradient of a single process
on the concatenated batch (tests/test_loss_distributed.py checks this for 1, 2, 3 processes with
unequal per-rank batch sizes).

Logits may carry a leading head dimension (H, N, K) to train many heads in one pass; every term is
then per head, and the backward loss is their sum (heads share no parameters).

Marginal estimate (`loss.marginal`). By default (`batch`) H(Y) is the entropy of this global batch's
marginals, exactly as the paper. With many clusters and a batch that cannot hold each of them a few
times (K = 1,000, batch 512), that estimate is noise and its gradient pushes every batch towards
the clusters it happens to have no samples for. `ema` (`MarginalEstimate`) keeps a running estimate
Q of the marginals over steps instead (docs/RESULTS.md, "Many clusters (K = 1,000)"):

  E_t = m E_{t-1} + (1 - m) P_t            P_t: this step's GLOBAL marginals (detached), per view
  Q_t = E_t / (1 - m^t)                    Adam-style bias correction: Q_1 = P_1, no uniform prior
  H   = -sum_k Q_k log Q_k                 the value that is logged (the estimate's entropy)
  dH  = -sum_k log Q_k dP_k                the gradient, through this batch's P only

The gradient is the exact batch gradient with log P replaced by the low-noise log Q (the `+1` of
d(P log P) vanishes because sum_k dP_k = 0): it pushes predictions towards the clusters that are
rare over the last ~1/(1-m) steps, not towards those rare in this batch. Differentiating H(Q)
itself would scale the term by (1 - m), silently dividing alpha by 1/(1-m); this form keeps alpha's
meaning, and with m = 0 it is the batch loss (same value, same gradient). P_t comes from the one
all_gather above, so E is bit-identical on every rank and the update does not depend on how the
global batch is split over ranks: the world-size exactness holds for `ema` as for `batch`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scp_dist import distributed as D


@dataclass
class LossTerms:
    loss: torch.Tensor  # scalar to call backward() on (scaled for DDP's gradient averaging)
    total: torch.Tensor  # (H,) global L, detached
    ce: torch.Tensor  # (H,) global L_e, detached
    con: torch.Tensor  # (H,) L_con, detached
    entropy: torch.Tensor  # (H,) H(Y), detached
    batch_size: torch.Tensor  # global number of samples in the step (0-d, on the logits' device)

    def as_dict(self, head: int | None = None) -> dict[str, float]:
        sel = (lambda t: t[head]) if head is not None else (lambda t: t.mean())
        return {
            "loss": float(sel(self.total)),
            "l_e": float(sel(self.ce)),
            "l_con": float(sel(self.con)),
            "entropy": float(sel(self.entropy)),
        }


def scp_loss(
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    alpha: float | torch.Tensor = 1.0,
    ce_reduction: str = "sum",
    eps: float = 1e-8,
    marginal: MarginalEstimate | None = None,
) -> LossTerms:
    """Logits (N, K) or (H, N, K) for the two views of the same N images on this rank.

    alpha may be a scalar or an (H,) tensor (one weight per head). marginal: None (the exact
    global-batch H(Y), the default) or a running estimate (`build_marginal`), which this call
    advances by one step.
    """
    squeeze = logits_a.dim() == 2
    za = logits_a.unsqueeze(0) if squeeze else logits_a
    zb = logits_b.unsqueeze(0) if squeeze else logits_b
    if za.dtype in (torch.float16, torch.bfloat16):  # the softmax/log terms need fp32 under autocast
        za, zb = za.float(), zb.float()
    if za.shape != zb.shape:
        raise ValueError(f"view logits differ in shape: {tuple(za.shape)} vs {tuple(zb.shape)}")
    n_heads, n_local, k = za.shape

    logp_a = F.log_softmax(za, dim=-1)
    logp_b = F.log_softmax(zb, dim=-1)
    p_a, p_b = logp_a.exp(), logp_b.exp()

    ce_sum_local = -(p_a * logp_b).sum(dim=(-2, -1))  # (H,)
    # Agreement sum in log space: log sum_{i,k} exp(logp_a + logp_b) never underflows to log 0,
    # even for one-hot predictions that disagree. An empty local batch contributes -inf (exp -> 0).
    log_agree_local = torch.logsumexp((logp_a + logp_b).reshape(n_heads, -1), dim=-1)  # (H,)
    # One collective per step carries everything batch-level; the count and the detached L_e are
    # riding along for the global batch size and for logging.
    count = torch.full((n_heads, 1), float(n_local), dtype=za.dtype, device=za.device)
    local = torch.cat(
        [p_a.sum(dim=1), p_b.sum(dim=1), log_agree_local[:, None], count, ce_sum_local.detach()[:, None]], dim=-1
    )  # (H, 2K+3)
    gathered = D.all_gather_stack(local)  # (W, H, 2K+3)
    sums = gathered[..., : 2 * k].sum(dim=0)
    con = -torch.logsumexp(gathered[..., 2 * k], dim=0)  # (H,)
    # A tensor: reading it on the host would make the CPU wait for the GPU in the middle of every
    # step. Only a rank with no sample of its own can be in an empty global batch, so only such a
    # rank looks; when every sample was skipped (data.on_error=skip) every rank looks and all take
    # the branch together. The zero loss still reaches every parameter, so DDP's all-reduce runs
    # on every rank; returning before `marginal` keeps a running estimate from advancing.
    n_global = gathered[:, 0, 2 * k + 1].detach().sum()
    if n_local == 0 and float(n_global) == 0:
        zero = torch.zeros(n_heads, dtype=za.dtype, device=za.device)
        return LossTerms(loss=(za.sum() + zb.sum()) * 0.0, total=zero, ce=zero, con=zero, entropy=zero,
                         batch_size=n_global)
    ce_global = gathered[..., 2 * k + 2].sum(dim=0).detach()
    if ce_reduction == "mean":
        ce_sum_local, ce_global = ce_sum_local / n_global, ce_global / n_global
    elif ce_reduction != "sum":
        raise ValueError(f"ce_reduction must be sum or mean, got {ce_reduction!r}")
    marg_a, marg_b = sums[:, :k] / n_global, sums[:, k:] / n_global

    if marginal is None:
        # P log P with P clamped inside the log only: finite value and gradient when a cluster is empty.
        entropy = -(marg_a * marg_a.clamp_min(eps).log()).sum(-1) - (marg_b * marg_b.clamp_min(eps).log()).sum(-1)
    else:
        entropy = marginal.entropy(torch.stack([marg_a, marg_b], dim=1), eps)

    alpha_t = torch.as_tensor(alpha, dtype=za.dtype, device=za.device)
    backward_loss = (D.world_size() * ce_sum_local + con - alpha_t * entropy).sum()

    con_d, ent_d = con.detach(), entropy.detach()
    return LossTerms(
        loss=backward_loss,
        total=ce_global + con_d - alpha_t.detach() * ent_d,
        ce=ce_global,
        con=con_d,
        entropy=ent_d,
        batch_size=n_global,
    )


MARGINALS = ("batch", "ema")


class MarginalEstimate:
    """A running estimate of the global cluster marginals, per head and view: state `ema` (H, 2, K),
    float64 (a few KiB; accumulating 1/(1-m) steps of tiny marginals wants the precision), and
    `steps` (the number of updates), both tensors, saved and restored with state_dict /
    load_state_dict (checkpoints). See the module docstring for the update and the gradient."""

    def __init__(self, num_heads: int, k: int, momentum: float, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float64) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.ema = torch.zeros(num_heads, 2, k, dtype=dtype, device=device)
        self.steps = torch.zeros((), dtype=torch.int64, device=device)

    def update(self, marginals: torch.Tensor) -> torch.Tensor:
        """One step with this step's global marginals (H, 2, K); returns the bias-corrected
        estimate Q (detached)."""
        m = self.momentum
        p = marginals.detach().to(self.ema.dtype)
        if p.shape != self.ema.shape:
            raise ValueError(f"marginals of shape {tuple(p.shape)} for an estimate of shape {tuple(self.ema.shape)}")
        self.ema.mul_(m).add_(p, alpha=1.0 - m)
        self.steps += 1
        return self.estimate()

    def estimate(self) -> torch.Tensor:
        """The bias-corrected estimate Q = E / (1 - m^t); zeros before the first update."""
        correction = 1.0 - self.momentum ** self.steps.double().clamp_min(1)
        return self.ema / correction.to(self.ema.dtype)

    def entropy(self, marginals: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """Advance by one step with the global marginals P (H, 2, K, differentiable) and return the
        (H,) entropy term: the value is H(Q) summed over both views, the gradient -sum_k log Q_k dP_k."""
        q = self.update(marginals).to(marginals.dtype)
        log_q = q.clamp_min(eps).log()
        value = -(q * log_q).sum(dim=(-2, -1))
        surrogate = -(marginals * log_q).sum(dim=(-2, -1))
        return value.detach() + surrogate - surrogate.detach()

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "ema": self.ema.detach().clone(), "steps": self.steps.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        ema = torch.as_tensor(state["ema"])
        if ema.shape != self.ema.shape:
            raise ValueError(f"marginal estimate of shape {tuple(ema.shape)} in the checkpoint, "
                             f"{tuple(self.ema.shape)} expected (head.num_heads x 2 views x head.num_clusters)")
        self.momentum = float(state["momentum"])
        self.ema.copy_(ema)
        self.steps.copy_(torch.as_tensor(state["steps"]))


def build_marginal(loss_cfg, num_heads: int, k: int, device: torch.device | str = "cpu") -> MarginalEstimate | None:
    """The marginal estimate `loss.marginal` asks for: None for `batch` (the exact global-batch
    entropy, the default), a MarginalEstimate with `loss.ema_momentum` for `ema`."""
    kind = loss_cfg.marginal
    if kind == "batch":
        return None
    if kind == "ema":
        return MarginalEstimate(num_heads, k, loss_cfg.ema_momentum, device)
    raise ValueError(f"loss.marginal must be one of {'|'.join(MARGINALS)}, got {kind!r}")
