"""One optimizer step's time, from its FLOPs and its collectives (communication.py).

    compute    training FLOPs (6N + attention per token, plus the forward recomputed under
               activation checkpointing) / (peak x the assumed MFU)
    comm       each collective over its group's fabric: within a node (NVLink) when every rank
               of the group shares one, else the inter-node network (each GPU's NIC is the ring's
               bottleneck); ring costs: all-gather / reduce-scatter move (n-1)/n of the buffer,
               all-reduce twice that; plus a launch latency per call and a latency per ring step
    exposed    what compute does not hide: forward gathers overlap the forward, backward gathers
               and reductions the backward (each phase's excess is exposed, and so are the first
               gather and the last reduction); collectives between steps (ZeRO-1/2's gathers
               after the optimizer step, its gradient all-reduce without overlap_comm, harness's
               agreements) are exposed whole
    optimizer  AdamW over this rank's fp32 shards, bound by memory bandwidth (28 bytes/element)

step = compute + exposed + optimizer. The limit is the largest of those, or memory when the
state does not fit (memory.py). Not modelled: host offload traffic over PCIe and the host
AdamW, pipeline/tensor parallelism, stragglers, kernel efficiency beyond the MFU you assume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from harness.config.fp8 import compute_precision
from harness.estimate.communication import Plan

GIB = 2**30


@dataclass(frozen=True)
class Gpu:
    name: str
    peak_tflops: dict
    """Dense tensor-core peak per compute dtype, from the vendor's datasheet (fp32: what torch runs
    without TF32; fp8: what torchao's float8 matmuls use)."""
    memory_gib: float
    """What a process can allocate (the "80GB" of an H100 is 79.6 GiB)."""
    hbm_gbytes_s: float
    intra_gbps: float
    """Per-GPU bus bandwidth within a node (nccl-tests busbw), in Gbit/s."""
    inter_gbps: float
    """Per-GPU bandwidth across nodes, in Gbit/s."""
    pcie_gbytes_s: float = 50.0
    """Host <-> GPU copies, per direction, achieved (PCIe 5 x16: ~50 GB/s of 64; PCIe 4: ~25)."""


GPUS = {
    # NVLink 4 through NVSwitch: 450 GB/s per direction, ~360 GB/s achieved by NCCL's rings.
    "h100": Gpu("H100 SXM 80GB", {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0, "fp32": 67.0}, 79.6, 3350, 2880, 400),
    "h200": Gpu("H200 SXM 141GB", {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0, "fp32": 67.0}, 139.8, 4800, 2880, 400),
    # NVLink 3: 300 GB/s per direction, ~230 GB/s achieved; 200 Gb/s HDR per GPU.
    "a100": Gpu("A100 SXM 80GB", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}, 79.2, 2039, 1840, 200, 25.0),
    "a100-40": Gpu("A100 SXM 40GB", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}, 39.4, 1555, 1840, 200, 25.0),
    # No NVLink: peer traffic crosses PCIe 4 (~20 GB/s busbw); often 100-200 Gb/s Ethernet per node.
    "l40s": Gpu("L40S 48GB", {"bf16": 362.0, "fp16": 362.0, "fp8": 733.0, "fp32": 91.6}, 44.4, 864, 160, 100, 25.0),
    # NVLink 5: 900 GB/s per direction, ~720 GB/s achieved; 400 Gb/s ConnectX-7 per GPU.
    "b200": Gpu("B200 180GB", {"bf16": 2250.0, "fp16": 2250.0, "fp8": 4500.0, "fp32": 80.0}, 178.0, 7700, 5760, 400),
    # Infinity Fabric, 7 links x 64 GB/s; RCCL rings reach ~300 GB/s. ROCm reports 191.5 GiB.
    "mi300x": Gpu("MI300X 192GB", {"bf16": 1307.0, "fp16": 1307.0, "fp8": 2615.0, "fp32": 163.4}, 191.5, 5300, 2400,
                  400),
}
CPU_ADAM_PARAMS_S_PER_NODE = 4e9
"""Parameters a node's CPUs update per second with DeepSpeed's CPU Adam (the ZeRO-Offload paper
measures ~0.2 s per billion parameters on a 2-socket host); torch's AdamW on the host is slower."""
LAUNCH_S = 10e-6
"""Per collective call: the kernel launch and setup."""
HOP_S = {"intra": 1e-6, "inter": 5e-6}
"""Per ring step: a ring over n ranks takes n - 1 steps (2 (n - 1) for an all-reduce), which is
what makes one flat ring over a thousand GPUs slow for small buffers."""
ADAMW_BYTES_PER_ELEMENT = 28
"""Reads param, grad, two moments (16 bytes) and writes param and two moments (12)."""


@dataclass(frozen=True)
class Cluster:
    world_size: int
    nodes: int
    gpu: Gpu
    intra_gbps: float
    inter_gbps: float
    mfu: float
    memory_gib: float
    fabric_source: str = "assumed"
    """Where intra_gbps and inter_gbps come from: assumed (the GPU's table entry), flags, or a harness doctor run."""

    @property
    def gpus_per_node(self) -> int:
        return self.world_size // self.nodes

    def spans_nodes(self, group: str, group_size: int) -> bool:
        """Ranks are placed node by node; shard groups are consecutive ranks, replica groups
        stride across them, the world spans every node."""
        if self.nodes == 1:
            return False
        if group == "shard":
            return group_size > self.gpus_per_node
        return True


