"""Which backend a config asks for, built; and its layout's name."""

from __future__ import annotations

import torch

from harness.config import Config, ParallelConfig
from harness.config.layouts import layout_of
from harness.numerics.precision import PrecisionPolicy
from harness.parallel.base import ParallelBackend
from harness.parallel.mesh import ParallelMesh


def build_backend(cfg: Config, policy: PrecisionPolicy, device: torch.device, mesh: ParallelMesh) -> ParallelBackend:
    """The backend, handed the job's one mesh (harness.parallel.mesh): it builds no mesh of its own."""
    if cfg.parallel.backend == "fsdp2":
        from harness.parallel.fsdp2 import FSDP2Backend

        return FSDP2Backend(cfg.parallel, policy, device, mesh)
    if cfg.parallel.backend == "deepspeed":
        from harness.parallel.deepspeed.backend import DeepSpeedBackend

        return DeepSpeedBackend(cfg, policy, device, mesh)
    raise AssertionError(f"config validation let through parallel.backend={cfg.parallel.backend!r}")


def layout_name(parallel: ParallelConfig) -> str:
    """The sharding layout a config asks for, as `harness estimate` names its columns:
    fsdp2, zero1, zero2 or zero3."""
    return layout_of(parallel).name
