"""Where DeepSpeed keeps what harness reads and writes. Its optimizer comes in three layouts:
ZeRO-1/2 (DeepSpeedZeroOptimizer), ZeRO-3 (DeepSpeedZeroOptimizer_Stage3) and, for ZeRO-1 with
bf16 compute and fp32 gradient accumulation, BF16_Optimizer (DeepSpeed's own bf16 ZeRO-1); each
with or without optimizer offload. Every private name used here is listed in compat.py.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from harness.numerics.grad_scale import GradShard, StepDecision
from harness.parallel.base import StatePiece, flat_range
from harness.parallel.deepspeed.compat import (
    BF16_ZERO_1,
    FRAGMENT_MAPPING,
    OFFLOADED,
    ZERO_1_2,
    ZERO_3,
    ReplacedChecks,
    check_internals,
)


class _ZeroLayout:
    """ZeRO-1/2: each rank owns a slice of the flattened parameter groups; DeepSpeed maps every
    parameter it (partly) owns to that slice in `_hp_mapping` (None where it owns nothing)."""

    answers_checks = False
    """True once DeepSpeed's own gradient checks return harness's decision."""

    def __init__(self, optimizer) -> None:
        self.zero = optimizer
        self._told: Optional[StepDecision] = None

    def tell(self, outcome: Optional[StepDecision]) -> None:
        """What harness's global check decided for the step about to be applied or skipped (None
        once it is done)."""
        self._told = outcome

    def answer_checks_from_harness(self) -> None:
        """DeepSpeed's step() checks the gradients again before it steps: an overflow scan (fp16;
        on ZeRO-1/2 bf16 too) and a global norm taken through an fp64 copy of every gradient, each
        with its own all-reduce and host read. harness has already made that decision globally
        (grad_scale.py), so DeepSpeed's two checks return it instead: a skip is an overflow, an
        applied step reports harness's unclipped norm (what `get_global_grad_norm()` returns)."""
        self.replaced = ReplacedChecks(self.zero)
        self.replaced.replace("has_overflow", self._told_overflow)
        self.replaced.replace("scaled_global_norm", lambda norm_type=2: self._told_scaled_norm())
        self.answers_checks = True

    def expected_checks(self, precision: str) -> tuple[str, ...]:
        """The replaced checks DeepSpeed's step() calls on an applied step: the norm always, the
        overflow scan when it checks overflow (fp16, and bf16 with check_grad_overflow)."""
        return ("scaled_global_norm",) + (("has_overflow",) if precision != "fp32" else ())

    def confirm_checks_answered(self, precision: str) -> None:
        """After the first applied step (compat.ReplacedChecks.assert_called)."""
        if self.answers_checks:
            self.replaced.assert_called(self.expected_checks(precision))

    def _told_overflow(self, partition_gradients: bool = True) -> bool:
        return self._outcome().skipped

    def _told_scaled_norm(self) -> torch.Tensor:
        """The norm as DeepSpeed's step() expects it: of the gradients as they are (times its loss
        scale), infinite on a skip. On the host: DeepSpeed reads it there anyway."""
        outcome = self._outcome()
        if outcome.skipped or outcome.grad_norm is None:
            return torch.tensor(math.inf, dtype=torch.float64)
        return torch.tensor(outcome.grad_norm * float(self.zero.loss_scale), dtype=torch.float64)

    def _outcome(self) -> StepDecision:
        if self._told is None:
            raise RuntimeError("DeepSpeed stepped outside harness's decision (layout.tell was not called for it)")
        return self._told

    def _groups(self) -> list[list[nn.Parameter]]:
        return self.zero.bit16_groups

    def fp32_flats(self) -> list[torch.Tensor]:
        """The fp32 master partitions AdamW steps on (one per parameter group / ZeRO-3 sub-group)."""
        return list(self.zero.single_partition_of_fp32_groups)

    def grad_shards(self, names: dict[int, str]) -> list[GradShard]:
        # This rank's slices of the flat gradient partition, one per parameter it (partly) owns,
        # kept in `averaged_gradients` (aligned with `params_in_partition`) until step().
        return _indexed_grads(self.zero.params_in_partition, self.zero.averaged_gradients, names)

    def pieces(self, kinds: tuple[str, ...], names: dict[int, str]) -> list[StatePiece]:
        pieces = []
        flats = self.fp32_flats()
        for group in self._groups():
            for p in group:
                fragment = getattr(p, "_hp_mapping", None)
                if fragment is None:
                    continue
                start, length = fragment.hp_fragment_address.start, fragment.hp_fragment_address.numel
                tensors = _narrowed(self.zero.optimizer, flats[fragment.param_group_index], start, length, kinds)
                runs = flat_range(fragment.lp_fragment_address.start, length)
                pieces.append(StatePiece(names[id(p)], tuple(p.shape), runs, tensors))
        return pieces

    def refresh_working_copy(self) -> None:
        self.zero.update_lp_params()

    def set_loss_scale(self, scale: float) -> None:
        self.zero.override_loss_scale(scale)

    def prepare_step(self, grad_multiplier: float) -> None:
        # DeepSpeed divides the fp32 gradient partitions by its loss scale inside step(): giving it
        # 1 / multiplier applies exactly harness's unscale-and-clip (its own clipping is off).
        self.zero.override_loss_scale(1.0 / grad_multiplier)

    def before_skip(self) -> None:
        """Nothing to do: DeepSpeed's check is harness's decision, or reads the same non-finite
        gradients harness read."""


