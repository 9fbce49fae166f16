"""SCP training job: shards -> two views -> frozen backbone -> head -> global-batch loss -> step -> metrics.

    python -m scp_dist.train --config configs/cifar10.yaml [key=value ...]          # one process
    torchrun --nproc_per_node 8 -m scp_dist.train --config configs/cifar10.yaml     # DDP
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import IO

import numpy as np
import torch
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel as DDP

from scp_dist import distributed as D
from scp_dist import rundir
from scp_dist.checkpoint import CheckpointError, load_latest, remove_stale_temporaries
from scp_dist.config import (
    ConfigError,
    check_world_size,
    config_fingerprint,
    eval_splits,
    load_config,
    run_dir,
    save_config,
    schema_defaults,
)
from scp_dist.data.batch import DataError
from scp_dist.data.remote import split_location
from scp_dist.data.stream import split_size
from scp_dist.errors import USER_ERRORS
from scp_dist.evaluate import kmeans_baseline, predict, report
from scp_dist.features import FeatureSource, build_source
from scp_dist.fileio import STORAGE_ERRNOS, exclusive_lock
from scp_dist.loss import LossTerms, MarginalEstimate, build_marginal, scp_loss
from scp_dist.models.backbones import build_backbone
from scp_dist.models.head import SCPHead
from scp_dist.precision import autocast_context, resolve_precision
from scp_dist.report import gather_feature_sample, report_after_run
from scp_dist.runlog import (
    JsonlLog,
    close_mirror,
    log,
    metrics_mirror,
    mirror_metrics,
    progress,
    setup_logging,
    stage,
)
from scp_dist.schedule import lr_at, schedule_steps
from scp_dist.shards.manifest import ShardError
from scp_dist.shards.sources import builtin_to_prepare
from scp_dist.signals import EXIT_REQUEUE as EXIT_REQUEUE  # the launchers' contract
from scp_dist.signals import Preempted, StopSignals
from scp_dist.train_state import TrainState


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (path, or a name under configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=5 head.num_clusters=20")
    return p.parse_args(argv)


def prepare_data(cfg: DictConfig, st: D.DistState) -> None:
    """Write a built-in data set's shards on first use (rank 0 writes, the others wait), but only
    into that data set's own folder: any other data.root is the user's data, never overwritten. A
    lock in that folder makes a second job started at the same time wait, then find them written."""
    builtin = builtin_to_prepare(cfg.data.prepare, cfg.data.root)
    if builtin is not None:
        if st.is_main:
            with exclusive_lock(Path(cfg.data.root) / ".prepare.lock"):
                builtin.prepare(Path(cfg.data.root))
        D.barrier()
    check_data(cfg)


def check_data(cfg: DictConfig) -> None:
    """What would otherwise fail after the backbone has loaded, or after training: checked first."""
    root = cfg.data.root
    where = split_location(root, cfg.data.train_split)
    n = split_size(root, cfg.data.train_split, cfg.data)  # None: streamed shards without counts (learned)
    if n is not None and n < cfg.train.global_batch:
        raise ConfigError(f"config key 'train.global_batch': {cfg.train.global_batch} is more than the {n} "
                          f"samples of {where}; set train.global_batch <= {n} (each epoch "
                          "drops its last partial batch)")
    if n is not None and n < cfg.head.num_clusters:  # no clustering to learn, and the k-means baseline would be dropped
        raise ConfigError(f"config key 'head.num_clusters': {cfg.head.num_clusters} clusters are more than the {n} "
                          f"samples of {where}; set head.num_clusters <= {n}")
    if cfg.data.test_split:
        try:
            split_size(root, cfg.data.test_split, cfg.data)
        except ShardError as e:
            raise ConfigError(f"config key 'data.test_split': {e}; set data.test_split= to evaluate on "
                              "the training split only") from e


def build_head(cfg: DictConfig, feature_dim: int, st: D.DistState) -> SCPHead:
    return SCPHead(feature_dim, list(cfg.head.hidden), cfg.head.num_clusters, num_heads=cfg.head.num_heads,
                   activation=cfg.head.activation, seed=cfg.train.seed).to(st.device)


def build_optimizer(cfg: DictConfig, head: torch.nn.Module) -> torch.optim.Adam:
    """The paper's Adam, fused: on a GPU one launch updates every parameter (a head-only step is
    launch-bound, BENCHMARKS.md, head); on a CPU a five-head step of the small-set recipe takes 0.88x
    the time it takes with torch's per-parameter loop (BENCHMARKS.md, head, tag adam-lite0)."""
    return torch.optim.Adam(head.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                            weight_decay=cfg.optim.weight_decay, fused=True)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               feats: torch.Tensor, n: int, cfg: DictConfig, precision: str, lr: float,
               marginal: MarginalEstimate | None = None) -> LossTerms:
    """One optimisation step on this rank's [view a; view b] features of n images; the loss (and so
    the gradient after DDP's averaging) is the global batch's (scp_dist/loss.py)."""
    for g in opt.param_groups:
        g["lr"] = lr
    with autocast_context(feats.device, precision):
        logits = model(feats)  # (H, 2n, K)
    out = scp_loss(logits[:, :n], logits[:, n:], alpha=cfg.loss.alpha, ce_reduction=cfg.loss.ce_reduction,
                   eps=cfg.loss.eps, marginal=marginal)
    opt.zero_grad(set_to_none=True)
    scaler.scale(out.loss).backward()  # also for an empty global batch: DDP's all-reduce runs on every rank
    if n == 0 and float(out.batch_size) == 0:  # read only where it can be 0 (scp_loss)
        return out  # every sample of the global batch was skipped: no update (Adam would still move)
    scaler.step(opt)
    scaler.update()
    return out


