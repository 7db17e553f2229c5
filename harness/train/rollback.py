"""train.spike.action=rollback: a loss spike sends the run back to its last checkpoint before it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch.distributed as dist

from harness.checkpoint import checkpoint_step, complete_checkpoints, load_checkpoint
from harness.errors import TrainingAborted
from harness.observe.console import print0

if TYPE_CHECKING:
    from harness.train.loop import Loop


def roll_back(loop: Loop, spike_steps: list[int]) -> Optional[int]:
    """After a loss spike (train.spike.action=rollback): reload the newest checkpoint from before
    the first spike; the spiking steps' batches are left out from then on. Returns the step the run continues after, or None when there
    is no checkpoint to go back to (the spiking updates were skipped; training goes on)."""
    cfg = loop.cfg
    first = min(spike_steps)
    if loop.rollbacks >= cfg.train.spike.max_rollbacks:
        loop.land_in_flight_save()
        raise TrainingAborted(
            f"step {first}: loss spike after {loop.rollbacks} rollback(s) (train.spike.max_rollbacks="
            f"{cfg.train.spike.max_rollbacks}); the run keeps diverging: lower train.lr, check the data near "
            f"step {first}, or raise train.spike.max_rollbacks"
        )
    loop.checkpointer.finish()  # the save in flight, if any, is from before the spike was read
    listing = [[str(p) for p in complete_checkpoints(Path(cfg.checkpoint.dir))] if loop.info.is_main else None]
    dist.broadcast_object_list(listing, src=0)  # one listing: every rank loads the same one
    before = [Path(p) for p in listing[0] if checkpoint_step(Path(p)) < first]
    if not before:
        print0(loop.info.rank, f"warning: no checkpoint before step {first} to roll back to; the spiking update "
                               "was skipped and training goes on")
        return None
    path = before[-1]
    state = load_checkpoint(path, loop.backend, cfg, loop.info, loop.device, loop.batches.shape.global_batch)
    loop.scaler.load_state_dict(state.scaler)
    if loop.spikes is not None:
        loop.spikes.load_state_dict(state.spikes)
    loop.rollbacks += 1
    loop.skipped_batches += len(spike_steps)
    loop.batches.restart(state.step, state.sequences_consumed, [*loop.batches.skip_steps, *spike_steps])
    print0(loop.info.rank, f"rollback {loop.rollbacks}/{cfg.train.spike.max_rollbacks}: reloaded {path.name}; "
                           f"continuing after step {state.step} without the batches of step(s) "
                           f"{', '.join(map(str, spike_steps))}")
    return state.step

