"""`step`: a full training step vs the backbone's forward alone, on the same input tensors.

The step is what scp_dist.train does per batch: both views in one backbone call under no_grad,
head forward, scp_loss, backward, Adam. The forward alone is the floor the step cannot beat, so
ips_step / ips_forward says how much the trainable part (head + loss + optimiser) costs on top of
the frozen backbone; the goal is >= 0.9. The two are timed alternately, iteration by iteration, and
the median of each is used, so a burst of load on a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from benchmarks import bench as B
from benchmarks import harness as H
from scp_dist.config import load_config
from scp_dist.models.backbones import build_backbone
from scp_dist.models.head import SCPHead
from scp_dist.precision import autocast_context
from scp_dist.train import build_optimizer
from scp_dist.train import train_step as job_train_step

COLUMNS = [H.Column("backbone", "backbone"), H.Column("image_size", "px"), H.Column("batch", "images/step"),
           H.Column("precision", "precision"), H.Column("fwd_img_per_s", "forward images/s", ".1f"),
           H.Column("step_img_per_s", "step images/s", ".1f"), H.Column("ratio", "step/forward", ".3f"),
           H.Column("head_ms", "head+loss+opt ms", ".1f"), H.Column("peak_mem_mib", "peak MiB", ".0f"),
           H.Column("peak_mem_kind", "memory measure")]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default=None, choices=["timm", "open_clip", "pixels"],
                   help="default: timm on CPU, open_clip on GPU")
    p.add_argument("--model", default=None,
                   help="default: tf_efficientnet_lite0 (timm) / ViT-B-32 (open_clip); random init")
    p.add_argument("--image-size", type=int, default=None, help="default: 128 on CPU, 224 on GPU")
    p.add_argument("--batch", type=int, default=None, help="images per step (2 views each); default 32 CPU, 256 GPU")
    p.add_argument("--steps", type=int, default=None, help="timed iterations of each; default 8 CPU, 30 GPU")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations of each first")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 autocast on GPU, fp32 on CPU")
    p.add_argument("--clusters", type=int, default=10, help="K")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def resolve(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    gpu = device.type == "cuda"
    backbone = args.backbone or ("open_clip" if gpu else "timm")
    default_model = {"timm": "tf_efficientnet_lite0", "open_clip": "ViT-B-32", "pixels": ""}[backbone]
    return {"backbone": backbone, "model": default_model if args.model is None else args.model,
            "image_size": args.image_size or (224 if gpu else 128), "batch": args.batch or (256 if gpu else 32),
            "steps": args.steps or (30 if gpu else 8), "warmup": args.warmup,
            "precision": B.precision_for(args.precision, device), "clusters": args.clusters, "device": str(device)}


def _measure(p: dict[str, Any], device: torch.device) -> tuple[dict[str, Any], list[str]]:
    cfg = load_config(None, [f"backbone.name={p['backbone']}", f"backbone.model={p['model']}",
                             "backbone.pretrained=", f"backbone.image_size={p['image_size']}",
                             f"head.num_clusters={p['clusters']}"])
    backbone = build_backbone(cfg.backbone).to(device)
    head = SCPHead(backbone.feature_dim, list(cfg.head.hidden), cfg.head.num_clusters).to(device)
    opt = build_optimizer(cfg, head)
    n, s = p["batch"], backbone.image_size
    gen = torch.Generator().manual_seed(0)
    views = torch.randn(2 * n, 3, s, s, generator=gen).to(device)  # [a; b] as train.py feeds them
    precision = p["precision"]

    def forward_only() -> None:
        with torch.no_grad(), autocast_context(device, precision):
            backbone(views)

    scaler = torch.amp.GradScaler(device.type, enabled=False)

    def train_step() -> None:
        # The job's step: the frozen forward (as StreamFeatures runs it), then scp_dist.train.train_step.
        with torch.no_grad(), autocast_context(device, precision):
            feats = backbone(views)
        job_train_step(head, opt, scaler, feats, n, cfg, precision, cfg.optim.lr)

    for _ in range(p["warmup"]):
        forward_only()
        train_step()
    row: dict[str, Any] = {}
    notes = []
    if device.type == "cuda":
        with B.PeakMemory(device) as fwd_mem:
            forward_only()
        with B.PeakMemory(device) as step_mem:
            train_step()
        row.update(peak_mem_mib=step_mem.mib, peak_mem_kind=step_mem.kind, fwd_peak_mem_mib=fwd_mem.mib)
        notes.append(f"peak GPU memory (torch.cuda.max_memory_allocated, weights included): forward alone "
                     f"{fwd_mem.mib:.0f} MiB, training step {step_mem.mib:.0f} MiB")
    t_fwd, t_step = [], []
    for _ in range(p["steps"]):
        t_fwd.append(B.timed(forward_only, device))
        t_step.append(B.timed(train_step, device))
    fwd, step = B.median(t_fwd), B.median(t_step)
    row.update(backbone=f"{p['backbone']}:{p['model']}" if p["model"] else p["backbone"], image_size=s, batch=n,
               precision=precision, fwd_img_per_s=n / fwd, step_img_per_s=n / step, ratio=fwd / step,
               head_ms=1000 * (step - fwd), fwd_s_median=fwd, step_s_median=step)
    return row, notes


def run(args: argparse.Namespace) -> B.BenchResult:
    device = B.pick_device(args.device)
    p = resolve(args, device)
    if device.type == "cuda":
        row, notes = _measure(p, device)
    else:
        # CPU has no per-allocation peak counter: the whole run (model build included) is the region.
        with B.PeakMemory(device) as mem:
            row, notes = _measure(p, device)
        row.update(peak_mem_mib=mem.mib, peak_mem_kind=mem.kind)
        notes.append(f"peak memory on CPU: {mem.kind} over model build + all iterations")
    notes.append(f"images = samples; each step runs the backbone on 2 x {row['batch']} views; random-init "
                 f"weights (speed only); median of {p['steps']} alternating iterations after {p['warmup']} "
                 "warm-up")
    return B.BenchResult("step", p, COLUMNS, [row], notes)
