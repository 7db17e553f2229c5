"""DeepSpeed ZeRO stages 1, 2 and 3 behind the same interface as FSDP2.

DeepSpeed keeps the fp32 master weights and optimizer state partitioned across ranks and runs
forward/backward in the compute dtype. It does not decide anything about loss scaling or
clipping: harness.numerics.grad_scale reads the gradient partitions DeepSpeed holds after backward
(`averaged_gradients`), makes the one global decision, and drives DeepSpeed through its external
loss scale (`override_loss_scale`):

- backward runs with harness's current scale;
- a step runs with scale / clip_coef, so DeepSpeed's own unscale multiplies the fp32 gradient
  partitions by exactly harness's clip_coef / scale (DeepSpeed's gradient_clipping is 0);
- a skip leaves the non-finite values in place, so DeepSpeed's own overflow check (global, on the
  same data) skips too. Both outcomes are checked with `was_step_applied()` after every step.
- without offload, DeepSpeed's own overflow check and gradient norm (extra passes over every
  gradient, its norms through an fp64 copy: 8% of a 1B model's ZeRO-3 step on an H200) are
  answered from harness's decision instead (`layouts._ZeroLayout.answer_checks_from_harness`, counted by compat.ReplacedChecks): same
  outcome, and DeepSpeed's reported norm is harness's.

Gradients accumulate over micro-batches and reduce in fp32, as under FSDP2 (deepspeed_json.py sets
`data_types.grad_accum_dtype`); for bf16 ZeRO-1 DeepSpeed then runs its BF16_Optimizer, which has
no loss scale: harness multiplies its gradient partition by the clip coefficient instead. Where
each optimizer keeps what harness reads is in layouts.py; every private DeepSpeed name, in compat.py.
"""

from __future__ import annotations

import importlib
import subprocess
from typing import ContextManager, Optional

import torch
from torch import nn

from harness.config import Config, ParallelConfig, TrainConfig
from harness.config.deepspeed_json import runtime_config
from harness.errors import HarnessError, first_line
from harness.model import materialize_on, transformer_blocks
from harness.numerics.grad_scale import DeviceDecision, GradShard, StepDecision
from harness.numerics.optim import build_adamw, ensure_adam_state, param_groups
from harness.numerics.precision import PrecisionPolicy
from harness.observe.step_counter import host_read
from harness.parallel.base import STATE_KINDS, ParallelBackend, StatePiece
from harness.parallel.deepspeed.compat import ZERO_3, check_internals, check_zero_section, import_deepspeed
from harness.parallel.deepspeed.layouts import layout_of
from harness.parallel.mesh import ParallelMesh


