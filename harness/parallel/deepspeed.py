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
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from typing import ContextManager, Optional

import torch
from torch import nn

from harness.config import Config, TrainConfig
from harness.model import materialize_on
from harness.optim import build_adamw, ensure_adam_state, param_groups
from harness.parallel.base import STATE_KINDS, ParallelBackend, StatePiece
from harness.parallel.deepspeed_json import runtime_config
from harness.precision import PrecisionPolicy


def _import_deepspeed(device: torch.device):
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # a CPU run on a GPU node stays on the CPU
    # DeepSpeed still calls collectives torch has renamed; the warning is about its code, not ours.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils import logger

    # harness reports skipped steps itself; DeepSpeed would repeat each one as a warning.
    logger.setLevel(logging.ERROR)
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
        self._step_scale = 1.0

    def construction_context(self, hidden_size: int) -> Optional[ContextManager]:
        if self.stage != 3:
            return None  # ZeRO-1/2 hold the whole compute-dtype model anyway: built in setup()
        # ZeRO-3: each parameter is partitioned as soon as its module is built, so no rank ever
        # holds the whole model, and initialize() has nothing left to move to the device.
        deepspeed = _import_deepspeed(self.device)
        ds_config = runtime_config(self.cfg, self.world_size, hidden_size=hidden_size)
        # zero.Init partitions over deepspeed.comm's world, which must wrap ours first.
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), dist_init_required=False)
        # zero.Init swaps torch.Tensor.__new__; torch._dynamo, imported lazily while transformers
        # builds a model, refuses to load under that patch ("Signature mismatch"): load it now.
        importlib.import_module("torch._dynamo")
        return deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=self.policy.compute_dtype)

    def setup(self, model: nn.Module, train_cfg: TrainConfig) -> None:
        deepspeed = _import_deepspeed(self.device)
        if self.stage != 3:
            # Straight into the compute dtype on the device: DeepSpeed would cast it there anyway.
            materialize_on(model, self.device, dtype=self.policy.compute_dtype)
        self._names = {id(p): name for name, p in model.named_parameters()}
        ds_config = runtime_config(self.cfg, self.world_size, hidden_size=model.config.hidden_size)
        optimizer = build_adamw(param_groups(model, train_cfg.weight_decay), train_cfg, self.device)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config, dist_init_required=False
        )
        self.model = self.engine
        self.module = model
        self.zero = self.engine.optimizer
        self.name = f"deepspeed ZeRO-{self.stage}"

    def backward(self, loss: torch.Tensor, loss_scale: float, last_micro_batch: bool) -> None:
        self.zero.override_loss_scale(loss_scale)
        self.engine.set_gradient_accumulation_boundary(last_micro_batch)
        # harness already divided the loss by the number of micro-batches.
        self.engine.backward(loss, scale_wrt_gas=False)

    def local_grad_shards(self) -> list[tuple[str, torch.Tensor]]:
        # ZeRO-1/2: this rank's slices of the flat gradient partition, one per parameter it
        # (partly) owns. ZeRO-3: each parameter's gradient partition. Disjoint across ranks.
        groups = self.zero.fp16_groups if self.stage == 3 else self.zero.params_in_partition
        grads = self.zero.averaged_gradients
        shards = []
        for i, params in enumerate(groups):
            group_grads = grads.get(i) if isinstance(grads, dict) else (grads[i] if i < len(grads) else None)
            if group_grads is None:
                continue
            shards += [(self._names.get(id(p), f"group{i}.param{j}"), g) for j, (p, g) in enumerate(zip(params, group_grads))]
        return shards

    @property
    def torch_optimizer(self) -> torch.optim.Optimizer:
        return self.zero.optimizer

    def state_pieces(self, with_optimizer_state: bool = True) -> list[StatePiece]:
        kinds = STATE_KINDS if with_optimizer_state else STATE_KINDS[:1]
        if with_optimizer_state:
            ensure_adam_state(self.zero.optimizer, self._fp32_flats())
        return self._zero3_pieces(kinds) if self.stage == 3 else self._zero12_pieces(kinds)

    def _fp32_flats(self) -> list[torch.Tensor]:
        """The fp32 master partitions AdamW steps on (one per parameter group / ZeRO-3 sub-group)."""
        if self.stage == 3:
            return list(self.zero.fp32_partitioned_groups_flat)
        return list(self.zero.single_partition_of_fp32_groups)

    def _zero3_pieces(self, kinds: tuple[str, ...]) -> list[StatePiece]:
        # Each parameter is split into world-size partitions of partition_numel() elements (the
        # last one padded); this rank's lies at grad_position inside its sub-group's fp32 flat.
        z = self.zero
        pieces = []
        for group in z.fp16_groups:
            for p in group:
                group_idx, start, partition_numel = z.grad_position[z.get_param_id(p)]
                offset = z._get_param_partition_rank(p) * partition_numel
                length = max(0, min(partition_numel, p.ds_numel - offset))
                flat = z.fp32_partitioned_groups_flat[group_idx]
                state = z.optimizer.state.get(flat, {})
                tensors = {"param": flat.narrow(0, start, length)}
                tensors.update({kind: state[kind].narrow(0, start, length) for kind in kinds[1:]})
                pieces.append(StatePiece(self._names[id(p)], tuple(p.ds_shape), offset, tensors))
        return pieces

    def _zero12_pieces(self, kinds: tuple[str, ...]) -> list[StatePiece]:
        # Each rank owns a slice of the flattened parameter groups; DeepSpeed maps every
        # parameter it (partly) owns to that slice in `_hp_mapping` (None where it owns nothing).
        z = self.zero
        pieces = []
        for group in z.bit16_groups:
            for p in group:
                fragment = getattr(p, "_hp_mapping", None)
                if fragment is None:
                    continue
                flat = z.single_partition_of_fp32_groups[fragment.param_group_index]
                state = z.optimizer.state.get(flat, {})
                start, length = fragment.hp_fragment_address.start, fragment.hp_fragment_address.numel
                tensors = {"param": flat.narrow(0, start, length)}
                tensors.update({kind: state[kind].narrow(0, start, length) for kind in kinds[1:]})
                offset = fragment.lp_fragment_address.start
                pieces.append(StatePiece(self._names[id(p)], tuple(p.shape), offset, tensors))
        return pieces

    def after_state_load(self) -> None:
        # The compute-dtype working copies are derived from the fp32 masters just loaded.
        if self.stage == 3:
            for sub_group in range(len(self.zero.fp16_groups)):
                self.zero._reassign_or_swap_out_partitioned_parameters(sub_group)
        else:
            self.zero.update_lp_params()

    def scale_grads(self, multiplier: float) -> None:
        # Applied inside DeepSpeed's step, on the fp32 partitions: it divides by the loss scale.
        self._step_scale = 1.0 / multiplier

    def optimizer_step(self, lr: float) -> None:
        for group in self.zero.param_groups:
            group["lr"] = lr
        self.zero.override_loss_scale(self._step_scale)
        self.engine.step()
        if not self.engine.was_step_applied():
            raise RuntimeError("DeepSpeed skipped a step that harness's global check found finite")

    def skip_step(self) -> None:
        self.engine.step()
        if self.engine.was_step_applied():
            raise RuntimeError("DeepSpeed applied a step whose gradients harness found non-finite")
