"""Compute dtypes. Master weights, gradients (after reduction) and optimizer state are always fp32;
`precision` only chooses what the forward/backward math runs in."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    return PrecisionPolicy(name=name, compute_dtype=_DTYPES[name])


def check_device_supports(policy: PrecisionPolicy, device: torch.device) -> None:
    if device.type == "cuda" and policy.compute_dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise HarnessError(f"precision=bf16 is not supported on {name} (needs Ampere or newer); use precision=fp16")