class DeepSpeedBackend(ParallelBackend):
    name = "deepspeed"

    def __init__(self, cfg: Config, policy: PrecisionPolicy, device: torch.device, mesh: ParallelMesh) -> None:
        # ZeRO partitions over DeepSpeed's data-parallel group, which without an mpu is the world:
        # right while every dimension of the mesh is a data-parallel one.
        if mesh.data_size != mesh.shape.world:
            raise AssertionError(f"config validation let a {mesh.describe()} mesh through to DeepSpeed")
        self.cfg = cfg
        self.policy = policy
        self.device = device
        self.data_ranks = mesh.data_size
        self.stage = cfg.parallel.zero_stage
        self._grad_multiplier = 1.0
        self._host_loss_scale: Optional[float] = None
        """The loss scale DeepSpeed's backward multiplies by, known on the host from the last
        decision read (DeepSpeed takes it as a Python float)."""

    def full_shape(self, param: torch.Tensor) -> torch.Size:
        # A ZeRO-3 parameter built under zero.Init is an empty placeholder; ds_shape is its shape.
        return torch.Size(param.ds_shape) if hasattr(param, "ds_shape") else param.shape

    def construction_context(self, hidden_size: int) -> Optional[ContextManager]:
        if self.stage != 3:
            return None  # ZeRO-1/2 hold the whole compute-dtype model anyway: built in setup()
        # ZeRO-3: each parameter is partitioned as soon as its module is built, so no rank ever
        # holds the whole model, and initialize() has nothing left to move to the device.
        deepspeed = import_deepspeed(on_cpu=self.device.type == "cpu")
        # zero.Init partitions over deepspeed.comm's world, which must wrap ours first.
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), dist_init_required=False)
        # zero.Init swaps torch.Tensor.__new__; torch._dynamo, imported lazily while transformers
        # builds a model, refuses to load under that patch ("Signature mismatch"): load it now.
        importlib.import_module("torch._dynamo")
        ds_config = self._runtime_config(hidden_size)
        return deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=self.policy.compute_dtype)

    def setup(self, model: nn.Module, train_cfg: TrainConfig, hidden_size: int) -> None:
        deepspeed = import_deepspeed(on_cpu=self.device.type == "cpu")
        if self.stage != 3:
            # Straight into the compute dtype on the device: DeepSpeed would cast it there anyway.
            materialize_on(model, self.device, dtype=self.policy.compute_dtype)
        self._names = {id(p): name for name, p in model.named_parameters()}
        self._frozen = [(name, p) for name, p in model.named_parameters() if not p.requires_grad]
        if self._frozen and self.stage != 3:  # LoRA's base: validate_lora refuses ZeRO-1/2
            raise AssertionError(f"config validation let {len(self._frozen)} frozen parameters through to ZeRO-{self.stage}")
        ds_config = self._runtime_config(hidden_size)
        groups = param_groups(model, train_cfg.weight_decay, self.full_shape)
        offload = self.cfg.parallel.offload
        if offload == "none":
            optimizer = build_adamw(groups, train_cfg)
        else:
            optimizer, adam = host_adamw(groups, train_cfg, self.cfg.parallel.offload_adam)
            # DeepSpeed otherwise insists on its own CPU Adam for offloaded state.
            ds_config["zero_force_ds_cpu_optimizer"] = not isinstance(optimizer, torch.optim.AdamW)
        # DeepSpeed's CPU Adam counts its steps as a Python int (its C++ kernel takes one).
        self._steps_in_python = not isinstance(optimizer, torch.optim.AdamW)
        if self.stage == 3:
            _flag_leaf_blocks(model, self.cfg.parallel)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config, dist_init_required=False
        )
        self.model = self.engine
        self.module = model
        self.zero = self.engine.optimizer
        self.layout = layout_of(self.zero)
        if self._frozen:
            check_internals(self.zero, ZERO_3, [p for _, p in self._frozen])
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
        ds_config = runtime_config(self.cfg, self.data_ranks, hidden_size=hidden_size, pin_memory=self.device.type == "cuda")
        check_zero_section(ds_config, self.cfg.parallel.deepspeed_config or "parallel.* (DeepSpeed)")
        return ds_config

    def backward(self, loss: torch.Tensor, loss_scale: Optional[torch.Tensor], last_micro_batch: bool) -> None:
        if loss_scale is None:
            self._host_loss_scale = 1.0
        elif self._host_loss_scale is None:  # the first step of a run (or of a resume): read it once
            self._host_loss_scale = float(host_read(loss_scale))
        self.layout.set_loss_scale(self._host_loss_scale)
        self.engine.set_gradient_accumulation_boundary(last_micro_batch)
        # harness already divided the loss by the number of micro-batches.
        self.engine.backward(loss, scale_wrt_gas=False)

    def local_grad_shards(self) -> list[GradShard]:
        return self.layout.grad_shards(self._names)

    @property
    def torch_optimizer(self) -> torch.optim.Optimizer:
        return self.zero.optimizer

    def state_pieces(self, with_optimizer_state: bool = True) -> list[StatePiece]:
        kinds = STATE_KINDS if with_optimizer_state else STATE_KINDS[:1]
        if with_optimizer_state:
            ensure_adam_state(self.zero.optimizer, self.layout.fp32_flats(), steps_in_python=self._steps_in_python)
        return self.layout.pieces(kinds, self._names)

    def frozen_pieces(self) -> list[StatePiece]:
        return self.layout.frozen_pieces(self._frozen) if self._frozen else []

    def after_state_load(self) -> None:
        # The compute-dtype working copies are derived from the fp32 masters just loaded.
        self.layout.refresh_working_copy()
        if self._frozen:
            self.layout.after_frozen_write(self._frozen)
        self.weights_changed(after_step=False)

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
        self.layout.confirm_checks_answered(self.policy.name)
        self.weights_changed()

    def skip_step(self) -> None:
        if not self.layout.answers_checks:
            # DeepSpeed's step() decides by its own overflow check here (offload, BF16_Optimizer).
            # A skip harness decided on finite gradients (a loss spike) must look like an overflow
            # to it: one non-finite element on each rank that holds any (its check is global too).
            for shard in self.local_grad_shards():
                if shard.grad.numel():
                    shard.grad.view(-1)[0] = float("inf")
                    break
        self.layout.before_skip()
        self.engine.step()
        if self.engine.was_step_applied():
            raise RuntimeError("DeepSpeed applied a step whose gradients harness found non-finite")


