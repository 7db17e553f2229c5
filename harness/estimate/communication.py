"""The bytes every collective of one optimizer step moves, from the sharding plan alone.

Counted the way `debug.count_syncs` counts them (harness/observe/step_counter.py): per torch.distributed
op, the size of each call's full buffer (an all-gather's output, a reduce-scatter's input, an
all-reduce's tensor), split by the size of the process group it runs on. A steady-state step is
predicted (ZeRO-3 traces its module order during the first two steps and gathers more there).
tests/parallel/test_parallel_hierarchical.py checks every number against real 2- and 4-rank gloo runs.

The rules, per layout (W ranks; HSDP / hpZ: R replicas of S = W / R ranks):

FSDP2 / HSDP   units are the transformer blocks and the root (embeddings, norm, head). A unit's
               flat buffer pads every parameter's dim 0 to a multiple of S. Per micro-batch:
               forward gathers every unit; backward gathers the blocks again, except the last
               (reshard_after_forward=false: none). Reduce-scatter of each unit in fp32 once per
               optimizer step (or per micro-batch: parallel.reduce_every_micro_batch); HSDP then
               all-reduces each unit's fp32 shard across the R replicas. S = 1 skips both.
ZeRO-1/2       gradients all-reduced in fp32 (ZeRO-1 once per step, ZeRO-2 per micro-batch),
               the compute-dtype parameters all-gathered after the step, one call per parameter
               group (padded to 2 x W). DeepSpeed's own flags, only with offload (otherwise
               harness's decision answers its checks): 8 bytes per step, 1 more in fp16/bf16
               (its overflow check). bf16 ZeRO-1 (BF16_Optimizer) reduces its padded flat groups
               and has no flags.
ZeRO-3         each parameter padded to a multiple of W. Gathers follow DeepSpeed's coordinator,
               simulated on the module order of a meta forward (backward in reverse): a module
               (with parallel.zero3_unit=block: a whole transformer block) fetches its parameters
               unless still gathered; after it runs, a parameter is
               released unless persistent (numel <= stage3_param_persistence_threshold: gathered
               once per step, after the optimizer step) or used again within
               max(stage3_max_reuse_distance, stage3_prefetch_bucket_size) elements of upcoming
               fetches. hpZ: a parameter's first gather after the step runs over all W ranks,
               later ones from the secondary copy within its group of S. Gradients are
               reduce-scattered in fp32 per micro-batch. DeepSpeed's own flags, only with
               offload: 16 bytes per step, 1 more in fp16.
harness        2 all-reduces over all ranks per step: the decision (16 bytes: sum of squares and
               loss) and the step-end agreement (24 bytes).

Not counted: evaluation, checkpoint and first-step traffic; PCIe traffic of offload.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from harness.config import Config, compute_precision

_COMPUTE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
REDUCE_BYTES = 4
"""Gradients are reduced in fp32 on every backend (FSDP2's reduce_dtype, DeepSpeed's
communication_data_type)."""
HARNESS_ALL_REDUCE_BYTES = (40,)
"""The one decision all-reduce a step (sum of squares, loss sum, trained tokens, stop flag, checkpoint
writing): fp64 each."""
DEEPSPEED_DEFAULTS = {"stage3_param_persistence_threshold": 100_000, "stage3_max_reuse_distance": 1_000_000_000,
                      "stage3_prefetch_bucket_size": 50_000_000, "overlap_comm": 0}


@dataclass
class Collective:
    """One kind of call on one process-group size, summed over a step."""

    op: str
    group_size: int
    group: str = "world"
    """world | shard (consecutive ranks) | replicate (ranks strided across shard groups)."""
    count: int = 0
    bytes: int = 0
    phase: str = "backward"
    """forward | backward | step: where it runs, for the overlap model in step_time.py."""


@dataclass
class Plan:
    """Every collective of one optimizer step, as (op, group size, phase) -> calls and bytes."""

    world_size: int
    entries: dict[tuple[str, str, int, str], Collective] = field(default_factory=dict)

    def add(self, op: str, group_size: int, nbytes: int, phase: str, count: int = 1, group: str = "world") -> None:
        if count <= 0:
            return
        key = (op, group, group_size, phase)
        entry = self.entries.setdefault(key, Collective(op, group_size, group, phase=phase))
        entry.count += count
        entry.bytes += nbytes * count

    def by_op(self) -> dict[str, dict]:
        """The debug.count_syncs shape: {op: {"count", "bytes", "groups": {size: {"count", "bytes"}}}}."""
        out: dict[str, dict] = {}
        for entry in self.entries.values():
            op = out.setdefault(entry.op, {"count": 0, "bytes": 0, "groups": {}})
            op["count"] += entry.count
            op["bytes"] += entry.bytes
            group = op["groups"].setdefault(str(entry.group_size), {"count": 0, "bytes": 0})
            group["count"] += entry.count
            group["bytes"] += entry.bytes
        return {name: out[name] for name in sorted(out)}


def _padded(shape: tuple[int, ...], ranks: int) -> int:
    """FSDP2's padded numel: dim 0 rounded up to a multiple of the shard group."""
    if not shape:
        return ranks
    return -(-shape[0] // ranks) * ranks * math.prod(shape[1:])


def _units(model: nn.Module) -> list[list[nn.Parameter]]:
    """FSDP2's units in forward order: the root (what no block owns), then every block."""
    from harness.model import transformer_blocks

    blocks = transformer_blocks(model)
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    seen: set[int] = set()
    root = []
    for p in model.parameters():
        if id(p) not in in_blocks and id(p) not in seen:
            seen.add(id(p))
            root.append(p)
    return [root] + [list(block.parameters()) for block in blocks]


def _harness(plan: Plan) -> None:
    for nbytes in HARNESS_ALL_REDUCE_BYTES:
        plan.add("all_reduce", plan.world_size, nbytes, "step")


def fsdp2_plan(model: nn.Module, cfg: Config, world_size: int) -> Plan:
    p = cfg.parallel
    replicas, shard = p.replicate, world_size // p.replicate
    accum = cfg.train.grad_accum
    compute = _COMPUTE_BYTES[compute_precision(cfg.precision)]
    units = _units(model)
    fp8_weights = _fp8_gathered(model, cfg)
    padded = [sum(_padded(tuple(param.shape), shard) for param in unit) for unit in units]
    gathered = [sum(_padded(tuple(param.shape), shard) * (1 if id(param) in fp8_weights else compute) for param in unit)
                for unit in units]
    plan = Plan(world_size)
    if shard > 1:
        for nbytes in gathered:
            plan.add("all_gather_into_tensor", shard, nbytes, "forward", accum, "shard")
        if p.reshard_after_forward:
            for nbytes in gathered[1:-1]:  # the last block stays gathered for backward
                plan.add("all_gather_into_tensor", shard, nbytes, "backward", accum, "shard")
    if fp8_weights:  # every FP8 weight's amax, one fp32 each, in one all-reduce after the step
        plan.add("all_reduce", shard, 4 * len(fp8_weights), "step", 1, "shard")
    reductions = accum if p.reduce_every_micro_batch else 1
    # Only trainable parameters have gradients to reduce (LoRA: the adapters alone).
    padded = [sum(_padded(tuple(param.shape), shard) for param in unit if param.requires_grad) for unit in units]
    for numel in filter(None, padded):
        if shard > 1:
            plan.add("reduce_scatter_tensor", shard, numel * REDUCE_BYTES, "backward", reductions, "shard")
        if replicas > 1:
            plan.add("all_reduce", replicas, numel // shard * REDUCE_BYTES, "backward", reductions, "replicate")
    _harness(plan)
    return plan


def _fp8_gathered(model: nn.Module, cfg: Config) -> set[int]:
    """The weights FSDP2 gathers as FP8 (precision=fp8 with fp8.all_gather), by id."""
    if cfg.precision != "fp8" or not cfg.fp8.all_gather:
        return set()
    from harness.numerics.fp8 import plan_fp8

    modules = dict(model.named_modules())
    return {id(modules[name].weight) for name in plan_fp8(model, cfg.fp8).converted}


def _zero12_group_numels(model: nn.Module, world_size: int) -> list[int]:
    """DeepSpeed flattens each parameter group (decayed matrices, the rest), padded to 2 x W."""
    params = list(model.parameters())
    numels = []
    for decays in (True, False):
        n = sum(param.numel() for param in params if (param.dim() >= 2) == decays)
        if n:
            numels.append(-(-n // (2 * world_size)) * 2 * world_size)
    return numels


def zero12_plan(model: nn.Module, cfg: Config, world_size: int) -> Plan:
    stage, accum = cfg.parallel.zero_stage, cfg.train.grad_accum
    compute = _COMPUTE_BYTES[compute_precision(cfg.precision)]
    n_total = sum(param.numel() for param in model.parameters())
    plan = Plan(world_size)
    reductions = 1 if stage == 1 else accum
    groups = _zero12_group_numels(model, world_size)
    # bf16 ZeRO-1 runs DeepSpeed's BF16_Optimizer: it all-reduces its padded flat fp32 gradient
    # groups and has no overflow flags; the others reduce the gradients themselves, unpadded.
    bf16_optimizer = stage == 1 and compute_precision(cfg.precision) == "bf16"
    reduced = sum(groups) if bf16_optimizer else n_total
    # Without overlap_comm (DeepSpeed's default for stages 1 and 2) the reduction waits for backward.
    overlapped = bool(_deepspeed_setting(model, cfg, world_size, "overlap_comm"))
    plan.add("all_reduce", world_size, reduced * REDUCE_BYTES, "backward" if overlapped else "step", reductions)
    for numel in groups:
        plan.add("all_gather_into_tensor", world_size, numel * compute, "step")
    if not bf16_optimizer and _deepspeed_checks_gradients(cfg):
        plan.add("all_reduce", world_size, 8, "step")
        if cfg.precision != "fp32":
            plan.add("all_reduce", world_size, 1, "step")
    _harness(plan)
    return plan


def _deepspeed_checks_gradients(cfg: Config) -> bool:
    """Whether DeepSpeed's step() takes its own norm and overflow flag (an all-reduce each): only
    with offload; otherwise harness's decision answers them (parallel/deepspeed.py)."""
    return cfg.parallel.offload != "none"


def fetch_order(model: nn.Module, cfg: Config) -> list[list[nn.Parameter]]:
    """The parameters each fetch unit gathers, in the order DeepSpeed's coordinator sees them in
    one micro-batch: forward order, then backward (reverse order). Found by a forward on the meta
    device. A unit is a module with parameters of its own, or, with parallel.zero3_unit=block, a
    whole transformer block (a leaf module: its parameters fetched together, its children unhooked)."""
    from harness.model.loss import unpacked_sequences
    from harness.parallel.deepspeed.backend import zero3_leaf_blocks

    leaves = zero3_leaf_blocks(model, cfg.parallel)
    inside_leaf = {id(m) for leaf in leaves for m in leaf.modules()}
    owners = [m for m in model.modules()
              if id(m) not in inside_leaf and any(True for _ in m.parameters(recurse=False))]
    order: list[nn.Module] = []
    handles = [m.register_forward_pre_hook(lambda module, args: order.append(module)) for m in [*owners, *leaves]]
    try:
        batch = torch.zeros(1, min(cfg.train.seq_len, 8), dtype=torch.long, device="meta")
        with unpacked_sequences(), torch.no_grad():
            model(input_ids=batch)
    finally:
        for handle in handles:
            handle.remove()
    leaf_ids = {id(leaf) for leaf in leaves}
    fetches = [list(m.parameters(recurse=id(m) in leaf_ids)) for m in order]
    return fetches + fetches[::-1]


def _deepspeed_setting(model: nn.Module, cfg: Config, world_size: int, key: str) -> int:
    """A zero_optimization setting as DeepSpeed will run it ("auto" filled as harness fills it)."""
    from harness.config.deepspeed_json import runtime_config

    zero = runtime_config(cfg, world_size, hidden_size=model.config.hidden_size).get("zero_optimization", {})
    return int(zero.get(key, DEEPSPEED_DEFAULTS[key]))


def zero3_gathers(fetches: list[list[nn.Parameter]], persistent: set[int], keep_window: int,
                  micro_batches: int) -> list[tuple[nn.Parameter, int]]:
    """(parameter, how many times it is gathered this step, first gather included), by simulating
    DeepSpeed's fetch/release rule over `micro_batches` forward+backward passes."""
    times: dict[int, int] = defaultdict(int)
    params: dict[int, nn.Parameter] = {}
    for _ in range(micro_batches):
        available: set[int] = set()
        for i, module_params in enumerate(fetches):
            for param in module_params:
                params[id(param)] = param
                if id(param) not in persistent and id(param) not in available:
                    times[id(param)] += 1
                    available.add(id(param))
            # Release what is not used again within the window of upcoming fetches.
            kept: set[int] = set()
            traversed = 0
            for upcoming in fetches[i + 1:]:
                if traversed >= keep_window:
                    break
                for param in upcoming:
                    kept.add(id(param))
                    traversed += param.numel()
            available -= {id(param) for param in module_params if id(param) not in kept}
    return [(params[key], count) for key, count in times.items()]


def zero3_plan(model: nn.Module, cfg: Config, world_size: int) -> Plan:
    accum = cfg.train.grad_accum
    compute = _COMPUTE_BYTES[compute_precision(cfg.precision)]
    replicas = cfg.parallel.replicate
    group = world_size // replicas if replicas > 1 else world_size

    def padded(param: nn.Parameter) -> int:
        return -(-param.numel() // world_size) * world_size

    threshold = _deepspeed_setting(model, cfg, world_size, "stage3_param_persistence_threshold")
    keep_window = max(_deepspeed_setting(model, cfg, world_size, "stage3_max_reuse_distance"),
                      _deepspeed_setting(model, cfg, world_size, "stage3_prefetch_bucket_size"))
    unique = list({id(p): p for p in model.parameters()}.values())
    persistent = {id(p) for p in unique if p.numel() <= threshold}
    plan = Plan(world_size)
    for param in unique:
        if id(param) in persistent:  # gathered once, after the optimizer step updated it
            plan.add("all_gather_into_tensor", world_size, padded(param) * compute, "step")
    for param, times in zero3_gathers(fetch_order(model, cfg), persistent, keep_window, accum):
        nbytes = padded(param) * compute
        plan.add("all_gather_into_tensor", world_size, nbytes, "forward")  # the first one of the step
        plan.add("all_gather_into_tensor", group, nbytes, "backward", times - 1, "shard" if replicas > 1 else "world")
    grads = sum(padded(p) for p in unique if p.requires_grad)
    plan.add("reduce_scatter_tensor", world_size, grads * REDUCE_BYTES, "backward", accum)
    if _deepspeed_checks_gradients(cfg):
        plan.add("all_reduce", world_size, 8, "step", 2)
        if cfg.precision == "fp16":
            plan.add("all_reduce", world_size, 1, "step")  # its overflow flag
    _harness(plan)
    return plan


def collective_plan(model: nn.Module, cfg: Config, world_size: int, layout: Optional[str] = None) -> Plan:
    """The plan of `layout` (fsdp2 | zero1 | zero2 | zero3; default: the configured one)."""
    from harness.parallel import layout_name

    layout = layout or layout_name(cfg.parallel)
    if world_size == 1:
        plan = Plan(1)
        _harness(plan)
        return plan
    if layout == "fsdp2":
        return fsdp2_plan(model, cfg, world_size)
    if layout in ("zero1", "zero2"):
        import dataclasses

        stage = int(layout[-1])
        cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, zero_stage=stage))
        return zero12_plan(model, cfg, world_size)
    return zero3_plan(model, cfg, world_size)
