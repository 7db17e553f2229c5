"""Stop cleanly when the scheduler says so: SIGTERM (preemption, scancel, a node draining) or
SIGUSR1 (Slurm's warning before the time limit, `#SBATCH --signal=B:USR1@120`).

The handler only records the signal; the flag travels in the trainer's end-of-step all-reduce, so
all ranks agree on the step to stop at (signals reach ranks at slightly different times, and a
checkpoint needs every rank at the same step), then one checkpoint is saved and the process exits with
EXIT_PREEMPTED so the launcher script knows to requeue. A second signal while saving changes
nothing: the flag is already set, and the checkpoint only becomes visible when complete.
"""

from __future__ import annotations

import signal
from typing import Optional

EXIT_PREEMPTED = 75
"""EX_TEMPFAIL: stopped on request after saving a checkpoint; run the job again to continue."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


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
