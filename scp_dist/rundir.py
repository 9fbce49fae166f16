"""The run directory: one run at a time (a lock), and never a silent overwrite of a finished one."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
from pathlib import Path
from typing import IO

from scp_dist.checkpoint import CHECKPOINT_DIR, list_checkpoints
from scp_dist.errors import UserError

LOCK_NAME = ".lock"
# What a run writes; output.overwrite=true deletes exactly these (features/ is shared by runs, kept).
RUN_FILES = (CHECKPOINT_DIR, "metrics.jsonl", "eval.json", "assignments_*.csv", "config.yaml")


class RunDirError(UserError, RuntimeError):
    """The run directory is in use, or holds a run the user did not say to continue or replace."""


def lock(run: Path) -> IO[str]:
    """An exclusive flock held for the life of the returned file (the process: the kernel drops it
    on any exit, kill -9 included, so a crashed run never leaves a stale lock). Two jobs writing one
    run directory interleave metrics and overwrite each other's checkpoints."""
    run.mkdir(parents=True, exist_ok=True)
    f = open(run / LOCK_NAME, "a+")  # noqa: SIM115 - held until the process exits
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunDirError(f"run directory {run} is in use by {holder}; wait for it, or choose another "
                          "output.run_name") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def holds_a_run(run: Path) -> bool:
    return bool(list_checkpoints(run)) or (run / "eval.json").is_file()


def prepare_fresh(run: Path, overwrite: bool) -> None:
    """train.resume=false: start in an empty run directory. One holding checkpoints or results is
    refused unless output.overwrite=true, which deletes them first."""
    if not holds_a_run(run):
        return
    if not overwrite:
        raise RunDirError(f"run directory {run} already holds a run; continue it with train.resume=auto, "
                          "replace it with output.overwrite=true, or choose another output.run_name")
    for pattern in RUN_FILES:
        for p in run.glob(pattern):
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