def fit(cfg: DictConfig, st: D.DistState, source: FeatureSource, head: SCPHead, out_dir: Path, precision: str,
        resume_state: dict | None = None, stop: StopSignals | None = None) -> torch.Tensor:
    """The training loop; returns the last epoch's mean loss per head. Checkpoints (rank 0) at epoch
    ends (at most one per train.checkpoint_min_seconds, and always the last), every
    train.checkpoint_every steps / train.checkpoint_minutes, and when a stop signal arrives;
    `resume_state` (a checkpoint) continues at the global batch after the one it saved."""
    stop = stop or StopSignals()
    model: torch.nn.Module = DDP(head, device_ids=[st.device.index] if st.device.type == "cuda" else None) \
        if st.distributed else head
    state = TrainState(head, build_optimizer(cfg, head),
                       torch.amp.GradScaler("cuda", enabled=precision == "fp16"),  # a no-op unless fp16
                       build_marginal(cfg.loss, cfg.head.num_heads, cfg.head.num_clusters, st.device),
                       cfg.head.num_heads, st.device, st.world_size)
    steps_per_epoch = len(source)
    # The schedule's length (train.step_budget may cut it short of the epochs); max_steps only stops early.
    total_steps = schedule_steps(cfg.train.epochs, steps_per_epoch, cfg.train.step_budget)
    stop_at = min(total_steps, cfg.train.max_steps) if cfg.train.max_steps else total_steps
    log.info("%d samples, %d steps/epoch, %d steps in all (%s mode)", source.num_samples, steps_per_epoch, stop_at,
             cfg.train.mode)

    # On the device like the loss sums, and for the same reason (TrainState): read only by a log line
    # or a checkpoint.
    nonfinite = torch.zeros((), dtype=torch.bool, device=st.device)
    if resume_state is not None:
        state.load_state_dict(resume_state)
        if hasattr(source, "load_state_dict"):  # streamed shards: which samples the epoch has used
            source.load_state_dict(resume_state.get("data"))
        if state.resumed_world_size != st.world_size and cfg.data.order == "windowed" and state.step_in_epoch:
            log.warning("resuming mid-epoch on %d ranks a checkpoint of %d: with data.order=windowed the rest "
                        "of epoch %d reads other samples than the first run would", st.world_size,
                        state.resumed_world_size, state.epoch + 1)
        log.info("resumed at epoch %d, step %d (%d of the epoch) from a checkpoint of %d rank(s)", state.epoch + 1,
                 state.step, state.step_in_epoch, state.resumed_world_size)

    jsonl = JsonlLog(out_dir / "metrics.jsonl" if st.is_main else None)
    # A resume repeats the steps logged after its checkpoint: this marker says which records a
    # reader keeps (the last one per step).
    jsonl.write(kind="resume" if resume_state is not None else "start", step=state.step, epoch=state.epoch,
                world_size=st.world_size)
    last_save = time.monotonic()
    fingerprint = config_fingerprint(cfg)  # reads and hashes the manifest: once, not per checkpoint

    def check_finite() -> None:
        if bool(nonfinite):
            raise FloatingPointError(f"non-finite loss at or before step {state.step} (checked every "
                                     f"train.log_every steps and before each checkpoint); last step: {out.as_dict()}")

    def save(reason: str) -> Path | None:
        nonlocal last_save
        check_finite()  # never a checkpoint of a diverged head
        last_save = time.monotonic()
        data = source.state_dict() if hasattr(source, "state_dict") else None  # collective: every rank
        if not st.is_main:
            return None
        path = state.save(out_dir, reason, fingerprint, keep=cfg.train.keep_checkpoints, data=data)
        # Epoch-end and periodic checkpoints are routine (a line per epoch floods short runs' logs).
        (log.debug if reason in ("epoch end", "periodic") else log.info)("checkpoint %s (%s)", path, reason)
        return path

    def periodic_due() -> bool:
        minutes = cfg.train.checkpoint_minutes
        return bool((cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0)
                    or (minutes and time.monotonic() - last_save >= 60 * minutes))

    # One bar for the run, the epoch in its postfix: a bar per epoch floods logs when epochs are short.
    bar = progress(None, st.is_main, desc="train", total=stop_at, initial=state.step)
    stop.in_loop = True
    try:
        while state.epoch < cfg.train.epochs and state.step < stop_at:
            source.set_epoch(state.epoch, state.step_in_epoch)
            model.train()
            t_last, seen_since = time.perf_counter(), torch.zeros((), device=st.device)
            for feats, n in source:
                lr = lr_at(state.step, total_steps, cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_steps,
                           cfg.optim.min_lr)
                out = train_step(model, state.optimizer, state.scaler, feats, n, cfg, precision, lr, state.marginal)
                state.advance()
                bar.update(1)
                if n == 0 and float(out.batch_size) == 0:  # read only where it can be 0 (scp_loss)
                    log.warning("step %d: every sample of the global batch was skipped; no update", state.step)
                else:
                    state.add_loss(out.total)
                    nonfinite |= ~torch.isfinite(out.total).all()
                seen_since += out.batch_size
                if state.step % cfg.train.log_every == 0 or state.step == stop_at:
                    check_finite()
                    now = time.perf_counter()
                    ips = float(seen_since) / max(now - t_last, 1e-9)
                    t_last, seen_since = now, torch.zeros((), device=st.device)
                    terms = out.as_dict()
                    jsonl.write(kind="step", step=state.step, epoch=state.epoch, lr=lr, img_per_s=round(ips, 1),
                                **terms)
                    bar.set_postfix(epoch=f"{state.epoch + 1}/{cfg.train.epochs}", loss=f"{terms['loss']:.3f}",
                                    H=f"{terms['entropy']:.3f}", ips=f"{ips:.0f}", refresh=False)
                # Every rank asks after every step: they stop, and checkpoint, together.
                signum, periodic = stop.agreed(st, periodic_due() and state.step_in_epoch < len(source))
                if signum is not None:
                    path = save(f"signal {signum}")
                    jsonl.write(kind="stopped", step=state.step, epoch=state.epoch, signal=signum)
                    # No rank leaves before rank 0's checkpoint is on disk: torchrun stops the other
                    # workers of a node as soon as one exits. Cannot hang: every rank just agreed.
                    D.barrier()
                    raise Preempted(signum, f"at step {state.step}" + (f"; checkpoint {path}" if path else ""))
                if state.step >= stop_at and state.step_in_epoch < len(source):
                    break  # max_steps or step_budget inside an epoch: every rank sees the same stop_at
                if periodic:
                    save("periodic")
            # len(source) again: a stream without sample counts knows its epoch's length only at its end
            if state.step_in_epoch < len(source):  # stopped inside the epoch: train.max_steps or step_budget
                state.close_epoch_losses()
                save("max_steps" if stop_at < total_steps else "step_budget")
                break
            check_finite()
            head_losses = state.close_epoch_losses()
            skipped = _global_skip_counts(source.stats, st)
            if any(skipped.values()):
                log.warning("epoch %d: skipped samples %s", state.epoch + 1, skipped)
            check_some_read(skipped, len(source) * cfg.train.global_batch, cfg.data.train_split, state.epoch + 1)
            jsonl.write(kind="epoch", epoch=state.epoch, step=state.step, loss=head_losses.tolist(), skipped=skipped)
            state.next_epoch()
            last = state.epoch >= cfg.train.epochs or state.step >= stop_at
            due = time.monotonic() - last_save >= cfg.train.checkpoint_min_seconds
            if st.distributed:  # each rank's clock differs, and save() is collective (streamed shards)
                due = bool(_world_max(st)(float(due)))
            if last or due:
                save("epoch end")
        # A signal during the last checkpoint write: evaluation is not started under a time limit.
        signum, _ = stop.agreed(st)
        if signum is not None:
            raise Preempted(signum, f"after training (step {state.step}, checkpoint written)")
    finally:
        stop.in_loop = False
        bar.close()
        jsonl.close()
    head_losses = state.head_losses
    log.info("final mean loss per head: %s", ", ".join(f"{v:.4f}" for v in head_losses.tolist()))
    model = state = None  # the DDP reducer must die before the process group (distributed.teardown)
    return head_losses


