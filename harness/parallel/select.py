"""Which backend a config asks for, built; and its layout's name."""

from __future__ import annotations

import torch

from harness.config import Config, ParallelConfig
from harness.numerics.precision import PrecisionPolicy
from harness.parallel.base import ParallelBackend
from harness.parallel.layouts import layout_of


def build_backend(cfg: Config, policy: PrecisionPolicy, device: torch.device, world_size: int) -> ParallelBackend:
    if cfg.parallel.backend == "fsdp2":
        from harness.parallel.fsdp2 import FSDP2Backend

        return FSDP2Backend(cfg.parallel, policy, device, world_size)
    if cfg.parallel.backend == "deepspeed":
        from harness.parallel.deepspeed.backend import DeepSpeedBackend

        return DeepSpeedBackend(cfg, policy, device, world_size)
    raise AssertionError(f"config validation let through parallel.backend={cfg.parallel.backend!r}")


def layout_name(parallel: ParallelConfig) -> str:
    """The sharding layout a config asks for, as `harness estimate` names its columns:
    fsdp2, zero1, zero2 or zero3."""
    return layout_of(parallel).name
