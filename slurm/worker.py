"""One torchrun worker under slurm/launch.sh: `python -m scp_dist.train`, with USR1 and TERM given
back their default action and a stop that came before the worker existed honoured.

launch.sh runs torchrun with USR1 and TERM ignored: Slurm signals every process of a step, the
workers included, so torchrun must neither forward those signals (a worker would get two, and the
trainer takes a second signal as "exit now, without a checkpoint") nor die of USR1 (orphaning its
workers). An ignored signal stays ignored across fork and exec, so a worker resets both first: a
signal during its imports ends it, and the trainer installs its own handlers (checkpoint at the
current step, then exit) as it starts. A signal that came while torchrun was still starting
reached no worker; launch.sh then leaves $SCP_STOP_FILE, and the worker exits here.
"""

import os
import runpy
import signal
import sys

EXIT_REQUEUE = 75  # scp_dist.train.EXIT_REQUEUE, without importing torch first

for _sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(_sig, signal.SIG_DFL)
_stop = os.environ.get("SCP_STOP_FILE")
if _stop and os.path.exists(_stop):
    print(f"[scp] stopped before the start (a signal while torchrun started: {_stop})", file=sys.stderr, flush=True)
    sys.exit(EXIT_REQUEUE)

runpy.run_module("scp_dist.train", run_name="__main__", alter_sys=True)