def evaluate(cfg: DictConfig, st: D.DistState, source: FeatureSource, head: SCPHead, head_losses: torch.Tensor,
             out_dir: Path) -> dict:
    """Every split through features -> head; rank 0 chooses, scores (next to k-means) and writes."""
    metrics = out_dir / "metrics.jsonl" if st.is_main else None
    preds, local_feats = {}, {}
    want_sample = cfg.output.report and cfg.output.save_assignments  # the page reads the assignments
    with stage("predict", metrics, _world_max(st)):
        for split in eval_splits(cfg):  # rank 0 holds the predictions, every rank its own features
            # The report's feature map needs a sample of the training split's features too.
            keep = cfg.output.kmeans or (want_sample and split == cfg.data.train_split)
            preds[split], local_feats[split] = predict(source.eval_batches(split), head, st,
                                                       keep_features=keep, split=split)
    with stage("kmeans", metrics, _world_max(st)):
        kmeans = kmeans_baseline(cfg, st, local_feats) if cfg.output.kmeans else None
    # Collective, like the k-means sample: only a few thousand rows travel to rank 0.
    sample = gather_feature_sample(cfg, st, local_feats[cfg.data.train_split]) if want_sample else None
    del local_feats
    with stage("report", metrics):  # rank 0: choice, Hungarian scores, eval.json, assignments
        results = report(cfg, preds, head_losses, out_dir, kmeans) if st.is_main else None
    results = D.broadcast_object(results)
    if st.is_main:
        jsonl = JsonlLog(out_dir / "metrics.jsonl")
        jsonl.write(kind="eval", **results)
        jsonl.close()
        if cfg.output.report:  # "report" is eval.json's stage; this one is the HTML page's
            with stage("report_html", metrics):
                page = report_after_run(cfg, out_dir, preds, results, sample)
            mirror = metrics_mirror(metrics)
            if page is not None and mirror is not None:
                for name, png in page.figures.items():
                    mirror.add_png(f"report/{name}", png)
        results["predictions"] = preds
    return results


