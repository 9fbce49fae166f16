"""The training state as one object: what a step checkpoint holds (scp_dist/checkpoint.py) and what
a resumed run restores to continue bit for bit as if it had never stopped.

A checkpoint file is state_dict() plus `reason` and `fingerprint`, one flat dict: the keys are
those of files written before this class existed, so those still resume.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scp_dist.checkpoint import save_checkpoint
from scp_dist.loss import MarginalEstimate


class TrainState:
    """The head(s), optimizer, GradScaler and marginal estimate (None: each batch's marginals), the
    position (`step_in_epoch` steps of epoch `epoch` are behind us, global step `step`), the epoch's
    running per-head loss sums and the RNG states.

    The loss sums travel with the position so a mid-epoch resume reports the same epoch loss. They
    stay on the device until a log line or a checkpoint reads them: reading one every step would
    make the CPU wait for the GPU each step, and a head-only step is short."""

    def __init__(self, head: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 marginal: MarginalEstimate | None, num_heads: int, device: torch.device, world_size: int) -> None:
        self.head, self.optimizer, self.scaler, self.marginal = head, optimizer, scaler, marginal
        # The ranks training this state; a mid-epoch position is theirs (data.order=windowed).
        self.world_size = world_size
        self.resumed_world_size: int | None = None  # the ranks that wrote the state, once loaded
        self.epoch = self.step_in_epoch = self.step = 0
        self.head_losses = torch.zeros(num_heads)  # the last finished epoch's mean loss per head
        self.loss_sum = torch.zeros(num_heads, device=device)
        self.loss_steps = 0

    def advance(self) -> None:
        self.step, self.step_in_epoch = self.step + 1, self.step_in_epoch + 1

    def add_loss(self, per_head: torch.Tensor) -> None:
        """One step that updated the head: its per-head loss into the epoch's sums."""
        self.loss_steps += 1
        self.loss_sum += per_head.detach().float()

    def close_epoch_losses(self) -> torch.Tensor:
        """The mean loss per head over the steps so far (the epoch's, at its end); kept as head_losses."""
        self.head_losses = self.loss_sum.cpu() / max(self.loss_steps, 1)
        return self.head_losses

    def next_epoch(self) -> None:
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.loss_sum, self.loss_steps = torch.zeros_like(self.loss_sum), 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "marginal": self.marginal.state_dict() if self.marginal is not None else None,
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "step": self.step,
            "head_losses": self.head_losses.tolist(), "loss_sum": self.loss_sum.tolist(),
            "loss_steps": self.loss_steps, "rng": _rng_states(), "world_size": self.world_size,
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.head.load_state_dict(s["head"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.scaler.load_state_dict(s["scaler"])
        if self.marginal is not None:
            self.marginal.load_state_dict(s["marginal"])
        _set_rng_states(s["rng"])
        self.epoch, self.step_in_epoch, self.step = s["epoch"], s["step_in_epoch"], s["step"]
        self.head_losses, self.loss_steps = torch.tensor(s["head_losses"]), s["loss_steps"]
        self.loss_sum = torch.tensor(s["loss_sum"], device=self.loss_sum.device)
        self.resumed_world_size = s["world_size"]

    def save(self, run: Path, reason: str, fingerprint: dict[str, Any], keep: int, data: dict | None = None) -> Path:
        """The checkpoint of the current step in `run` (the newest `keep` kept); `fingerprint` is what
        checkpoint.load_latest compares a resume's config with; `data` the feature source's own
        resume state (streamed shards: the samples the epoch has used), under "data"."""
        return save_checkpoint(run, {**self.state_dict(), "reason": reason, "fingerprint": fingerprint,
                                     "data": data}, keep=keep)


def _rng_states() -> dict[str, Any]:
    # Training draws nothing from these (views are a function of seed, epoch and sample), but a
    # resumed run should not depend on that staying true.
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_states(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])
