"""Collective bandwidth as nccl-tests reports it, measured on the job's own process group:
all-reduce and all-gather, per message size, within each node and across nodes.

Bus bandwidth (busbw) is the number that does not depend on the group size, so it compares with
the hardware's link speed and with what harness estimate assumes: for an all-reduce of S bytes
over n ranks in t seconds, algbw = S / t and busbw = algbw x 2(n-1)/n; for an all-gather whose
output is S bytes, busbw = algbw x (n-1)/n.

Groups: "intra" runs every node's ranks as one group each, all nodes at once; "inter" runs the
ranks with the same local rank across nodes as one group each, all at once, so each GPU's share
of the node's network is measured the way HSDP's replica groups and FSDP's cross-node traffic use
it."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.distributed as dist

GPU_SIZES = (1 << 20, 16 << 20, 128 << 20, 512 << 20)
CPU_SIZES = (64 << 10, 1 << 20, 8 << 20)
"""gloo on CPU moves far less than NCCL: small enough messages to finish in seconds."""


@dataclass
class Measurement:
    op: str
    group: str
    ranks: int
    bytes: int
    seconds: float
    """Per call, the slowest rank's mean over the timed iterations."""
    algbw_gbyte_s: float
    busbw_gbyte_s: float
    busbw_gbit_s: float


def bus_factor(op: str, n: int) -> float:
    return 2 * (n - 1) / n if op == "all_reduce" else (n - 1) / n


def _time_op(op: str, size: int, group, device: torch.device, iterations: int, warmup: int) -> float:
    n = dist.get_world_size(group)
    if op == "all_reduce":
        buffer = torch.ones(size // 4, dtype=torch.float32, device=device)
        call = lambda: dist.all_reduce(buffer, group=group)  # noqa: E731
    else:
        shard = torch.ones(size // 4 // n, dtype=torch.float32, device=device)
        out = torch.empty(shard.numel() * n, dtype=torch.float32, device=device)
        # torch 2.13 renamed all_gather_into_tensor (what FSDP2 calls) to all_gather_single.
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        call = lambda: gather(out, shard, group=group)  # noqa: E731
    for _ in range(warmup):
        call()
    _sync(device)
    dist.barrier(group=group)
    start = time.perf_counter()
    for _ in range(iterations):
        call()
    _sync(device)
    return (time.perf_counter() - start) / iterations


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _slowest(seconds: float, device: torch.device) -> float:
    """Every rank's time, the largest: a collective is as fast as its slowest member."""
    value = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value.item())


def node_groups(world: int, per_node: int) -> tuple[list, Optional[list]]:
    """(this rank's intra-node group, its inter-node group or None on one node); every rank
    creates every group, as torch.distributed requires."""
    rank = dist.get_rank()
    intra = inter = None
    for node in range(world // per_node):
        ranks = list(range(node * per_node, (node + 1) * per_node))
        group = dist.new_group(ranks)
        if rank in ranks:
            intra = (group, len(ranks))
    if world // per_node > 1:
        for local in range(per_node):
            ranks = list(range(local, world, per_node))
            group = dist.new_group(ranks)
            if rank in ranks:
                inter = (group, len(ranks))
    return intra, inter


def measure(device: torch.device, per_node: int, sizes: tuple[int, ...], iterations: int = 5,
            warmup: int = 2) -> list[Measurement]:
    """Every (op, group, size) on every rank; the same list on every rank."""
    intra, inter = node_groups(dist.get_world_size(), per_node)
    results = []
    for label, member in (("intra", intra), ("inter", inter)):
        if member is None:
            continue
        group, n = member
        if n < 2:
            continue
        for op in ("all_reduce", "all_gather"):
            for size in sizes:
                size -= size % (4 * n)  # whole fp32 elements, an equal shard per rank
                seconds = _slowest(_time_op(op, size, group, device, iterations, warmup), device)
                algbw = size / seconds / 1e9
                busbw = algbw * bus_factor(op, n)
                results.append(Measurement(op, label, n, size, seconds, algbw, busbw, busbw * 8))
    return results


def fabric(measurements: list[Measurement]) -> dict[str, Optional[float]]:
    """The per-GPU bus bandwidth harness estimate takes (Gbit/s): each group's all-reduce at its
    largest message, where latency no longer counts."""
    found: dict[str, Optional[float]] = {"intra_gbit_s": None, "inter_gbit_s": None}
    for label in ("intra", "inter"):
        rows = [m for m in measurements if m.group == label and m.op == "all_reduce"]
        if rows:
            found[f"{label}_gbit_s"] = max(rows, key=lambda m: m.bytes).busbw_gbit_s
    return found


def as_rows(measurements: list[Measurement]) -> list[dict]:
    return [asdict(m) for m in measurements]
