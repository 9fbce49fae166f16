"""Step checkpoints of the trainable state: atomic, the last K kept, refused when they come from a
config that would give a different result.

Layout: `<run dir>/checkpoints/step-000001234.pt`, one file per checkpoint, named by the global step.
A file is written under a temporary name, fsynced and renamed (scp_dist/fileio.py), so a kill at
any moment leaves either the previous file set or the new one, never half a file. The newest file
that reads back is resumed; one that does not (a disk that lied, a truncated copy) is skipped with
a warning in favour of the one before, which is why more than one is kept.
"""

from __future__ import annotations

import errno
import logging
import re
from pathlib import Path
from typing import Any

import torch

from scp_dist.errors import UserError
from scp_dist.fileio import atomic_write

log = logging.getLogger("scp_dist")
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{9})\.pt$")


class CheckpointError(UserError, RuntimeError):
    pass


def checkpoint_dir(run: Path) -> Path:
    return Path(run) / CHECKPOINT_DIR


def list_checkpoints(run: Path) -> list[Path]:
    """Checkpoint files of a run, oldest first."""
    d = checkpoint_dir(run)
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if _NAME.match(p.name)), key=lambda p: int(_NAME.match(p.name)[1]))


def remove_stale_temporaries(run: Path) -> int:
    """Temp files left by a checkpoint write that was killed; only called while holding the run lock."""
    d = checkpoint_dir(run)
    stale = list(d.glob(".step-*.tmp")) if d.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def save_checkpoint(run: Path, state: dict[str, Any], keep: int) -> Path:
    """Write the checkpoint of global step state["step"], then delete all but the newest `keep`."""
    path = checkpoint_dir(run) / f"step-{int(state['step']):09d}.pt"
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except OSError as e:  # a full disk, a quota, a read-only mount: the user fixes it, then resumes
        before = list_checkpoints(run)  # what was there is untouched: atomic_write renames only a whole file
        kept = (f"the newest checkpoint, {before[-1].name}, is intact: once the storage takes the write, the same "
                "command continues from it" if before else "there is no earlier checkpoint")
        raise CheckpointError(f"checkpoint {path} was not written: {e.strerror} "
                              f"({errno.errorcode.get(e.errno, e.errno)}); {kept}") from e
    for old in list_checkpoints(run)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def _fingerprint_diff(ours: dict[str, Any], theirs: dict[str, Any], defaults: dict[str, Any] | None = None
                      ) -> list[str]:
    """The keys whose values differ. A key the checkpoint does not have (added to the schema after it
    was written) is no difference while ours holds the schema's default: the old run ran as that."""
    defaults = defaults or {}
    return sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k)
                  and not (k not in theirs and k in defaults and ours[k] == defaults[k]))


def newest_readable(run: Path) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that reads back and its path, or None when the run has none; an
    unreadable one is skipped with a warning (the reason more than one is kept). Raises
    CheckpointError when there are checkpoints but none reads."""
    for path in reversed(list_checkpoints(run)):
        try:
            return torch.load(path, map_location="cpu", weights_only=False), path
        except Exception as e:  # noqa: BLE001 - any unreadable file: fall back to the previous one
            log.warning("checkpoint %s cannot be read (%s: %s); trying the previous one", path,
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    if list_checkpoints(run):
        raise CheckpointError(f"no checkpoint in {checkpoint_dir(run)} can be read; move the folder away or "
                              "start over with train.resume=false output.overwrite=true")
    return None


def load_latest(run: Path, fingerprint: dict[str, Any], defaults: dict[str, Any] | None = None
                ) -> tuple[dict[str, Any], Path] | None:
    """The newest readable checkpoint and its path, or None when the run has none. A checkpoint
    from a config that differs in a key that changes the result is refused (the keys are named):
    resuming it would silently mix two experiments. `defaults`: the schema's flat defaults, for keys
    newer than the checkpoint."""
    found = newest_readable(run)
    if found is not None:
        state, path = found
        diff = _fingerprint_diff(fingerprint, state.get("fingerprint") or {}, defaults)
        if diff:
            shown = ", ".join(f"{k} ({state.get('fingerprint', {}).get(k)!r} -> {fingerprint.get(k)!r})"
                              for k in diff[:8])
            raise CheckpointError(
                f"the checkpoint {path} was written with a config that gives a different result; it differs in "
                f"{shown}{' ...' if len(diff) > 8 else ''}. Use the original values, a new output.run_name, or "
                "train.resume=false output.overwrite=true to start this run over")
    return found
