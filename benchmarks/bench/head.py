"""`head`: training the head on cached features, at the size of CIFAR-10 (50,000 x 512, K = 10).

Features are precomputed, as when the backbone's outputs are cached: two (N, D) tensors stand for
the two augmented views (a K-component Gaussian mixture, view b = view a plus noise), resident on
the device. Training is the paper's: SCPHead (D -> 1024 -> 786 -> 512 -> 1024 -> K), scp_loss,
Adam, cosine lr over all steps, a fresh permutation per epoch, the batch tail dropped (as in
train.py). With --heads the same run is repeated with H heads trained at once in one batched
pass, and its time is compared with H=1: many heads in one pass cost less than H separate runs.
`--adam fused loop` times the job's fused Adam next to torch's per-parameter loop (its CPU default).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from benchmarks import bench as B
from benchmarks import harness as H
from scp_dist.config import load_config
from scp_dist.models.head import SCPHead
from scp_dist.schedule import lr_at
from scp_dist.train import build_optimizer, train_step

PAPER_HIDDEN = [1024, 786, 512, 1024]
PAPER_EPOCHS = 30

COLUMNS = [H.Column("heads", "heads"), H.Column("adam", "Adam"), H.Column("device", "device"), H.Column("precision", "precision"),
           H.Column("epochs", "epochs"), H.Column("epoch_s", "s/epoch", ".3f"), H.Column("total_s", "total s", ".2f"),
           H.Column("est_paper_s", "est. 30 epochs s", ".1f"), H.Column("vs_h1", "time vs H=1", ".2f"),
           H.Column("vs_h_runs", "vs H runs", ".2f"), H.Column("peak_mem_mib", "peak MiB", ".0f"),
           H.Column("final_loss", "final loss", ".3f")]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=50_000, help="cached samples")
    p.add_argument("--dim", type=int, default=512, help="feature dimension D")
    p.add_argument("--clusters", type=int, default=10, help="K")
    p.add_argument("--epochs", type=int, default=PAPER_EPOCHS)
    p.add_argument("--batch", type=int, default=512, help="global batch")
    p.add_argument("--heads", nargs="+", type=int, default=[1],
                   help="head counts to time (H=1 is always added for the comparison)")
    p.add_argument("--hidden", nargs="+", type=int, default=PAPER_HIDDEN, help="head widths")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 autocast on GPU, fp32 on CPU")
    p.add_argument("--devices", nargs="+", default=["auto"], choices=["auto", "cpu", "cuda"],
                   help="auto: CPU, and the GPU too when one is present")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--adam", nargs="+", default=["fused"], choices=["fused", "loop"],
                   help="fused: the job's optimizer (train.build_optimizer); loop: torch's per-parameter Adam")


def cached_features(n: int, dim: int, k: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views of a K-component Gaussian mixture, on `device` (generated on CPU: reproducible)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, dim, generator=g) * 2.0
    labels = torch.randint(0, k, (n,), generator=g)
    a = centers[labels] + torch.randn(n, dim, generator=g)
    b = a + 0.3 * torch.randn(n, dim, generator=g)
    return a.to(device), b.to(device)


def train_head(fa: torch.Tensor, fb: torch.Tensor, hidden: list[int], k: int, heads: int, epochs: int, batch: int,
               lr: float, precision: str, seed: int = 0, adam: str = "fused") -> dict[str, Any]:
    device = fa.device
    n = fa.shape[0]
    steps_per_epoch = n // batch
    if steps_per_epoch < 1:
        raise ValueError(f"--n {n} is smaller than --batch {batch}")
    total = steps_per_epoch * epochs
    head = SCPHead(fa.shape[1], hidden, k, num_heads=heads, seed=seed).to(device)
    cfg = load_config(None, [f"head.num_clusters={k}", f"optim.lr={lr}"])  # the job's loss and optimizer
    opt = build_optimizer(cfg, head)
    if adam == "loop":
        opt = torch.optim.Adam(head.parameters(), lr=lr, fused=False, foreach=False)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    g = torch.Generator(device=device).manual_seed(seed)
    epoch_times = []
    step = 0
    last = torch.zeros(heads, device=device)
    for _ in range(epochs):
        B.sync(device)
        t0 = time.perf_counter()
        perm = torch.randperm(n, device=device, generator=g)
        for s in range(steps_per_epoch):
            idx = perm[s * batch: (s + 1) * batch]
            out = train_step(head, opt, scaler, torch.cat([fa[idx], fb[idx]]), batch, cfg, precision,
                             lr_at(step, total, lr, "cosine"))
            last = out.total  # kept on the device: reading it every step would sync the GPU
            step += 1
        B.sync(device)
        epoch_times.append(time.perf_counter() - t0)
    final = last.float().cpu()
    if not torch.isfinite(final).all():
        raise FloatingPointError(f"non-finite head loss: {final.tolist()}")
    return {"epoch_times": epoch_times, "final_loss": float(final.mean()), "steps": total}


def run(args: argparse.Namespace) -> B.BenchResult:
    auto = [torch.device("cpu")] + ([torch.device("cuda", 0)] if torch.cuda.is_available() else [])
    devices = list(dict.fromkeys(x for d in args.devices for x in (auto if d == "auto" else [B.pick_device(d)])))
    heads = sorted({1, *args.heads})
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    params = {"n": args.n, "dim": args.dim, "clusters": args.clusters, "epochs": args.epochs, "batch": args.batch,
              "hidden": list(args.hidden), "heads": heads, "adam": list(args.adam)}
    for device in devices:
        precision = B.precision_for(args.precision, device)
        fa, fb = cached_features(args.n, args.dim, args.clusters, device)
        # Untimed: CUDA context, cuBLAS handles, allocator pools, CPU thread pools.
        train_head(fa[: 4 * args.batch], fb[: 4 * args.batch], args.hidden, args.clusters, max(heads), 1,
                   args.batch, args.lr, precision)
        base = None
        for h in heads:
            for adam in args.adam:
                with B.PeakMemory(device) as mem:
                    res = train_head(fa, fb, args.hidden, args.clusters, h, args.epochs, args.batch, args.lr,
                                     precision, adam=adam)
                total = sum(res["epoch_times"])
                if h == 1 and base is None:
                    base = total
                epoch_s = total / args.epochs
                rows.append({"heads": h, "adam": adam, "device": device.type, "precision": precision,
                             "epochs": args.epochs, "epoch_s": epoch_s, "first_epoch_s": res["epoch_times"][0],
                             "total_s": total, "est_paper_s": epoch_s * PAPER_EPOCHS,
                             "vs_h1": total / base if base else None,
                             "vs_h_runs": total / (h * base) if base else None, "peak_mem_mib": mem.mib,
                             "peak_mem_kind": mem.kind, "final_loss": res["final_loss"], "steps": res["steps"]})
                print(f"  {device.type} H={h} Adam {adam}: {total:.2f} s for {args.epochs} epoch(s)", flush=True)
                B.save_partial(args, B.BenchResult("head", params, COLUMNS, list(rows), list(notes)),
                               f"{device.type} H={h} {adam}")
        del fa, fb
    kinds = sorted({r["peak_mem_kind"] for r in rows})
    notes.append("peak memory per row: " + "; ".join(kinds) + " (GPU: absolute, cached features included; "
                 "CPU: above the RSS at the row's start, i.e. head, optimiser state and activations)")
    notes.append(f"{args.n} x {args.dim} cached features x 2 views (Gaussian mixture), K={args.clusters}, "
                 f"batch {args.batch}, {args.n // args.batch} steps/epoch; 'est. 30 epochs' = s/epoch x 30; "
                 "'vs H runs' = time(H) / (H x time(1)): below 1 means one H-head pass beats H runs; both against "
                 f"the first H=1 row (Adam {args.adam[0]})")
    return B.BenchResult("head", params, COLUMNS, rows, notes)