def open_run(cfg: DictConfig, st: D.DistState, out_dir: Path) -> tuple[dict | None, IO[str] | None]:
    """Claim the run directory (rank 0 locks it), decide between resuming and starting, and only
    then write config.yaml: a refused resume leaves the run's files as they were. Returns the
    checkpoint to resume (on every rank) and the lock to hold for the run."""
    resume = cfg.train.resume
    if resume == "false" and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        # torchrun restarted the group after a failure: continuing is the point of the restart.
        log.info("torchrun restart %s: resuming from the last checkpoint", os.environ["TORCHELASTIC_RESTART_COUNT"])
        resume = "auto"
    held, found = None, None
    if st.is_main:
        held = rundir.lock(out_dir)
        try:
            if remove_stale_temporaries(out_dir):
                log.info("removed temporary files of an interrupted checkpoint write in %s", out_dir)
            if resume == "false":
                rundir.prepare_fresh(out_dir, cfg.output.overwrite)
            else:
                found = load_latest(out_dir, config_fingerprint(cfg), schema_defaults())
                if found is None and resume == "true":
                    raise CheckpointError(f"train.resume=true but {out_dir} holds no checkpoint "
                                          "(train.resume=auto starts fresh when there is none)")
            save_config(cfg, out_dir / "config.yaml")
        except BaseException:
            held.close()
            raise
    path = D.broadcast_object(str(found[1]) if found else None)
    if path is None:
        return None, held
    state = found[0] if found else torch.load(path, map_location="cpu", weights_only=False)
    log.info("resuming from %s", path)
    return state, held


