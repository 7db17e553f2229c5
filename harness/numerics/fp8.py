"""precision=fp8: the transformer blocks' linear layers run their matmuls in FP8 through torchao's
float8 training (`convert_to_float8_training`); everything else computes in bf16, and master
weights, gradients after reduction and optimizer state stay fp32. The conversion keeps each
layer's parameter names, so checkpoints move between precision=bf16 and precision=fp8 runs.

Which layers convert is one rule, decided here and printed at start:
  - nn.Linear layers inside the transformer blocks, except the first and the last block (their
    activations carry the largest outliers) -- the embedding and the output head are never
    converted;
  - both dimensions multiples of 16 (what FP8 tensor cores take);
  - not matching an fp8.skip pattern;
  - large enough to gain: both dimensions >= fp8.min_features when it is set; otherwise the size
    rule torchao's own auto-filter applies for the recipe (from its H100 benchmarks, mirrored in
    SIZE_RULES and checked against torchao by the tests); with fp8.emulate every size converts,
    since emulation is for testing the path, not for speed.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from harness.config.fp8 import FP8Config
from harness.errors import HarnessError

AMAX_EPS = 1e-12
"""torchao's floor on an amax (torchao.float8.float8_utils.EPS) before it becomes a scale."""
FIRST_FP8_CAPABILITY = (8, 9)
"""Ada (sm_89) and Hopper (sm_90) were the first GPUs with FP8 tensor cores."""


def _tensorwise_gains(out_features: int, in_features: int) -> bool:
    return not (in_features <= 4096 and out_features <= 1024)


def _rowwise_gains(out_features: int, in_features: int) -> bool:
    if out_features <= 2048 or in_features <= 1024:
        return False
    return not (out_features <= 4096 and in_features <= 2048)


SIZE_RULES = {"tensorwise": _tensorwise_gains, "rowwise": _rowwise_gains}
"""torchao's auto-filter thresholds (torchao/float8/float8_linear_utils.py, 0.18), per recipe."""


@dataclass
class Fp8Plan:
    converted: list[str] = field(default_factory=list)
    kept: dict[str, list[str]] = field(default_factory=dict)
    """reason -> layer names left in bf16."""

    def keep(self, name: str, reason: str) -> None:
        self.kept.setdefault(reason, []).append(name)

    def describe(self, recipe: str) -> str:
        total = len(self.converted) + sum(len(v) for v in self.kept.values())
        kept = "; ".join(f"{len(names)} {reason}" for reason, names in self.kept.items())
        return (f"fp8 ({recipe}): {len(self.converted)} of {total} linear layers run their matmuls in FP8"
                + (f"; kept in bf16: {kept}" if kept else "") + "; embedding and output head stay bf16")


def plan_fp8(model: nn.Module, cfg: FP8Config) -> Fp8Plan:
    """Which linear layers convert, and why the others do not (the rule in this module's docstring)."""
    from harness.model.blocks import transformer_blocks

    block_of = {id(block): i for i, block in enumerate(transformer_blocks(model))}
    last = len(block_of) - 1
    gains = SIZE_RULES[cfg.recipe]
    skip = [re.compile(pattern) for pattern in cfg.skip]
    plan = Fp8Plan()
    for block_name, block in model.named_modules():
        index = block_of.get(id(block))
        if index is None:
            continue
        for name, module in block.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            fqn = f"{block_name}.{name}"
            out_features, in_features = module.out_features, module.in_features  # ZeRO-3 weights are partitioned
            if index in (0, last):
                plan.keep(fqn, "in the first or last block")
            elif out_features % 16 or in_features % 16:
                plan.keep(fqn, "with a dimension not a multiple of 16")
            elif any(pattern.search(fqn) for pattern in skip):
                plan.keep(fqn, "matching fp8.skip")
            elif cfg.min_features and min(out_features, in_features) < cfg.min_features:
                plan.keep(fqn, f"smaller than fp8.min_features={cfg.min_features}")
            elif not cfg.min_features and not cfg.emulate and not gains(out_features, in_features):
                plan.keep(fqn, f"too small to gain by torchao's {cfg.recipe} rule")
            else:
                plan.converted.append(fqn)
    return plan


