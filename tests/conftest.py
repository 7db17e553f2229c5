"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch.distributed as dist


@pytest.fixture(scope="session")
def world_of_one():
    """A real single-rank gloo process group in the pytest process, for code that all-reduces."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if created:
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def deepspeed_scaler_cls(world_of_one):
    """DeepSpeed's own DynamicLossScaler (its update_scale needs deepspeed.comm to be up)."""
    import deepspeed
    import deepspeed.comm

    # Avoid JIT-compiling DeepSpeed's shared-memory op; a world of one never uses it.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.comm.init_distributed(dist_backend="gloo")
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    return DynamicLossScaler
