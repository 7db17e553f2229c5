"""Compute dtypes. Master weights, gradients (after reduction) and optimizer state are always fp32;
`precision` only chooses what the forward/backward math runs in."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.config.fp8 import compute_precision
from harness.errors import HarnessError


@dataclass(frozen=True)
class PrecisionPolicy:
    name: str
    compute_dtype: torch.dtype
    master_dtype: torch.dtype = torch.float32
    reduce_dtype: torch.dtype = torch.float32

    @property
    def uses_loss_scaling(self) -> bool:
        """Only fp16 has the narrow exponent range that needs a loss scale; bf16 shares fp32's."""
        return self.compute_dtype == torch.float16

    @property
    def is_mixed(self) -> bool:
        return self.compute_dtype != self.master_dtype


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_policy(name: str) -> PrecisionPolicy:
    # fp8 computes in bf16 outside the converted matmuls (harness.numerics.fp8).
    return PrecisionPolicy(name=name, compute_dtype=_DTYPES[compute_precision(name)])


# The first compute capabilities with native arithmetic in each half type: fp16 came with
# Maxwell's sm_53 (Jetson TX1; desktop Maxwell sm_50/52 has none), bf16 with Ampere's sm_80.
_FIRST_CAPABILITY = {torch.float16: (5, 3), torch.bfloat16: (8, 0)}
_INSTEAD = {torch.float16: "precision=fp32", torch.bfloat16: "precision=fp16 (with its loss scale) or fp32"}


def check_device_supports(policy: PrecisionPolicy, device: torch.device) -> None:
    """Refuse a compute dtype the GPU can only emulate. torch.cuda.is_bf16_supported() says yes on
    a V100 or T4 (it counts emulation), where bf16 matmuls run many times slower than fp16: the
    capability is the honest test. CPUs run every dtype (fp16/bf16 math is emulated where the ISA
    lacks it, and the user chose a CPU run), and ROCm devices support both."""
    first = _FIRST_CAPABILITY.get(policy.compute_dtype)
    if first is None or device.type != "cuda" or torch.version.hip:
        return
    capability = tuple(torch.cuda.get_device_capability(device))
    if capability < first:
        raise HarnessError(
            f"precision={policy.name} needs a GPU of compute capability {first[0]}.{first[1]} or newer; "
            f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}: use {_INSTEAD[policy.compute_dtype]}"
        )
