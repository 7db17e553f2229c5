"""The `fp8:` section: FP8 matmuls for precision=fp8 (torchao's float8 training). Everything that
is not a converted linear layer's matmul stays bf16, and master weights and optimizer state stay
fp32, as with precision=bf16."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from harness.config.layouts import Layout
from harness.errors import ConfigError


@dataclass
class FP8Config:
    recipe: Literal["tensorwise", "rowwise"] = "tensorwise"
    """How FP8 scales are chosen: tensorwise (one dynamic scale per tensor: fastest) or rowwise (a scale per row: more accurate, slower)."""
    min_features: int = 0
    """A linear layer converts only if both its dimensions are at least this; smaller GEMMs lose to the casts. 0: torchao's own rule (both dimensions > 4096 on the layer's shapes, the size where its benchmarks show a gain); on CPU emulation every eligible size converts."""
    skip: list[str] = field(default_factory=list)
    """More layers to keep in bf16: regular expressions matched against module names (e.g. "mlp\\.down_proj")."""
    all_gather: bool = False
    """FSDP2, tensorwise: weights travel in the all-gathers as FP8 (half the bytes of bf16), their scales computed for every weight in one all-reduce after each optimizer step."""
    emulate: bool = False
    """Run the FP8 casts with the matmuls emulated in higher precision, for machines without FP8 tensor cores (CPU tests). Numerics follow FP8's rounding; no speed gain."""


def compute_precision(precision: str) -> str:
    """The dtype a precision computes in outside FP8 matmuls, and what every precision-keyed
    table (bytes per element, DeepSpeed's section, MFU peaks) reads: fp8 is bf16 there."""
    return "bf16" if precision == "fp8" else precision


def validate_fp8(fp8: FP8Config, precision: str, layout: Layout) -> None:
    """The section is read only with precision=fp8 (a bf16 run of an fp8 config just ignores it).
    layout: what the sharding layout can do (whether it can all-gather FP8 weights)."""
    if precision == "fp8" and fp8.all_gather and fp8.recipe != "tensorwise":
        raise ConfigError(f"fp8.all_gather needs fp8.recipe=tensorwise (a {fp8.recipe} weight has a scale per row and "
                          "is gathered in bf16); set fp8.all_gather=false or fp8.recipe=tensorwise")
    if precision == "fp8" and fp8.all_gather and not layout.gathers_fp8:
        raise ConfigError("fp8.all_gather is FSDP2's (ZeRO gathers bf16 weights); set fp8.all_gather=false or "
                          "parallel.backend=fsdp2")
    if fp8.min_features < 0:
        raise ConfigError(f"fp8.min_features must be >= 0 (0: torchao's size rule; got {fp8.min_features})")
    for pattern in fp8.skip:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"fp8.skip pattern {pattern!r} is not a regular expression ({exc})") from None