# What building or loading DeepSpeed's C++ op raises: a missing compiler or header (OSError,
# subprocess.CalledProcessError), torch.utils.cpp_extension's "Error building extension"
# (RuntimeError), a library that will not load (ImportError).
OP_BUILD_FAILURES = (ImportError, OSError, RuntimeError, subprocess.CalledProcessError)


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
        block.register_forward_pre_hook(_input_requires_grad, with_kwargs=True)


def _input_requires_grad(block: nn.Module, args: tuple, kwargs: dict):
    """DeepSpeed reduces a leaf's gradients in a full backward hook on it, which fires once the
    gradient of the leaf's input exists, or, for an input that needs none (the first block of a
    LoRA run: its frozen embeddings), before the block's backward has run at all: the hook then
    gives each adapter a gradient of its empty partition's shape and the backward fails. An input
    that requires grad makes the hook fire after the block's backward, as in a full fine-tune
    (transformers' enable_input_require_grads does the same for the embeddings' output)."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor) and hidden.is_floating_point() and not hidden.requires_grad \
            and torch.is_grad_enabled():
        hidden.requires_grad_(True)
    return None


def host_adamw(groups: list[dict], train_cfg: TrainConfig, choice: str) -> tuple[torch.optim.Optimizer, str]:
    """The AdamW that steps offloaded fp32 state in host memory, and its name for the console.

    DeepSpeed's CPU Adam is a vectorised C++ kernel (several times faster than torch's CPU AdamW);
    it is compiled on first use (minutes, cached in ~/.cache/torch_extensions) and needs a C++
    toolchain. auto takes it where it builds and says what failed when it falls back; only a
    failure to build or load the op falls back (anything else is a bug and keeps its traceback)."""
    if choice != "torch":
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(
                groups, lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2), eps=train_cfg.eps, adamw_mode=True
            )
            return optimizer, "DeepSpeed's CPU Adam"
        except OP_BUILD_FAILURES as exc:  # no compiler, missing headers, a failed ninja build, ...
            failed = f"{type(exc).__name__}: {first_line(exc)}"
            if choice == "deepspeed":
                raise HarnessError(
                    f"parallel.offload_adam=deepspeed: DeepSpeed's CPU Adam did not build ({failed}); "
                    "install a C++ compiler or use parallel.offload_adam=torch"
                ) from None
            return build_adamw(groups, train_cfg), f"torch AdamW (DeepSpeed's CPU Adam did not build: {failed})"
    return build_adamw(groups, train_cfg), "torch AdamW"
