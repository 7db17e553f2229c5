"""What each sharding layout can do, as plain data (no torch): the one place that turns
parallel.backend and parallel.zero_stage into a layout. Config validation, the backends and
`harness estimate` ask it instead of comparing backend names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Layout:
    name: str
    """fsdp2, zero1, zero2 or zero3: how `harness estimate` names its columns."""
    backend: str
    """The parallel.backend that gives it."""
    zero_stage: Optional[int]
    """The parallel.zero_stage that gives it; None: the backend has no stages."""
    partitions_parameters: bool
    """Each rank holds a shard of every parameter between uses (FSDP2, ZeRO-3), so parameters can be
    offloaded and sharded hierarchically (HSDP, hpZ); ZeRO-1/2 keep them whole on every rank."""
    chooses_reduce_timing: bool
    """parallel.reduce_every_micro_batch applies (FSDP2); ZeRO decides itself."""
    min_ranks_per_shard_group: int
    """With parallel.replicate: fewest ranks a shard group may have (hpZ's secondary copy needs 2)."""
    gathers_fp8: bool
    """Weights can travel as FP8 in the all-gathers (fp8.all_gather): FSDP2's all-gather extension,
    which torchao's Float8 weights implement; ZeRO gathers the compute dtype."""


LAYOUTS = {
    "fsdp2": Layout("fsdp2", "fsdp2", None, partitions_parameters=True, chooses_reduce_timing=True,
                    min_ranks_per_shard_group=1, gathers_fp8=True),
    "zero1": Layout("zero1", "deepspeed", 1, partitions_parameters=False, chooses_reduce_timing=False,
                    min_ranks_per_shard_group=2, gathers_fp8=False),
    "zero2": Layout("zero2", "deepspeed", 2, partitions_parameters=False, chooses_reduce_timing=False,
                    min_ranks_per_shard_group=2, gathers_fp8=False),
    "zero3": Layout("zero3", "deepspeed", 3, partitions_parameters=True, chooses_reduce_timing=False,
                    min_ranks_per_shard_group=2, gathers_fp8=False),
}
_BY_CHOICE = {(layout.backend, layout.zero_stage): layout for layout in LAYOUTS.values()}


def layout_of(parallel) -> Layout:
    """The layout a config's `parallel` section asks for: its backend's, at its ZeRO stage where the
    backend has stages."""
    return _BY_CHOICE.get((parallel.backend, parallel.zero_stage)) or _BY_CHOICE[(parallel.backend, None)]
