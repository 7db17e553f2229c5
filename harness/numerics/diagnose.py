"""Where non-finite values first appeared, said once per cause instead of once per step.

On a skipped step every rank contributes the names of its gradient shards that held inf/nan
(and, with `debug.nan_hooks=true`, the first module whose forward output was non-finite); rank 0
names the first offender in model order with its rank, the kind of value and the loss scale, e.g.

    step 7: non-finite gradients (nan) in 3 tensors; first transformer.h.0.attn.c_attn.weight on
    rank 1; first non-finite forward output: transformer.h.0.mlp on rank 1; loss scale 1024 -> 512

The same layer overflowing again with the same kind of value is counted, and reported again only
on its 2nd, 4th, 8th, ... occurrence. The per-step fields land in metrics.jsonl (nonfinite_param, nonfinite_rank, ...).
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from harness.numerics.grad_scale import StepDecision
from harness.observe.console import print0


class ForwardProbe:
    """Forward hooks on every module that remember the first one (in execution order) whose
    output held a non-finite value this step. Debug only: each check synchronizes."""

    def __init__(self, model: nn.Module) -> None:
        self.first: Optional[tuple[str, str]] = None
        for name, module in model.named_modules():
            module.register_forward_hook(self._hook(name or type(model).__name__))

    def _hook(self, name: str):
        def check(module, inputs, output):
            if self.first is not None:
                return
            for tensor in _tensors(output):
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    self.first = (name, "nan" if torch.isnan(tensor).any() else "inf")
                    return

        return check

    def reset(self) -> None:
        self.first = None


def _tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    if isinstance(output, dict) or hasattr(output, "values"):
        return [t for item in output.values() for t in _tensors(item)]
    return []


class OverflowDiagnosis:
    def __init__(self, rank: int, world_size: int, param_order: list[str], probe: Optional[ForwardProbe]) -> None:
        self.rank = rank
        self.world_size = world_size
        self.order = {name: i for i, name in enumerate(param_order)}
        self.probe = probe
        self.counts: Counter[str] = Counter()
        self.first_seen: dict[str, int] = {}

    def begin_step(self) -> None:
        if self.probe is not None:
            self.probe.reset()

    def on_skip(self, step: int, decision: StepDecision, scale_after: float) -> dict:
        """Collective on skipped steps (every rank skips together). Returns the metrics fields."""
        local = (list(decision.local_nonfinite), self.probe.first if self.probe else None)
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, local)
        offenders = sorted(
            ((self.order.get(name, len(self.order)), rank, name, kind)
             for rank, (found, _) in enumerate(gathered) for name, kind in found),
        )
        forward = next(((rank, first) for rank, (_, first) in enumerate(gathered) if first), None)
        fields: dict = {"nonfinite_tensors": len(offenders)}
        if offenders:
            _, rank, name, kind = offenders[0]
            fields.update(nonfinite_param=name, nonfinite_rank=rank, nonfinite_kind=kind)
        if forward:
            fields.update(nonfinite_module=forward[1][0], nonfinite_module_rank=forward[0])
        self._report(step, fields, offenders, decision.loss_scale, scale_after)
        return fields

    def _report(self, step: int, fields: dict, offenders: list, scale_before: float, scale_after: float) -> None:
        key = f"{fields.get('nonfinite_param', '(no gradient tensor)')} ({fields.get('nonfinite_kind', '?')})"
        self.counts[key] += 1
        self.first_seen.setdefault(key, step)
        count = self.counts[key]
        if count & (count - 1):  # not a power of two: already said, say it again later
            return
        kinds = "/".join(sorted({kind for *_, kind in offenders})) or "?"
        parts = [f"step {step}: non-finite gradients ({kinds}) in {len(offenders)} tensor(s)"]
        if offenders:
            parts.append(f"first {fields['nonfinite_param']} on rank {fields['nonfinite_rank']}")
        if "nonfinite_module" in fields:
            parts.append(
                f"first non-finite forward output: {fields['nonfinite_module']} on rank {fields['nonfinite_module_rank']}"
            )
        parts.append(f"loss scale {scale_before:g} -> {scale_after:g}")
        if count > 1:
            parts.append(f"{count} overflows with this first offender since step {self.first_seen[key]}")
        print0(self.rank, "; ".join(parts))

    def summary(self) -> Optional[str]:
        if not self.counts:
            return None
        name, count = self.counts.most_common(1)[0]
        return f"{sum(self.counts.values())} skipped; most often first in {name} ({count}x)"
