"""Sharding backends behind one small interface.

Every difference between FSDP2 and DeepSpeed lives in this folder; the trainer, the loss scaler
and the checkpoint code only ever talk to a `ParallelBackend`.
"""

from __future__ import annotations

import torch

from harness.config import Config
from harness.parallel.base import ParallelBackend
from harness.precision import PrecisionPolicy


def build_backend(cfg: Config, policy: PrecisionPolicy, device: torch.device, world_size: int) -> ParallelBackend:
    if cfg.parallel.backend == "fsdp2":
        from harness.parallel.fsdp2 import FSDP2Backend

        return FSDP2Backend(cfg.parallel, policy, device, world_size)
    raise AssertionError(f"config validation let through parallel.backend={cfg.parallel.backend!r}")


__all__ = ["ParallelBackend", "build_backend"]
