"""Learning-rate schedule: optional linear warmup, then cosine annealing to min_lr (the paper's cosine)."""

from __future__ import annotations

import math


def schedule_steps(epochs: int, steps_per_epoch: int, step_budget: int = 0) -> int:
    """The run's length in steps: train.epochs, cut to train.step_budget when that is set and shorter.
    A budget makes one recipe affordable at any data size: a small set gets its epochs, a large one
    stops (mid-epoch) at the budget with the cosine annealed over the budget."""
    total = epochs * steps_per_epoch
    return min(total, step_budget) if step_budget > 0 else total


def epochs_run(epochs: int, steps_per_epoch: int, step_budget: int = 0) -> int:
    """How many epochs schedule_steps touches (the last one possibly in part)."""
    return -(-schedule_steps(epochs, steps_per_epoch, step_budget) // max(1, steps_per_epoch))


def lr_at(step: int, total_steps: int, base_lr: float, schedule: str, warmup_steps: int = 0, min_lr: float = 0.0) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return base_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
