"""SCP training job: shards -> two views -> frozen backbone -> head -> global-batch loss -> step -> metrics.

    python -m scp_dist.train --config configs/cifar10.yaml [key=value ...]          # one process
    torchrun --nproc_per_node 8 -m scp_dist.train --config configs/cifar10.yaml     # DDP
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel as DDP

from scp_dist import distributed as D
from scp_dist.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint, save_checkpoint
from scp_dist.config import (
    BUILTIN_ROOTS,
    ConfigError,
    check_world_size,
    config_fingerprint,
    eval_splits,
    load_config,
    run_dir,
    save_config,
)
from scp_dist.evaluate import autocast_context, predict, report
from scp_dist.feature_cache import CacheMismatchError
from scp_dist.features import FeatureSource, build_source
from scp_dist.loss import LossTerms, scp_loss
from scp_dist.models.backbones import build_backbone
from scp_dist.models.head import SCPHead
from scp_dist.runlog import JsonlLog, log, progress, setup_logging
from scp_dist.schedule import lr_at
from scp_dist.shards.manifest import ShardError, read_manifest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (path, or a name under configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=5 head.num_clusters=20")
    return p.parse_args(argv)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision != "fp32" and device.type != "cuda":
        log.warning("train.precision=%s needs a GPU; using fp32 on CPU", precision)
        return "fp32"
    return precision


def prepare_data(cfg: DictConfig, st: D.DistState) -> None:
    """Write a built-in data set's shards on first use (rank 0 writes, the others wait), but only
    into that data set's own folder: any other data.root is the user's data, never overwritten."""
    builtin = BUILTIN_ROOTS.get(cfg.data.prepare)
    if builtin and Path(cfg.data.root).resolve() == Path(builtin).resolve():
        if st.is_main:
            from scp_dist.shards import sources

            sources.PREPARE[cfg.data.prepare](Path(cfg.data.root))
        D.barrier()
    check_data(cfg)


def check_data(cfg: DictConfig) -> None:
    """What would otherwise fail after the backbone has loaded, or after training: checked first."""
    root = Path(cfg.data.root)
    n = read_manifest(root / cfg.data.train_split).num_samples
    if n < cfg.train.global_batch:
        raise ConfigError(f"config key 'train.global_batch': {cfg.train.global_batch} is more than the {n} "
                          f"samples of {root / cfg.data.train_split}; set train.global_batch <= {n} (each epoch "
                          "drops its last partial batch)")
    if cfg.data.test_split:
        try:
            read_manifest(root / cfg.data.test_split)
        except ShardError as e:
            raise ConfigError(f"config key 'data.test_split': {e}; set data.test_split= to evaluate on "
                              "the training split only") from e


def build_head(cfg: DictConfig, feature_dim: int, st: D.DistState) -> SCPHead:
    return SCPHead(feature_dim, list(cfg.head.hidden), cfg.head.num_clusters, num_heads=cfg.head.num_heads,
                   activation=cfg.head.activation, seed=cfg.train.seed).to(st.device)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               feats: torch.Tensor, n: int, cfg: DictConfig, precision: str, lr: float) -> LossTerms:
    """One optimisation step on this rank's [view a; view b] features of n images; the loss (and so
    the gradient after DDP's averaging) is the global batch's (scp_dist/loss.py)."""
    for g in opt.param_groups:
        g["lr"] = lr
    with autocast_context(feats.device, precision):
        logits = model(feats)  # (H, 2n, K)
    out = scp_loss(logits[:, :n], logits[:, n:], alpha=cfg.loss.alpha, ce_reduction=cfg.loss.ce_reduction,
                   eps=cfg.loss.eps)
    opt.zero_grad(set_to_none=True)
    scaler.scale(out.loss).backward()
    scaler.step(opt)
    scaler.update()
    return out


def fit(cfg: DictConfig, st: D.DistState, source: FeatureSource, head: SCPHead, out_dir: Path,
        precision: str) -> torch.Tensor:
    """The training loop, resumable at epoch ends; returns the last epoch's mean loss per head."""
    model: torch.nn.Module = DDP(head, device_ids=[st.device.index] if st.device.type == "cuda" else None) \
        if st.distributed else head
    opt = torch.optim.Adam(head.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                           weight_decay=cfg.optim.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")  # a no-op unless fp16
    steps_per_epoch = len(source)
    total_steps = steps_per_epoch * cfg.train.epochs  # the schedule's length; max_steps only stops early
    stop_at = min(total_steps, cfg.train.max_steps) if cfg.train.max_steps else total_steps
    log.info("%d samples, %d steps/epoch, %d steps in all (%s mode)", source.num_samples, steps_per_epoch, stop_at,
             cfg.train.mode)

    fingerprint = config_fingerprint(cfg)
    ckpt_path = out_dir / CHECKPOINT_NAME
    start_epoch, step = 0, 0
    head_losses = torch.zeros(cfg.head.num_heads)
    if cfg.train.resume == "true" or (cfg.train.resume == "auto" and ckpt_path.is_file()):
        state = load_checkpoint(ckpt_path, fingerprint)
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state.get("scaler", {}))
        start_epoch, step = state["epoch"], state["step"]
        # A run resumed after its last epoch goes straight to evaluation: the head choice needs these.
        head_losses = torch.tensor(state.get("head_losses", head_losses.tolist()))
        log.info("resumed from %s at epoch %d, step %d", ckpt_path, start_epoch, step)

    jsonl = JsonlLog(out_dir / "metrics.jsonl" if st.is_main else None)
    # One bar for the run, the epoch in its postfix: a bar per epoch floods logs when epochs are short.
    bar = progress(None, st.is_main, desc="train", total=stop_at, initial=step)
    for epoch in range(start_epoch, cfg.train.epochs):
        if step >= stop_at:
            break
        source.set_epoch(epoch)
        model.train()
        epoch_loss_sum = torch.zeros(cfg.head.num_heads)
        epoch_steps = 0
        t_last, seen_since = time.perf_counter(), 0
        for feats, n in source:
            if step >= stop_at:
                break  # every rank sees the same stop_at, so all stop together
            lr = lr_at(step, total_steps, cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_steps, cfg.optim.min_lr)
            out = train_step(model, opt, scaler, feats, n, cfg, precision, lr)
            step += 1
            epoch_steps += 1
            bar.update(1)
            epoch_loss_sum += out.total.float().cpu()
            seen_since += out.batch_size
            if not math.isfinite(float(out.total.sum())):
                raise FloatingPointError(f"non-finite loss at step {step}: {out.as_dict()}")
            if step % cfg.train.log_every == 0 or step == stop_at:
                now = time.perf_counter()
                ips = seen_since / max(now - t_last, 1e-9)
                t_last, seen_since = now, 0
                terms = out.as_dict()
                jsonl.write(kind="step", step=step, epoch=epoch, lr=lr, img_per_s=round(ips, 1), **terms)
                bar.set_postfix(epoch=f"{epoch + 1}/{cfg.train.epochs}", loss=f"{terms['loss']:.3f}",
                                H=f"{terms['entropy']:.3f}", ips=f"{ips:.0f}", refresh=False)
        head_losses = epoch_loss_sum / max(epoch_steps, 1)
        skipped = _global_skip_counts(source.stats, st)
        if any(skipped.values()):
            log.warning("epoch %d: skipped samples %s", epoch + 1, skipped)
        # An epoch cut short by max_steps is not counted: resuming re-runs it from its first step.
        completed = epoch + 1 if epoch_steps == steps_per_epoch else epoch
        if st.is_main:
            save_checkpoint(ckpt_path, {
                "head": head.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                "epoch": completed, "step": completed * steps_per_epoch, "fingerprint": fingerprint,
                "head_losses": head_losses.tolist(),
            })
        jsonl.write(kind="epoch", epoch=epoch, step=step, loss=head_losses.tolist(), skipped=skipped)
    bar.close()
    jsonl.close()
    log.info("final mean loss per head: %s", ", ".join(f"{v:.4f}" for v in head_losses.tolist()))
    del model, opt  # the DDP reducer must die before the process group (distributed.teardown)
    return head_losses


