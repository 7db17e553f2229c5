"""train.spike.action=rollback: a loss spike sends the run back to its last checkpoint before it,
through the run's one restore (harness.train.run_state), and the spiking batches are left out."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch.distributed as dist

from harness.checkpoint import Checkpointer, CheckpointError, checkpoint_step, complete_checkpoints
from harness.config import SpikeConfig
from harness.errors import TrainingAborted
from harness.observe.console import print0
from harness.runtime.dist import RankInfo
from harness.train.run_state import RunState


class Recovery:
    """What the loop does when the rows it read carry a loss spike or an abort."""

    def __init__(self, spike: SpikeConfig, checkpoint_dir: Path, state: RunState, checkpointer: Checkpointer,
                 info: RankInfo) -> None:
        self.spike = spike
        self.checkpoint_dir = checkpoint_dir
        self.state = state
        self.checkpointer = checkpointer
        self.info = info

    @property
    def rolls_back(self) -> bool:
        return self.spike.action == "rollback"

    def abort(self, reason: str) -> TrainingAborted:
        """Before the run stops on an abort (a decision every rank shares): commit the save still
        being written, which holds the last good state. Returns the exception to raise."""
        self.land_in_flight_save()
        return TrainingAborted(reason)

    def land_in_flight_save(self) -> None:
        try:
            self.checkpointer.finish()
        except CheckpointError as exc:
            print0(self.info.rank, f"warning: {exc}")

    def roll_back(self, spike_steps: Sequence[int]) -> Optional[int]:
        """Reload the newest checkpoint from before the first spike; the spiking steps' batches are
        left out from then on. Returns the step the run continues after, or None when there is no
        checkpoint to go back to (the spiking updates were skipped; training goes on)."""
        first = min(spike_steps)
        state = self.state
        if state.rollbacks >= self.spike.max_rollbacks:
            raise self.abort(
                f"step {first}: loss spike after {state.rollbacks} rollback(s) (train.spike.max_rollbacks="
                f"{self.spike.max_rollbacks}); the run keeps diverging: lower train.lr, check the data near "
                f"step {first}, or raise train.spike.max_rollbacks"
            )
        self.checkpointer.finish()  # the save in flight, if any, is from before the spike was read
        listing = [[str(p) for p in complete_checkpoints(self.checkpoint_dir)] if self.info.is_main else None]
        dist.broadcast_object_list(listing, src=0)  # one listing: every rank loads the same one
        before = [Path(p) for p in listing[0] if checkpoint_step(Path(p)) < first]
        if not before:
            print0(self.info.rank, f"warning: no checkpoint before step {first} to roll back to; the spiking "
                                   "update was skipped and training goes on")
            return None
        path = before[-1]
        restored = state.roll_back(path, spike_steps)
        print0(self.info.rank, f"rollback {state.rollbacks}/{self.spike.max_rollbacks}: reloaded {path.name}; "
                               f"continuing after step {restored.step} without the batches of step(s) "
                               f"{', '.join(map(str, spike_steps))}")
        return restored.step