class _Zero3Layout(_ZeroLayout):
    """ZeRO-3: each parameter is split into world-size partitions of partition_numel() elements
    (the last one padded); this rank's lies at grad_position inside its sub-group's fp32 flat."""

    def fp32_flats(self) -> list[torch.Tensor]:
        return list(self.zero.fp32_partitioned_groups_flat)

    def answer_checks_from_harness(self) -> None:
        # ZeRO-3 scans for overflow with fp16 only, and takes its norm per parameter group.
        self.replaced = ReplacedChecks(self.zero)
        self.replaced.replace("has_overflow", self._told_overflow)
        self.replaced.replace("_get_norm_groups", lambda: [self._told_scaled_norm()])
        self.answers_checks = True

    def expected_checks(self, precision: str) -> tuple[str, ...]:
        return ("_get_norm_groups",) + (("has_overflow",) if precision == "fp16" else ())

    def grad_shards(self, names: dict[int, str]) -> list[GradShard]:
        return _indexed_grads(self.zero.fp16_groups, self.zero.averaged_gradients, names)

    def pieces(self, kinds: tuple[str, ...], names: dict[int, str]) -> list[StatePiece]:
        z = self.zero
        pieces = []
        for group in z.fp16_groups:
            for p in group:
                group_idx, start, partition_numel = z.grad_position[z.get_param_id(p)]
                offset = z._get_param_partition_rank(p) * partition_numel
                length = max(0, min(partition_numel, p.ds_numel - offset))
                tensors = _narrowed(z.optimizer, z.fp32_partitioned_groups_flat[group_idx], start, length, kinds)
                pieces.append(StatePiece(names[id(p)], tuple(p.ds_shape), flat_range(offset, length), tensors))
        return pieces

    def frozen_pieces(self, frozen: list[tuple[str, nn.Parameter]]) -> list[StatePiece]:
        """Frozen parameters (LoRA's base) are partitioned like any other, in zero.Init's dtype,
        and have no fp32 master: this rank's partition is the ds_tensor itself, the last one padded."""
        pieces = []
        for name, p in frozen:
            partition = p.partition_numel()
            offset = torch.distributed.get_rank(group=p.ds_process_group) * partition
            length = max(0, min(partition, p.ds_numel - offset))
            pieces.append(StatePiece(name, tuple(p.ds_shape), flat_range(offset, length),
                                     {"param": p.ds_tensor.view(-1).narrow(0, 0, length)}))
        return pieces

    def after_frozen_write(self, frozen: list[tuple[str, nn.Parameter]]) -> None:
        """hpZ: a frozen parameter's secondary copy was taken from its value at zero.Init; drop it
        so the next gather reads the partition just written (and the copy is rebuilt from it)."""
        for _, p in frozen:
            p.ds_secondary_tensor = None

    def refresh_working_copy(self) -> None:
        for sub_group in range(len(self.zero.fp16_groups)):
            self.zero._reassign_or_swap_out_partitioned_parameters(sub_group)
        # hpZ: the secondary copies (sharded within the group) were taken from the values the
        # parameters had when zero.Init partitioned them; drop them so the next gather reads the
        # partitions just written and the secondary copies are rebuilt from them, as after a step.
        self.zero.invalidate_secondary_tensor()


class _Bf16Zero1Layout(_ZeroLayout):
    """BF16_Optimizer: every rank accumulates the whole gradient in fp32 (all-reduced at the
    accumulation boundary) and steps on its partition of the flat fp32 masters. It has no loss
    scale: bf16 needs none, and harness's clip multiplies the gradient partition directly."""

    def _groups(self) -> list[list[nn.Parameter]]:
        return self.zero.bf16_groups

    def fp32_flats(self) -> list[torch.Tensor]:
        return list(self.zero.fp32_groups_flat_partition)

    def grad_shards(self, names: dict[int, str]) -> list[GradShard]:
        return _fragment_slices(self._groups(), self.zero.fp32_groups_gradient_flat_partition, names)

    def set_loss_scale(self, scale: float) -> None:
        if scale != 1.0:
            raise RuntimeError(f"bf16 runs with a loss scale of 1, got {scale}")

    def prepare_step(self, grad_multiplier: float) -> None:
        if grad_multiplier != 1.0:
            for partition in self.zero.fp32_groups_gradient_flat_partition:
                partition.mul_(grad_multiplier)


