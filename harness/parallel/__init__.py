"""Sharding backends behind one small interface.

Every difference between FSDP2 and DeepSpeed lives in this folder; the trainer, the loss scaler
and the checkpoint code only ever talk to a `ParallelBackend`.

base.py             the interface (wrap model + optimizer, backward, gradient shards, step or skip,
                    state pieces for checkpoints)
fsdp2.py            FSDP2: fully_shard per block then the root, one MixedPrecisionPolicy
deepspeed/          DeepSpeed ZeRO-1/2/3 (backend, optimizer layouts, its private names in one place)
initial_weights.py  writing the initial weights into whatever pieces a rank owns
layouts.py          what each layout can do, as plain data (config validation reads it, no torch)
select.py           the backend a config asks for
preflight.py        the backend's own checks of a config's files, before any rank starts

Names are handed on lazily, so config validation can read layouts.py without importing torch.
"""

import importlib
from typing import Any

_EXPORTS = {"ParallelBackend": "base", "StatePiece": "base", "build_backend": "select", "layout_name": "select",
            "Layout": "layouts", "layout_of": "layouts",
            "check_backend_file": "preflight"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'harness.parallel' has no attribute {name!r}")
    return getattr(importlib.import_module(f"harness.parallel.{_EXPORTS[name]}"), name)