def train(cfg: DictConfig, st: D.DistState, stop: StopSignals | None = None) -> dict:
    """build -> fit -> evaluate. Every rank calls it; rank 0's result holds the predictions."""
    check_world_size(cfg, st.world_size)
    check_tensorboard(cfg)
    prepare_data(cfg, st)
    out_dir = run_dir(cfg)
    resume_state, held = open_run(cfg, st, out_dir)
    metrics = out_dir / "metrics.jsonl" if st.is_main else None
    world_max = _world_max(st)
    try:
        if metrics is not None and cfg.output.tensorboard:
            # Every JsonlLog on metrics.jsonl now mirrors its scalars (runlog.TensorBoardMirror).
            mirror_metrics(metrics, out_dir / "tensorboard",
                           purge_step=resume_state["step"] + 1 if resume_state is not None else None)
        torch.manual_seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        precision = resolve_precision(cfg.train.precision, st.device)
        with stage("backbone", metrics, world_max):
            backbone = build_backbone(cfg.backbone).to(st.device)
        head = build_head(cfg, backbone.feature_dim, st)
        log.info("backbone %s: %d-d features at %dpx; head %s; world size %d on %s (%s)%s", backbone.name,
                 backbone.feature_dim, backbone.image_size, head.extra_repr(), st.world_size, st.device, precision,
                 f"; a rank stuck in a collective fails after dist.timeout_s={cfg.dist.timeout_s} s"
                 if st.distributed else "")
        with stage("features", metrics, world_max):  # cached mode: the extraction
            source = build_source(cfg, st, backbone, precision)
        del backbone  # cached mode: nothing holds it any more, its memory goes back before training
        if st.device.type == "cuda":
            torch.cuda.empty_cache()
        with stage("train", metrics, world_max):
            head_losses = fit(cfg, st, source, head, out_dir, precision, resume_state, stop)
        D.barrier()
        with stage("evaluate", metrics, world_max):
            return evaluate(cfg, st, source, head, head_losses, out_dir)
    finally:
        close_mirror(metrics)
        if held is not None:
            held.close()


def check_tensorboard(cfg: DictConfig) -> None:
    """output.tensorboard without the package fails now, on every rank, not after training."""
    if cfg.output.tensorboard:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("config key 'output.tensorboard': the tensorboard package is not installed "
                              "(pip install 'scp_dist[report]'), or set output.tensorboard=false")


