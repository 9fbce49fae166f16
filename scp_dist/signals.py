"""Stop signals: SIGUSR1 (SLURM's warning before the time limit), SIGTERM (preemption, torchrun
shutting its workers down) and SIGINT (Ctrl-C).

Inside the training loop a signal only raises a flag; after each step the ranks agree (one tiny
all-reduce) whether any rank was signalled, so all of them stop after the same step, rank 0 writes
a checkpoint at that step and every rank exits with EXIT_REQUEUE (the SLURM script requeues on it).
Outside the loop (feature extraction, evaluation) there is no step to save: the signal raises
Preempted at once, and what is already on disk (finished cache parts, checkpoints) is kept.
A second Ctrl-C exits at once, for a user who does not want to wait for the step. A repeated
SIGUSR1/SIGTERM is ignored: Slurm signals every process of a step and a launcher may pass the same
signal on again, and exiting on the second one would lose the checkpoint being written.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

import torch

from scp_dist import distributed as D

EXIT_REQUEUE = 75  # sysexits' EX_TEMPFAIL: stopped on request with a checkpoint, run again to continue
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports it
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    def __init__(self, signum: int, where: str, outside_loop: bool = False) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}")
        self.signum = signum
        # Outside the loop no rank agreed to stop: under torchrun the signal may be its stop of the
        # other workers after one of them died (train.main says so).
        self.outside_loop = outside_loop

    @property
    def exit_code(self) -> int:
        return EXIT_INTERRUPTED if self.signum == signal.SIGINT else EXIT_REQUEUE


class StopSignals:
    """Installed once per process (main thread). `in_loop` says whether the training loop is
    polling the flag; elsewhere the first signal raises."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.in_loop = False

    def install(self) -> StopSignals:
        for s in STOP_SIGNALS:
            signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            if signum != signal.SIGINT:
                return  # already stopping
            print("second Ctrl-C: exiting now, without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        if not self.in_loop:
            raise Preempted(signum, "outside the training loop", outside_loop=True)

    def agreed(self, st: D.DistState, due: bool = False) -> tuple[int | None, bool]:
        """The signal any rank received (or None), and whether any rank says a checkpoint is `due`:
        the same answers on every rank (collective: all call it after the same step). One all-reduce
        carries both because a rank's `due` may come from its own clock (train.checkpoint_minutes),
        and save() is collective with streamed shards: ranks that decided alone could hang."""
        if not st.distributed:
            return self.signum, due
        got = D.max_detached(torch.tensor([float(self.signum or 0), float(due)], dtype=torch.float64,
                                          device=st.collective_device)).tolist()
        return int(got[0]) or None, bool(got[1])