class _OffloadedSkip:
    """With offload_optimizer DeepSpeed takes its overflow decision from per-parameter gradient
    norms it recorded while copying the gradients to host memory, before harness read them. A
    skip harness decided on (one rank's fault, a value only harness's check saw) reaches it there:
    an infinite recorded norm makes its global norm invalid on every rank, and it skips."""

    zero: object

    def before_skip(self) -> None:
        norms = self.zero.norm_for_param_grads
        for param_id, norm in norms.items():
            norms[param_id] = torch.full_like(norm, float("inf")) if isinstance(norm, torch.Tensor) else float("inf")


class _OffloadedZeroLayout(_OffloadedSkip, _ZeroLayout):
    """ZeRO-1/2 with offload_optimizer: the reduced fp32 gradient partition is the `.grad` of the
    host-side fp32 master partition."""

    def grad_shards(self, names: dict[int, str]) -> list[GradShard]:
        grads = [flat.grad for flat in self.zero.single_partition_of_fp32_groups]
        return _fragment_slices(self._groups(), grads, names)


class _OffloadedZero3Layout(_OffloadedSkip, _Zero3Layout):
    """ZeRO-3 with offload_optimizer: each parameter's gradient partition sits at its grad_position
    in the `.grad` of its sub-group's host-side fp32 flat."""

    def grad_shards(self, names: dict[int, str]) -> list[GradShard]:
        z = self.zero
        shards = []
        for group in z.fp16_groups:
            for p in group:
                group_idx, start, partition_numel = z.grad_position[z.get_param_id(p)]
                length = max(0, min(partition_numel, p.ds_numel - z._get_param_partition_rank(p) * partition_numel))
                grad = z.fp32_partitioned_groups_flat[group_idx].grad
                if length and grad is not None:
                    shards.append(GradShard(names[id(p)], grad.narrow(0, start, length)))
        return shards


def layout_of(optimizer) -> _ZeroLayout:
    """The layout of DeepSpeed's optimizer, its private names checked first (compat.py). Without
    offload DeepSpeed's own gradient checks are answered from harness's decision; with offload
    they stay DeepSpeed's (its norms come cheaply from the copies to host memory, and
    _OffloadedSkip steers them)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        check_internals(optimizer, ZERO_3, [p for group in optimizer.fp16_groups for p in group])
        offloaded = optimizer.offload_optimizer
        layout = _OffloadedZero3Layout(optimizer) if offloaded else _Zero3Layout(optimizer)
    elif isinstance(optimizer, BF16_Optimizer):
        check_internals(optimizer, BF16_ZERO_1 + FRAGMENT_MAPPING, [p for group in optimizer.bf16_groups for p in group])
        return _Bf16Zero1Layout(optimizer)
    else:
        check_internals(optimizer, ZERO_1_2 + FRAGMENT_MAPPING, [p for group in optimizer.bit16_groups for p in group])
        offloaded = optimizer.cpu_offload
        layout = _OffloadedZeroLayout(optimizer) if offloaded else _ZeroLayout(optimizer)
    if offloaded:
        check_internals(optimizer, OFFLOADED, [])
    if not isinstance(layout, _OffloadedSkip):
        layout.answer_checks_from_harness()
    return layout


def _fragment_slices(groups, flat_grads, names: dict[int, str]) -> list[GradShard]:
    """Each parameter's slice of its group's flat gradient partition (where this rank owns one)."""
    shards = []
    for group in groups:
        for p in group:
            fragment = getattr(p, "_hp_mapping", None)
            if fragment is None:
                continue
            address = fragment.hp_fragment_address
            shards.append(GradShard(names[id(p)], flat_grads[fragment.param_group_index].narrow(0, address.start, address.numel)))
    return shards


def _indexed_grads(groups, grads, names: dict[int, str]) -> list[GradShard]:
    shards = []
    for i, params in enumerate(groups):
        group_grads = grads.get(i) if isinstance(grads, dict) else (grads[i] if i < len(grads) else None)
        if group_grads is None:
            continue
        shards += [GradShard(names.get(id(p), f"group{i}.param{j}"), g) for j, (p, g) in enumerate(zip(params, group_grads))]
    return shards


def _narrowed(optimizer, flat: torch.Tensor, start: int, length: int, kinds: tuple[str, ...]) -> dict[str, torch.Tensor]:
    state = optimizer.state.get(flat, {})
    tensors = {"param": flat.narrow(0, start, length)}
    tensors.update({kind: state[kind].narrow(0, start, length) for kind in kinds[1:]})
    return tensors
