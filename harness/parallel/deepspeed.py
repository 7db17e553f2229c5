"""DeepSpeed ZeRO stages 1, 2 and 3 behind the same interface as FSDP2.

DeepSpeed keeps the fp32 master weights and optimizer state partitioned across ranks and runs
forward/backward in the compute dtype. It does not decide anything about loss scaling or
clipping: harness.grad_scale reads the gradient partitions DeepSpeed holds after backward
(`averaged_gradients`), makes the one global decision, and drives DeepSpeed through its external
loss scale (`override_loss_scale`):

- backward runs with harness's current scale;
- a step runs with scale / clip_coef, so DeepSpeed's own unscale multiplies the fp32 gradient
  partitions by exactly harness's clip_coef / scale (DeepSpeed's gradient_clipping is 0);
- a skip leaves the non-finite values in place, so DeepSpeed's own overflow check (global, on the
  same data) skips too. Both outcomes are checked with `was_step_applied()` after every step.
- without offload, DeepSpeed's own overflow check and gradient norm (extra passes over every
  gradient, its norms through an fp64 copy: 8% of a 1B model's ZeRO-3 step on an H200) are
  answered from harness's decision instead (`_ZeroLayout.answer_checks_from_harness`): same
  outcome, and DeepSpeed's reported norm is harness's.

Gradients accumulate over micro-batches and reduce in fp32, as under FSDP2 (deepspeed_json.py sets
`data_types.grad_accum_dtype`); for bf16 ZeRO-1 DeepSpeed then runs its BF16_Optimizer, which has
no loss scale: harness multiplies its gradient partition by the clip coefficient instead. Where
each optimizer keeps what harness reads is in the layouts at the end of this file.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import warnings
from typing import ContextManager, Optional

import torch
from torch import nn

from harness.config import Config, ParallelConfig, TrainConfig
from harness.errors import HarnessError, first_line
from harness.grad_scale import DeviceDecision, StepDecision
from harness.model import materialize_on, transformer_blocks
from harness.optim import build_adamw, ensure_adam_state, param_groups
from harness.parallel.base import STATE_KINDS, ParallelBackend, StatePiece
from harness.parallel.deepspeed_json import runtime_config
from harness.precision import PrecisionPolicy
from harness.step_counter import host_read


# harness reads and drives DeepSpeed's optimizer internals (gradient partitions, fp32 flats,
# _hp_mapping, override_loss_scale); these are the releases that was tested against.
TESTED_DEEPSPEED = (">=0.19.8", "<0.20")


def check_deepspeed_version(found: str) -> None:
    from packaging.specifiers import SpecifierSet

    wanted = ",".join(TESTED_DEEPSPEED)
    if found not in SpecifierSet(wanted):
        raise HarnessError(
            f"DeepSpeed {found} is installed, but harness's ZeRO backend was tested with deepspeed{wanted}; "
            f"pip install 'deepspeed{wanted}'"
        )


def _import_deepspeed(device: torch.device):
    from importlib.metadata import PackageNotFoundError, version

    try:
        check_deepspeed_version(version("deepspeed"))
    except PackageNotFoundError:
        wanted = ",".join(TESTED_DEEPSPEED)
        raise HarnessError(f"parallel.backend=deepspeed needs DeepSpeed; pip install 'deepspeed{wanted}'") from None
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # a CPU run on a GPU node stays on the CPU
    # DeepSpeed still calls collectives torch has renamed; the warning is about its code, not ours.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils import logger

    # harness reports skipped steps itself; DeepSpeed would repeat each one as a warning.
    logger.setLevel(logging.ERROR)
    # BF16_Optimizer prints a six-line memory report per parameter group at initialize, whatever
    # the log level (see_memory_usage(force=True)): harness reports memory in its own rows.
    import deepspeed.runtime.bf16_optimizer as bf16_optimizer

    bf16_optimizer.see_memory_usage = lambda *args, **kwargs: None
    if device.type == "cpu":
        # DeepSpeed's CPU accelerator reports fp16 unsupported although CPU fp16 math works,
        # and initialize() then refuses fp16 ("Type fp16 is not supported on your device").
        get_accelerator().is_fp16_supported = lambda: True
        # The shared-memory comm op is JIT-compiled on first init (~35 s on 2 cores) and only
        # speeds up intra-node CPU collectives; gloo needs nothing from it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


class DeepSpeedBackend(ParallelBackend):
    name = "deepspeed"

    def __init__(self, cfg: Config, policy: PrecisionPolicy, device: torch.device, world_size: int) -> None:
        self.cfg = cfg
        self.policy = policy
        self.device = device
        self.world_size = world_size
        self.stage = cfg.parallel.zero_stage
        self._grad_multiplier = 1.0
        self._host_loss_scale: Optional[float] = None
        """The loss scale DeepSpeed's backward multiplies by, known on the host from the last
        decision read (DeepSpeed takes it as a Python float)."""

    def construction_context(self, hidden_size: int) -> Optional[ContextManager]:
        if self.stage != 3:
            return None  # ZeRO-1/2 hold the whole compute-dtype model anyway: built in setup()
        # ZeRO-3: each parameter is partitioned as soon as its module is built, so no rank ever
        # holds the whole model, and initialize() has nothing left to move to the device.
        deepspeed = _import_deepspeed(self.device)
        # zero.Init partitions over deepspeed.comm's world, which must wrap ours first.
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), dist_init_required=False)
        # zero.Init swaps torch.Tensor.__new__; torch._dynamo, imported lazily while transformers
        # builds a model, refuses to load under that patch ("Signature mismatch"): load it now.
        importlib.import_module("torch._dynamo")
        ds_config = self._runtime_config(hidden_size)
        return deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=self.policy.compute_dtype)

    def setup(self, model: nn.Module, train_cfg: TrainConfig) -> None:
        deepspeed = _import_deepspeed(self.device)
        if self.stage != 3:
            # Straight into the compute dtype on the device: DeepSpeed would cast it there anyway.
            materialize_on(model, self.device, dtype=self.policy.compute_dtype)
        self._names = {id(p): name for name, p in model.named_parameters()}
        ds_config = self._runtime_config(model.config.hidden_size)
        groups = param_groups(model, train_cfg.weight_decay)
        offload = self.cfg.parallel.offload
        if offload == "none":
            optimizer = build_adamw(groups, train_cfg)
        else:
            optimizer, adam = host_adamw(groups, train_cfg, self.cfg.parallel.offload_adam)
            # DeepSpeed otherwise insists on its own CPU Adam for offloaded state.
            ds_config["zero_force_ds_cpu_optimizer"] = not isinstance(optimizer, torch.optim.AdamW)
        if self.stage == 3:
            _flag_leaf_blocks(model, self.cfg.parallel)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config, dist_init_required=False
        )
        self.model = self.engine
        self.module = model
        self.zero = self.engine.optimizer
        self.layout = layout_of(self.zero)
        self.name = f"deepspeed ZeRO-{self.stage}"
        if self.stage == 3 and train_cfg.compile and self.cfg.parallel.zero3_unit == "module":
            # Measured on an H200 (bench/RESULTS.md): 0.661 s/step compiled vs 0.372 eager for a 1B
            # model; ZeRO-3's per-module gather/release hooks split each block's graph.
            self.notes = ("train.compile with parallel.zero3_unit=module measured 1.2-1.8x slower than eager on a "
                          "GPU (DeepSpeed's per-module parameter hooks split the compiled graphs); "
                          "parallel.zero3_unit=block keeps each compiled block whole",)
        if offload != "none":
            what = "parameters and optimizer" if offload == "params" else "optimizer"
            self.name += f" ({what} offloaded to host memory, stepped by {adam})"

    def _runtime_config(self, hidden_size: int) -> dict:
        # Page-locked host buffers speed up GPU<->host copies; on a CPU run they only cost memory.
        return runtime_config(self.cfg, self.world_size, hidden_size=hidden_size, pin_memory=self.device.type == "cuda")

    def backward(self, loss: torch.Tensor, loss_scale: Optional[torch.Tensor], last_micro_batch: bool) -> None:
        if loss_scale is None:
            self._host_loss_scale = 1.0
        elif self._host_loss_scale is None:  # the first step of a run (or of a resume): read it once
            self._host_loss_scale = float(host_read(loss_scale))
        self.layout.set_loss_scale(self._host_loss_scale)
        self.engine.set_gradient_accumulation_boundary(last_micro_batch)
        # harness already divided the loss by the number of micro-batches.
        self.engine.backward(loss, scale_wrt_gas=False)

    def local_grad_shards(self) -> list[tuple[str, torch.Tensor]]:
        return self.layout.grad_shards(self._names)

    @property
    def torch_optimizer(self) -> torch.optim.Optimizer:
        return self.zero.optimizer

    def state_pieces(self, with_optimizer_state: bool = True) -> list[StatePiece]:
        kinds = STATE_KINDS if with_optimizer_state else STATE_KINDS[:1]
        if with_optimizer_state:
            ensure_adam_state(self.zero.optimizer, self.layout.fp32_flats())
        return self.layout.pieces(kinds, self._names)

    def after_state_load(self) -> None:
        # The compute-dtype working copies are derived from the fp32 masters just loaded.
        self.layout.refresh_working_copy()

    def apply_decision(self, decision: DeviceDecision, lr: float) -> StepDecision:
        """DeepSpeed takes its orders on the host: one read per step (the decision and the next
        step's loss scale, together)."""
        outcome = decision.read()
        self.layout.tell(outcome)
        try:
            self.apply_outcome(outcome, lr)
        finally:
            self.layout.tell(None)  # a step() outside apply_decision must not reuse this decision
        self._host_loss_scale = outcome.scale_after
        return outcome

    def scale_grads(self, multiplier: float) -> None:
        self._grad_multiplier = multiplier

    def optimizer_step(self, lr: float) -> None:
        for group in self.zero.param_groups:
            group["lr"] = lr
        self.layout.prepare_step(self._grad_multiplier)
        self._grad_multiplier = 1.0
        self.engine.step()
        if not self.engine.was_step_applied():
            raise RuntimeError("DeepSpeed skipped a step that harness's global check found finite")

    def skip_step(self) -> None:
        if not self.layout.answers_checks:
            # DeepSpeed's step() decides by its own overflow check here (offload, BF16_Optimizer).
            # A skip harness decided on finite gradients (a loss spike) must look like an overflow
            # to it: one non-finite element on each rank that holds any (its check is global too).
            for _, grad in self.local_grad_shards():
                if grad.numel():
                    grad.view(-1)[0] = float("inf")
                    break
        self.layout.before_skip()
        self.engine.step()
        if self.engine.was_step_applied():
            raise RuntimeError("DeepSpeed applied a step whose gradients harness found non-finite")


def zero3_leaf_blocks(model: nn.Module, cfg: ParallelConfig) -> list[nn.Module]:
    """The modules ZeRO-3 gathers and releases whole (DeepSpeed leaf modules): every transformer
    block with parallel.zero3_unit=block, none with module. harness.estimate simulates the same."""
    return transformer_blocks(model) if cfg.zero3_unit == "block" else []


def _flag_leaf_blocks(model: nn.Module, cfg: ParallelConfig) -> None:
    """DeepSpeed then hooks each leaf, not its linear layers and norms, and fetches (and releases)
    all of its parameters at once."""
    from deepspeed.utils import set_z3_leaf_module

    for block in zero3_leaf_blocks(model, cfg):
        set_z3_leaf_module(block, True)


def host_adamw(groups: list[dict], train_cfg: TrainConfig, choice: str) -> tuple[torch.optim.Optimizer, str]:
    """The AdamW that steps offloaded fp32 state in host memory, and its name for the console.

    DeepSpeed's CPU Adam is a vectorised C++ kernel (several times faster than torch's CPU AdamW);
    it is compiled on first use (minutes, cached in ~/.cache/torch_extensions) and needs a C++
    toolchain. auto takes it where it builds and says so when it falls back."""
    if choice != "torch":
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(
                groups, lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2), eps=train_cfg.eps, adamw_mode=True
            )
            return optimizer, "DeepSpeed's CPU Adam"
        except Exception as exc:  # the op did not build: no compiler, missing headers, ...
            if choice == "deepspeed":
                raise HarnessError(
                    f"parallel.offload_adam=deepspeed: DeepSpeed's CPU Adam did not build ({first_line(exc)}); "
                    "install a C++ compiler or use parallel.offload_adam=torch"
                ) from None
            return build_adamw(groups, train_cfg), f"torch AdamW (DeepSpeed's CPU Adam did not build: {first_line(exc)})"
    return build_adamw(groups, train_cfg), "torch AdamW"


