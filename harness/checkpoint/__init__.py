"""Sharded, verified, backend- and world-size-independent checkpoints.

format.py   the layout of a step-<N> folder, its manifest and the integrity check
save.py     every rank writes its own pieces (in the background with checkpoint.async_save); rank 0
            commits atomically
staging.py  the host copy a background save writes from, and the safetensors writer
load.py     choosing a checkpoint to resume from; reading any element range of any parameter
export.py   a checkpoint as a Hugging Face folder
"""

from harness.checkpoint.format import (
                                       CheckpointError,
                                       TrainerState,
                                       checkpoint_step,
                                       complete_checkpoints,
                                       read_manifest,
                                       verify,
)
from harness.checkpoint.load import ShardReader, choose_resume, load_checkpoint
from harness.checkpoint.save import Checkpointer

__all__ = [
    "CheckpointError", "Checkpointer", "ShardReader", "TrainerState", "checkpoint_step", "choose_resume",
    "complete_checkpoints", "load_checkpoint", "read_manifest", "verify",
]
