"""Sharding backends behind one small interface.

Every difference between FSDP2 and DeepSpeed lives in this folder; the trainer, the loss scaler
and the checkpoint code only ever talk to a `ParallelBackend`.

base.py             the interface (wrap model + optimizer, backward, gradient shards, step or skip,
                    state pieces for checkpoints)
fsdp2.py            FSDP2: fully_shard per block then the root, one MixedPrecisionPolicy
deepspeed/          DeepSpeed ZeRO-1/2/3 (backend, optimizer layouts, its private names in one place)
initial_weights.py  writing the initial weights into whatever pieces a rank owns
mesh.py             the job's ranks in named dimensions, built once (data-parallel coordinates,
                    the mesh FSDP2 shards over, which copy of a tensor counts)
select.py           the backend a config asks for
preflight.py        the backend's own checks of a config's files, before any rank starts

Names are handed on lazily, so `harness check` reaches preflight.py without importing torch.
What each layout can do, as torch-free data, is harness.config.layouts.
"""

import importlib
from typing import Any

_EXPORTS = {"ParallelBackend": "base", "StatePiece": "base", "build_backend": "select", "layout_name": "select",
            "check_backend_file": "preflight", "GradShard": "base", "Run": "base",
            "ParallelMesh": "mesh", "MeshShape": "mesh", "build_mesh": "mesh"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'harness.parallel' has no attribute {name!r}")
    return getattr(importlib.import_module(f"harness.parallel.{_EXPORTS[name]}"), name)