# ---------------------------------------------------------------------------------------------
# Where DeepSpeed keeps what harness reads and writes. Its optimizer comes in three layouts:
# ZeRO-1/2 (DeepSpeedZeroOptimizer), ZeRO-3 (DeepSpeedZeroOptimizer_Stage3) and, for ZeRO-1 with
# bf16 compute and fp32 gradient accumulation, BF16_Optimizer (DeepSpeed's own bf16 ZeRO-1).


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
        self.zero.has_overflow = self._told_overflow
        self.zero.scaled_global_norm = lambda norm_type=2: self._told_scaled_norm()
        self.answers_checks = True

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

    def grad_shards(self, names: dict[int, str]) -> list[tuple[str, torch.Tensor]]:
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
                pieces.append(StatePiece(names[id(p)], tuple(p.shape), fragment.lp_fragment_address.start, tensors))
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
        self.zero.has_overflow = self._told_overflow
        self.zero._get_norm_groups = lambda: [self._told_scaled_norm()]
        self.answers_checks = True

    def grad_shards(self, names: dict[int, str]) -> list[tuple[str, torch.Tensor]]:
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
                pieces.append(StatePiece(names[id(p)], tuple(p.ds_shape), offset, tensors))
        return pieces

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

    def grad_shards(self, names: dict[int, str]) -> list[tuple[str, torch.Tensor]]:
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

    def grad_shards(self, names: dict[int, str]) -> list[tuple[str, torch.Tensor]]:
        grads = [flat.grad for flat in self.zero.single_partition_of_fp32_groups]
        return _fragment_slices(self._groups(), grads, names)


