"""Sharding backends behind one small interface.

Every difference between FSDP2 and DeepSpeed lives in this folder; the trainer, the loss scaler
and the checkpoint code only ever talk to a `ParallelBackend`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # this package is imported by config.py, which must not import torch
    import torch

    from harness.config import Config, ParallelConfig
    from harness.parallel.base import ParallelBackend
    from harness.precision import PrecisionPolicy


def build_backend(cfg: Config, policy: PrecisionPolicy, device: torch.device, world_size: int) -> ParallelBackend:
    if cfg.parallel.backend == "fsdp2":
        from harness.parallel.fsdp2 import FSDP2Backend

        return FSDP2Backend(cfg.parallel, policy, device, world_size)
    if cfg.parallel.backend == "deepspeed":
        from harness.parallel.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(cfg, policy, device, world_size)
    raise AssertionError(f"config validation let through parallel.backend={cfg.parallel.backend!r}")


def layout_name(parallel: ParallelConfig) -> str:
    """The sharding layout a config asks for, as `harness estimate` names its columns:
    fsdp2, zero1, zero2 or zero3."""
    if parallel.backend == "fsdp2":
        return "fsdp2"
    return f"zero{parallel.zero_stage}"