def _world_max(st: D.DistState):
    def world_max(x: float) -> float:
        return float(D.max_detached(torch.tensor([x], dtype=torch.float64, device=st.collective_device)).item())

    return world_max


def check_some_read(skipped: dict[str, int], planned: int, split: str, epoch: int) -> None:
    """An epoch whose every sample was skipped trained nothing, and the next ones read the same data:
    stop now, not after the last epoch at an evaluation with nothing to cluster. `skipped` holds
    every rank's counts, so all ranks decide alike."""
    lost = sum(skipped.values())
    if planned and lost >= planned:
        reasons = ", ".join(f"{k} {v}" for k, v in skipped.items() if v)
        raise DataError(f"no sample of {split} could be read in epoch {epoch}: all {lost} were skipped "
                        f"({reasons}); the warnings above name each sample")


def _global_skip_counts(stats, st: D.DistState) -> dict[str, int]:
    if stats is None:
        return {}
    names = sorted(stats.as_dict())
    local = torch.tensor([stats.as_dict()[k] for k in names], dtype=torch.float64)
    total = D.sum_detached(local.to(st.collective_device))
    return {k: int(v) for k, v in zip(names, total.tolist(), strict=True)}


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _lost_a_peer(e: BaseException) -> bool:
    """A collective that failed because another rank is gone (gloo says so only in its message)."""
    return isinstance(e, torch.distributed.DistError) or any(
        s in str(e) for s in ("Connection closed by peer", "Connection reset by peer"))


def exit_code_for(e: Exception, st: D.DistState, stop: StopSignals) -> int:
    """How train() ended, said in one line wherever the user has something to do (a traceback only
    for what looks like a bug), and the exit code: 2 for the user's errors, EXIT_REQUEUE for a stop
    that can be continued, 1 otherwise. A rank that fails on its own tells the others why
    (distributed.report_failure): under torchrun they are stopped with a SIGTERM that would
    otherwise read as a preemption."""
    storage = isinstance(e, OSError) and e.errno in STORAGE_ERRNOS  # a full or read-only disk, named
    if isinstance(e, USER_ERRORS) or storage:
        print(f"error (rank {st.rank}): {e}", file=sys.stderr, flush=True)
        if st.distributed:
            D.report_failure(f"rank {st.rank} failed: {e}")
        return 2
    peer = D.peer_failure() if st.distributed else None
    if peer is not None:  # this rank stopped (a SIGTERM, a collective that lost that rank) because of it
        if st.is_main:  # one line for the job, not one per rank
            print(f"error (rank {st.rank}): stopped because {peer}", file=sys.stderr, flush=True)
        return 1
    if isinstance(e, Preempted):
        if st.is_main:
            maybe_peer = (" (under torchrun a SIGTERM also means another rank died without a word: if nothing "
                          "stopped this job, look for that rank's output)"
                          if st.distributed and e.outside_loop and e.signum == signal.SIGTERM else "")
            log.warning("%s; run the same command again (train.resume=auto) to continue%s", e, maybe_peer)
        return e.exit_code
    if st.distributed and (stop.signum is not None or _lost_a_peer(e)):
        print(f"error (rank {st.rank}): {_first_line(e)}: a peer rank failed or the job was stopped; see the other "
              "ranks' errors above", file=sys.stderr, flush=True)
        return 1
    traceback.print_exception(e)
    if st.distributed:
        D.report_failure(f"rank {st.rank} failed: {_first_line(e)}")
    return 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stop = StopSignals().install()
    st = D.init_distributed(cfg.train.device, cfg.dist.backend, cfg.dist.timeout_s)
    setup_logging(st.is_main)
    try:
        train(cfg, st, stop)
    except Exception as e:  # noqa: BLE001 - every way out but success gets its line and exit code
        code = exit_code_for(e, st, stop)
    else:
        D.teardown()
        return 0
    if st.distributed:
        D.exit_now(code)  # no barrier on the way out: see distributed.exit_now
    return code


if __name__ == "__main__":
    raise SystemExit(main())
