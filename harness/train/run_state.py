"""A run's state, and the one way to save and restore it.

Every checkpoint's trainer state is made by `RunState.capture`, and resume (resume=auto|PATH),
resume.weights_only and a loss-spike rollback all go through `RunState.restore`. State added to a
run (a new counter, a new component's position) is added here once, and every path that restores
a run restores it: the copies cannot drift.

What a run's state is: the backend's model and optimizer pieces and the AdamW step count (read and
written by harness.checkpoint), the RNG streams, the loss scaler, the spike guard's window, the data
position (step, sequences consumed, batches left out after it), the recovery counters, and, with
LoRA, the identity of the frozen base the adapters belong to.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from harness.checkpoint import TrainerState, load_checkpoint
from harness.config import Config
from harness.data import TrainBatches
from harness.numerics.grad_scale import GradScaler
from harness.numerics.optim import adam_step_count
from harness.numerics.spikes import SpikeGuard
from harness.parallel.base import ParallelBackend
from harness.runtime.dist import RankInfo


@dataclass
class RunState:
    """The live objects whose state a checkpoint holds, and the counters that belong to no one of them."""

    cfg: Config
    info: RankInfo
    device: torch.device
    backend: ParallelBackend
    scaler: GradScaler
    spikes: SpikeGuard
    batches: TrainBatches
    lora_base: Optional[dict]
    """With LoRA: the frozen base the adapters belong to (harness.model.lora.base_identity); a
    checkpoint names it and a restore refuses another."""
    rollbacks: int = 0
    """Loss-spike rollbacks so far (this run and the ones it resumed)."""
    skipped_batches: int = 0
    """Batches left out by those rollbacks."""

    def capture(self, step: int) -> TrainerState:
        """The trainer state of a checkpoint taken after step `step`."""
        return TrainerState(
            step=step,
            sequences_consumed=self.batches.consumed_after(step),
            global_batch=self.batches.shape.global_batch,
            world_size=self.info.world_size,
            scaler=self.scaler.state_dict(),
            adam_steps=adam_step_count(self.backend.torch_optimizer),
            spikes=self.spikes.state_dict(),
            skipped_batches=self.skipped_batches,
            skip_steps=[s for s in self.batches.skip_steps if s > step],
            rollbacks=self.rollbacks,
        )

    def restore(self, path: Path, weights_only: bool = False) -> Optional[TrainerState]:
        """Load checkpoint `path` into every part of the run; the run continues after the returned
        state's step. With `weights_only` only the weights are loaded (a new run from step 0:
        returns None)."""
        state = load_checkpoint(path, self.backend, self.cfg, self.info, self.device,
                                self.batches.shape.global_batch, self.lora_base, weights_only=weights_only)
        if state is None:
            return None
        self.scaler.load_state_dict(state.scaler)
        self.spikes.load_state_dict(state.spikes)
        self.rollbacks, self.skipped_batches = state.rollbacks, state.skipped_batches
        self.batches.restart(state.step, state.sequences_consumed, state.skip_steps)
        return state

    def roll_back(self, path: Path, spike_steps: Sequence[int]) -> TrainerState:
        """Restore `path`, a checkpoint from before `spike_steps`, and leave those steps' batches
        out from now on (the stream moves one global batch further at each). Batches left out by
        earlier rollbacks stay out, and the counters go on from their live values."""
        left_out = [*self.batches.skip_steps, *spike_steps]
        rollbacks, skipped_batches = self.rollbacks, self.skipped_batches
        state = self.restore(path)
        self.rollbacks, self.skipped_batches = rollbacks + 1, skipped_batches + len(spike_steps)
        self.batches.restart(state.step, state.sequences_consumed, left_out)
        return state