def evaluate(cfg: DictConfig, st: D.DistState, source: FeatureSource, head: SCPHead, head_losses: torch.Tensor,
             out_dir: Path) -> dict:
    """Every split through features -> head; rank 0 chooses, scores (next to k-means) and writes."""
    preds = {split: predict(source.eval_batches(split), head, st, keep_features=cfg.output.kmeans)
             for split in eval_splits(cfg)}  # rank 0 holds them, the others None
    results = report(cfg, preds, head_losses, out_dir) if st.is_main else None
    results = D.broadcast_object(results)
    if st.is_main:
        jsonl = JsonlLog(out_dir / "metrics.jsonl")
        jsonl.write(kind="eval", **results)
        jsonl.close()
        results["predictions"] = preds
    return results


def train(cfg: DictConfig, st: D.DistState) -> dict:
    """build -> fit -> evaluate. Every rank calls it; rank 0's result holds the predictions."""
    check_world_size(cfg, st.world_size)
    prepare_data(cfg, st)
    out_dir = run_dir(cfg)
    if st.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    precision = resolve_precision(cfg.train.precision, st.device)
    backbone = build_backbone(cfg.backbone).to(st.device)
    head = build_head(cfg, backbone.feature_dim, st)
    log.info("backbone %s: %d-d features at %dpx; head %s; world size %d on %s (%s)", backbone.name,
             backbone.feature_dim, backbone.image_size, head.extra_repr(), st.world_size, st.device, precision)
    source = build_source(cfg, st, backbone, precision)
    del backbone  # cached mode: nothing holds it any more, its memory goes back before training
    if st.device.type == "cuda":
        torch.cuda.empty_cache()
    head_losses = fit(cfg, st, source, head, out_dir, precision)
    D.barrier()
    return evaluate(cfg, st, source, head, head_losses, out_dir)


def _global_skip_counts(stats, st: D.DistState) -> dict[str, int]:
    if stats is None:
        return {}
    names = sorted(stats.as_dict())
    local = torch.tensor([stats.as_dict()[k] for k in names], dtype=torch.float64)
    total = D.sum_detached(local.to(st.device) if st.backend == "nccl" else local)
    return {k: int(v) for k, v in zip(names, total.tolist(), strict=True)}


# Errors that name what the user must fix (a config key, a shard, a checkpoint, a cache): printed
# as one line, not a traceback.
USER_ERRORS = (ConfigError, ShardError, CheckpointError, CacheMismatchError, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    st = D.init_distributed(cfg.train.device, cfg.dist.backend, cfg.dist.timeout_s)
    setup_logging(st.is_main)
    try:
        train(cfg, st)
    except USER_ERRORS as e:
        print(f"error (rank {st.rank}): {e}", file=sys.stderr)
        return 2
    finally:
        D.teardown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
