"""Sharding backends behind one small interface.

Every difference between FSDP2 and DeepSpeed lives in this folder; the trainer, the loss scaler
and the checkpoint code only ever talk to a `ParallelBackend`.

base.py             the interface (wrap model + optimizer, backward, gradient shards, step or skip,
                    state pieces for checkpoints)
fsdp2.py            FSDP2: fully_shard per block then the root, one MixedPrecisionPolicy
deepspeed/          DeepSpeed ZeRO-1/2/3 (backend, optimizer layouts, its private names in one place)
initial_weights.py  writing the initial weights into whatever pieces a rank owns
select.py           the backend a config asks for
"""

from harness.parallel.base import ParallelBackend, StatePiece
from harness.parallel.select import build_backend, layout_name

__all__ = ["ParallelBackend", "StatePiece", "build_backend", "layout_name"]
