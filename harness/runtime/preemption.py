"""Stop cleanly when asked: SIGTERM (preemption, scancel, a node draining, `kill`), SIGUSR1
(Slurm's warning before the time limit, `#SBATCH --signal=B:USR1@120`) or SIGINT (Ctrl-C).

The handler only records the signal; the flag travels in the trainer's end-of-step all-reduce, so
all ranks agree on the step to stop at (signals reach ranks at slightly different times, and a
checkpoint needs every rank at the same step), then one checkpoint is saved and the process exits:
under Slurm with EXIT_PREEMPTED, so the job script knows to requeue; elsewhere with 0 (the run is
resumable with resume=auto). A second SIGINT or SIGTERM means "now": the process exits at once
(128 + the signal); a checkpoint being written then was never committed, so the previous one stays
the newest intact one. A second SIGUSR1 changes nothing (Slurm may repeat its warning).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Mapping, Optional

EXIT_PREEMPTED = 75
"""EX_TEMPFAIL: stopped on request after saving a checkpoint; run the job again to continue."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_IMMEDIATE_ON_REPEAT = (signal.SIGTERM, signal.SIGINT)


def stopped_exit_code(env: Mapping[str, str] = os.environ) -> int:
    """What a run stopped by a signal (after its checkpoint) exits with: EXIT_PREEMPTED inside a
    Slurm job (the job script requeues on it), 0 elsewhere (nothing failed; resume=auto goes on)."""
    return EXIT_PREEMPTED if env.get("SLURM_JOB_ID") else 0


class StopRequest:
    def __init__(self) -> None:
        self.received: Optional[str] = None

    def install(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            return
        if signum in _IMMEDIATE_ON_REPEAT:
            name = signal.Signals(signum).name
            if os.environ.get("RANK", "0") == "0":  # every rank gets it; one says so
                print(f"harness: second {name}: exiting now, without finishing the checkpoint in progress; the last "
                      "complete checkpoint is untouched", file=sys.stderr, flush=True)
            os._exit(128 + signum)
