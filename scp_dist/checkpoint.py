"""Atomic checkpoints of the trainable state, refused when they come from a different config."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temp file in the same directory, fsync, rename: a crash leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"train.resume=true but there is no checkpoint at {path}")
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
