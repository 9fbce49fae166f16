"""Atomic checkpoints of the trainable state, refused when they come from a different config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from scp_dist.fileio import atomic_write

CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic: a crash during the write leaves the previous checkpoint."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"train.resume=true but there is no checkpoint at {path} "
                              "(train.resume=auto starts fresh when there is none)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    theirs = state.get("fingerprint")
    if theirs != fingerprint:
        diff = sorted(k for k in set(fingerprint) | set(theirs or {}) if (theirs or {}).get(k) != fingerprint.get(k))
        raise CheckpointError(
            f"checkpoint {path} was written by a different config (differs in: {', '.join(diff)}); "
            "use a new output.run_name or the original config"
        )
    return state