@dataclass
class CollectiveTime:
    op: str
    group: str
    group_size: int
    fabric: str
    phase: str
    count: int
    bytes: int
    seconds: float


def _ring_seconds(op: str, nbytes: int, n: int, gbps: float, hop_s: float = 0.0) -> float:
    """Bandwidth and per-step latency of a ring collective of an `nbytes` buffer over n ranks."""
    if n <= 1:
        return 0.0
    factor = 2.0 if op == "all_reduce" else 1.0
    return factor * ((n - 1) * hop_s + nbytes * (n - 1) / n / (gbps * 1e9 / 8))


def collective_times(plan: Plan, cluster: Cluster) -> list[CollectiveTime]:
    out = []
    for entry in plan.entries.values():
        fabric = "inter" if cluster.spans_nodes(entry.group, entry.group_size) else "intra"
        gbps = cluster.inter_gbps if fabric == "inter" else cluster.intra_gbps
        per_call = entry.bytes / entry.count
        seconds = entry.count * (_ring_seconds(entry.op, per_call, entry.group_size, gbps, HOP_S[fabric]) + LAUNCH_S)
        out.append(CollectiveTime(entry.op, entry.group, entry.group_size, fabric, entry.phase, entry.count,
                                  entry.bytes, seconds))
    return sorted(out, key=lambda c: -c.seconds)


@dataclass
class StepTime:
    flops: float
    """Model FLOPs of one step on one rank (no recomputation)."""
    compute_s: float
    comm_s: float
    exposed_s: float
    optimizer_s: float
    collectives: list[CollectiveTime]
    tokens_per_rank: int
    limit: str
    offload_s: float = 0.0
    """With parallel.offload: gradients to the host, the host's AdamW, parameters back (not overlapped)."""

    @property
    def step_s(self) -> float:
        return self.compute_s + self.exposed_s + self.optimizer_s + self.offload_s


def offload_seconds(local_numel: int, cluster: Cluster, compute_bytes: int, params_too: bool, micro_batches: int) -> float:
    """One step's host round trip: this rank's gradient shard down and its updated parameters up
    over PCIe (compute dtype), the node's CPU Adam over every rank's shard, and with parameter
    offload the shards brought up for each forward and backward."""
    copies = 2 * local_numel * compute_bytes
    if params_too:
        copies += 2 * micro_batches * local_numel * compute_bytes
    return copies / (cluster.gpu.pcie_gbytes_s * 1e9) + local_numel * cluster.gpus_per_node / CPU_ADAM_PARAMS_S_PER_NODE


def _exposed(times: list[CollectiveTime], forward_s: float, backward_s: float) -> float:
    exposed = 0.0
    for phase, capacity in (("forward", forward_s), ("backward", backward_s)):
        in_phase = [c for c in times if c.phase == phase]
        total = sum(c.seconds for c in in_phase)
        if not in_phase:
            continue
        # The first gather of forward and the last reduction of backward have nothing to hide behind.
        edge = max(c.seconds / c.count for c in in_phase)
        exposed += min(total, max(0.0, total - capacity) + edge)
    exposed += sum(c.seconds for c in times if c.phase == "step")
    return exposed


def step_time(plan: Plan, cluster: Cluster, flops_per_token: float, tokens_per_rank: int, recompute: float,
              local_numel: int, precision: str, device_bytes: Optional[float]) -> StepTime:
    """`recompute`: extra forward passes under activation checkpointing (1 full, 0 none)."""
    flops = flops_per_token * tokens_per_rank
    rate = cluster.gpu.peak_tflops[precision] * 1e12 * cluster.mfu
    forward_s = flops / 3 / rate
    backward_s = flops * 2 / 3 / rate + recompute * forward_s
    compute_s = forward_s + backward_s
    times = collective_times(plan, cluster)
    exposed_s = _exposed(times, forward_s, backward_s)
    optimizer_s = local_numel * ADAMW_BYTES_PER_ELEMENT / (cluster.gpu.hbm_gbytes_s * 1e9)
    result = StepTime(flops, compute_s, sum(c.seconds for c in times), exposed_s, optimizer_s, times,
                      tokens_per_rank, "")
    result.limit = _limit(result, cluster, device_bytes)
    return result


def _limit(result: StepTime, cluster: Cluster, device_bytes: Optional[float]) -> str:
    memory = cluster.memory_gib * GIB
    if device_bytes is not None and device_bytes > memory:
        return (f"memory: {device_bytes / GIB:,.1f} GiB per GPU needed, {cluster.memory_gib:,.1f} GiB available "
                f"(shard over more ranks, offload, checkpoint activations or shrink the micro-batch)")
    share = result.exposed_s / result.step_s
    if result.exposed_s > result.compute_s * 0.25:
        worst = max(result.collectives, key=lambda c: c.seconds)
        return (f"exposed communication: {share:.0%} of the step; the largest is {worst.op} over the "
                f"{'inter-node network' if worst.fabric == 'inter' else 'node (NVLink)'} "
                f"({worst.group} group of {worst.group_size}, {worst.seconds * 1e3:,.1f} ms)")
    return f"compute ({share:.0%} of the step is exposed communication)"


def model_flops_utilization(result: StepTime, cluster: Cluster, precision: str) -> float:
    """Against the compute dtype's dense peak; fp8 against bf16's, as torchtitan reports it."""
    return result.flops / result.step_s / (cluster.gpu.peak_tflops[compute_precision(precision)] * 1e12)