class _OffloadedZero3Layout(_OffloadedSkip, _Zero3Layout):
    """ZeRO-3 with offload_optimizer: each parameter's gradient partition sits at its grad_position
    in the `.grad` of its sub-group's host-side fp32 flat."""

    def grad_shards(self, names: dict[int, str]) -> list[tuple[str, torch.Tensor]]:
        z = self.zero
        shards = []
        for group in z.fp16_groups:
            for p in group:
                group_idx, start, partition_numel = z.grad_position[z.get_param_id(p)]
                length = max(0, min(partition_numel, p.ds_numel - z._get_param_partition_rank(p) * partition_numel))
                grad = z.fp32_partitioned_groups_flat[group_idx].grad
                if length and grad is not None:
                    shards.append((names[id(p)], grad.narrow(0, start, length)))
        return shards


def layout_of(optimizer) -> _ZeroLayout:
    """The layout of DeepSpeed's optimizer. Without offload DeepSpeed's own gradient checks are
    answered from harness's decision; with offload they stay DeepSpeed's (its norms come cheaply
    from the copies to host memory, and _OffloadedSkip steers them)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        layout = _OffloadedZero3Layout(optimizer) if optimizer.offload_optimizer else _Zero3Layout(optimizer)
    elif isinstance(optimizer, BF16_Optimizer):
        return _Bf16Zero1Layout(optimizer)
    else:
        layout = _OffloadedZeroLayout(optimizer) if optimizer.cpu_offload else _ZeroLayout(optimizer)
    if not isinstance(layout, _OffloadedSkip):
        layout.answer_checks_from_harness()
    return layout


def _fragment_slices(groups, flat_grads, names: dict[int, str]) -> list[tuple[str, torch.Tensor]]:
    """Each parameter's slice of its group's flat gradient partition (where this rank owns one)."""
    shards = []
    for group in groups:
        for p in group:
            fragment = getattr(p, "_hp_mapping", None)
            if fragment is None:
                continue
            address = fragment.hp_fragment_address
            shards.append((names[id(p)], flat_grads[fragment.param_group_index].narrow(0, address.start, address.numel)))
    return shards


def _indexed_grads(groups, grads, names: dict[int, str]) -> list[tuple[str, torch.Tensor]]:
    shards = []
    for i, params in enumerate(groups):
        group_grads = grads.get(i) if isinstance(grads, dict) else (grads[i] if i < len(grads) else None)
        if group_grads is None:
            continue
        shards += [(names.get(id(p), f"group{i}.param{j}"), g) for j, (p, g) in enumerate(zip(params, group_grads))]
    return shards


def _narrowed(optimizer, flat: torch.Tensor, start: int, length: int, kinds: tuple[str, ...]) -> dict[str, torch.Tensor]:
    state = optimizer.state.get(flat, {})
    tensors = {"param": flat.narrow(0, start, length)}
    tensors.update({kind: state[kind].narrow(0, start, length) for kind in kinds[1:]})
    return tensors
