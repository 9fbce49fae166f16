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
    batch_size: int  # global number of samples in the step

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
) -> LossTerms:
    """Logits (N, K) or (H, N, K) for the two views of the same N images on this rank.

    alpha may be a scalar or an (H,) tensor (one weight per head).
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
    n_global = float(gathered[:, 0, 2 * k + 1].detach().sum())
    if n_global == 0:
        raise ValueError("the global batch is empty")
    ce_global = gathered[..., 2 * k + 2].sum(dim=0).detach()
    if ce_reduction == "mean":
        ce_sum_local, ce_global = ce_sum_local / n_global, ce_global / n_global
    elif ce_reduction != "sum":
        raise ValueError(f"ce_reduction must be sum or mean, got {ce_reduction!r}")
    marg_a, marg_b = sums[:, :k] / n_global, sums[:, k:] / n_global

    # P log P with P clamped inside the log only: finite value and gradient when a cluster is empty.
    entropy = -(marg_a * marg_a.clamp_min(eps).log()).sum(-1) - (marg_b * marg_b.clamp_min(eps).log()).sum(-1)

    alpha_t = torch.as_tensor(alpha, dtype=za.dtype, device=za.device)
    backward_loss = (D.world_size() * ce_sum_local + con - alpha_t * entropy).sum()

    con_d, ent_d = con.detach(), entropy.detach()
    return LossTerms(
        loss=backward_loss,
        total=ce_global + con_d - alpha_t.detach() * ent_d,
        ce=ce_global,
        con=con_d,
        entropy=ent_d,
        batch_size=int(n_global),
    )