def _torchao_float8():
    """torchao's float8 training API, imported quietly (on a machine without CUDA it reports each
    kernel library it could not load)."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as exc:
        raise HarnessError(f"precision=fp8 needs torchao's float8 training ({exc}); pip install 'torchao>=0.18'") from None
    return Float8LinearConfig, convert_to_float8_training


def convert_to_fp8(model: nn.Module, cfg: FP8Config) -> Fp8Plan:
    """Swap the planned layers for torchao's Float8Linear (same parameters, same names); refuses a
    plan that converts nothing (precision=fp8 would then be bf16 under another name)."""
    plan = plan_fp8(model, cfg)
    if not plan.converted:
        raise HarnessError(f"precision=fp8 converts no layer of {type(model).__name__} ({plan.describe(cfg.recipe)}); "
                           "its projections may not be nn.Linear (GPT-2's are Conv1D) or too small: use "
                           "precision=bf16, or lower fp8.min_features")
    config_class, convert = _torchao_float8()
    config = config_class.from_recipe_name(cfg.recipe)
    config = dataclasses.replace(config, emulate=cfg.emulate, enable_fsdp_float8_all_gather=cfg.all_gather)
    chosen = set(plan.converted)
    convert(model, config=config, module_filter_fn=lambda module, fqn: fqn in chosen)
    if cfg.all_gather:  # before FSDP2 wraps the weights
        from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

        _pad_uneven_shards(WeightWithDynamicFloat8CastTensor)
    return plan


def scale_precompute(model: nn.Module):
    """With fp8.all_gather: a function to run after each optimizer step (and a state load) that
    sets every FP8 weight's scale from its global amax, for all weights in one all-reduce
    (without it each weight's all-gather reduces its own amax).

    torchao's precompute_float8_dynamic_scale_for_fsdp does the same through DTensor, whose
    all-reduce happens inside a dispatched op where debug.count_syncs cannot see it; this one
    issues the all-reduce itself, so it is counted (and planned by harness estimate). It reaches
    three internals, checked here once, as torchao's own precompute does: a DTensor's
    _local_tensor (to_local() returns a view, where a scale set would not stick), FSDP2 weights
    wrapped as torchao's WeightWithDynamicFloat8CastTensor, and their _precomputed_scale."""
    _torchao_float8()
    from torchao.float8.float8_linear import Float8Linear
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    _pad_uneven_shards(WeightWithDynamicFloat8CastTensor)
    linears = [m for m in model.modules() if isinstance(m, Float8Linear)]
    locals_ = [getattr(m.weight, "_local_tensor", None) for m in linears]
    if not linears or not all(isinstance(t, WeightWithDynamicFloat8CastTensor) and hasattr(t, "_precomputed_scale")
                              for t in locals_):
        raise HarnessError("fp8.all_gather: the FSDP2 weights are not DTensors holding torchao's "
                           "WeightWithDynamicFloat8CastTensor with a _precomputed_scale (torch or torchao changed; harness "
                           "ran on torch 2.13 and torchao 0.18); set fp8.all_gather=false")
    mesh = linears[0].weight.device_mesh
    group = mesh.get_group() if mesh.ndim == 1 else mesh.get_group("shard")
    target = linears[0].config.cast_config_weight.target_dtype
    largest = torch.finfo(target).max

    stepped = False

    def precompute(after_step: bool = True) -> None:
        """Before the first step FSDP2 has not yet run its lazy init, which gives the ranks with a
        short (padded) shard new local tensors: a scale set now would stay on some ranks only, and
        the ranks would disagree on whether the all-gather reduces amaxes itself. So the first
        step's gather computes its scales on every rank; from then on they are precomputed."""
        nonlocal stepped
        stepped = stepped or after_step
        if not stepped:
            return
        import torch.distributed as dist

        weights = [m.weight._local_tensor for m in linears]
        amax = torch.stack([w.detach().abs().max() if w.numel() else w.new_zeros(()) for w in weights]).float()
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)  # one all-reduce for every weight
        # As torchao's amax_to_scale: in float64, so eager and compiled agree.
        scales = (largest / amax.clamp(min=AMAX_EPS).double()).float()
        for weight, scale in zip(weights, scales):
            weight._precomputed_scale = scale

    return precompute


def _pad_uneven_shards(weight_class) -> None:
    """A weight whose dim 0 does not divide by the shard group leaves the last ranks a shorter
    shard; FSDP2 all-gathers equal pieces, so each rank must hand it one padded to
    ceil(dim0 / ranks) rows. torchao 0.18's fsdp_pre_all_gather takes FSDP2's old one-argument form,
    which is not told the full size, and returns the short shard (pytorch/ao#3982; the fix,
    pytorch/ao#3983, is not released): the gather then fails on its sizes. This wraps it in the
    form that is told (mesh, outer_size, outer_stride, module, mp_policy) and pads the FP8 data
    with zeros; a torchao that already takes that form is left alone."""
    import inspect

    original = weight_class.fsdp_pre_all_gather
    if getattr(original, "_harness_pads", False) or len(inspect.signature(original).parameters) != 2:
        return

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        (data,), metadata = original(self, mesh)
        rows = -(-outer_size[0] // mesh.size())
        if data.shape[0] < rows:
            padding = torch.zeros((rows - data.shape[0], *data.shape[1:]), dtype=torch.uint8, device=data.device)
            data = torch.cat([data.view(torch.uint8), padding]).view(data.dtype)
        return (data,), metadata

    fsdp_pre_all_gather._harness_pads = True
    weight_class.fsdp_pre_all_gather = fsdp_pre_all_gather


def check_fp8_device(device: torch.device, cfg: FP8Config) -> None:
    """FP8 needs FP8 tensor cores, or fp8.emulate (CPU tests)."""
    if cfg.emulate:
        return
    if device.type != "cuda":
        raise HarnessError(f"precision=fp8 on {device.type} has no FP8 tensor cores; set fp8.emulate=true to run the FP8 "
                           "path emulated (tests), or use precision=bf16")
    capability = tuple(torch.cuda.get_device_capability(device))
    if not torch.version.hip and capability < FIRST_FP8_CAPABILITY:
        raise HarnessError(f"precision=fp8 needs FP8 tensor cores (compute capability 8.9 or newer: L40S, H100, H200, "
                           f"B200); {torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}: use "
                           "precision=bf16")
