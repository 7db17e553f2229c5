"""What each sharding layout can do, as plain data (no torch): the one place that turns
parallel.backend and parallel.zero_stage into a layout. Config validation, the backends and
`harness estimate` ask it instead of comparing backend names."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    name: str
    """fsdp2, zero1, zero2 or zero3: how `harness estimate` names its columns."""
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
    "fsdp2": Layout("fsdp2", partitions_parameters=True, chooses_reduce_timing=True, min_ranks_per_shard_group=1,
                    gathers_fp8=True),
    "zero1": Layout("zero1", partitions_parameters=False, chooses_reduce_timing=False, min_ranks_per_shard_group=2,
                    gathers_fp8=False),
    "zero2": Layout("zero2", partitions_parameters=False, chooses_reduce_timing=False, min_ranks_per_shard_group=2,
                    gathers_fp8=False),
    "zero3": Layout("zero3", partitions_parameters=True, chooses_reduce_timing=False, min_ranks_per_shard_group=2,
                    gathers_fp8=False),
}


def layout_of(parallel) -> Layout:
    """The layout a config's `parallel` section asks for."""
    return LAYOUTS["fsdp2" if parallel.backend == "fsdp2" else f"zero{parallel.zero_stage}"]

