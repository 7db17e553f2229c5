"""FSDP2 (torch.distributed.fsdp.fully_shard): each transformer block, then the root.

Parameters stay fp32 DTensors sharded on dim 0; MixedPrecisionPolicy gathers them in the compute
dtype for forward/backward and reduce-scatters gradients in fp32, so what the optimizer sees is
fp32 master weights and fp32 gradient shards.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from harness.config import ParallelConfig, TrainConfig
from harness.model import materialize_on, transformer_blocks
from harness.model.lora import freeze_in
from harness.numerics.grad_scale import DeviceDecision, GradShard
from harness.numerics.optim import build_adamw, check_skips_on_device, ensure_adam_state, param_groups
from harness.numerics.precision import PrecisionPolicy
from harness.parallel.base import STATE_KINDS, ParallelBackend, StatePiece, box_runs
from harness.parallel.mesh import ParallelMesh, holds_first_copy


class FSDP2Backend(ParallelBackend):
    name = "fsdp2"

    def __init__(self, cfg: ParallelConfig, policy: PrecisionPolicy, device: torch.device, mesh: ParallelMesh) -> None:
        self.cfg = cfg
        self.policy = policy
        self.device = device
        self.mesh = mesh
        replicas, shards = mesh.shape.replicate, mesh.shape.shard
        if replicas > 1:
            # Consecutive ranks shard together, so with one node per group the all-gathers and
            # reduce-scatters stay inside a node and only the replicas' gradient all-reduce
            # crosses nodes.
            self.name = f"fsdp2 HSDP ({replicas} replicas x {shards} shards)"

    def setup(self, model: nn.Module, train_cfg: TrainConfig, hidden_size: int) -> None:
        mesh = self.mesh.sharding_mesh()
        mp_policy = MixedPrecisionPolicy(
            param_dtype=self.policy.compute_dtype if self.policy.is_mixed else None,
            reduce_dtype=self.policy.reduce_dtype,
        )
        # FSDP2 has one offload switch: sharded fp32 parameters, their gradients and the optimizer
        # step all live in host memory, and each unit's parameters are copied to the device for
        # its forward/backward. parallel.offload=optimizer therefore offloads the same as params.
        # Frozen parameters (LoRA's base) have no fp32 master: they are stored, sharded, in the
        # compute dtype, and gathered as they are.
        freeze_in(model, self.policy.compute_dtype)
        offloaded = self.cfg.offload != "none"
        offload_policy = CPUOffloadPolicy(pin_memory=self.device.type == "cuda") if offloaded else OffloadPolicy()
        shard = dict(mesh=mesh, mp_policy=mp_policy, offload_policy=offload_policy)
        blocks = transformer_blocks(model)
        for i, block in enumerate(blocks):
            # The last block's parameters are needed again as soon as backward starts: keep them
            # gathered rather than free and re-gather them at once.
            last = i == len(blocks) - 1
            fully_shard(block, reshard_after_forward=self.cfg.reshard_after_forward and not last, **shard)
        # The root holds what is left (embeddings, final norm, a tied head); it is needed again
        # right at the start of backward, so keeping it gathered saves one all-gather.
        fully_shard(model, reshard_after_forward=False, **shard)
        self._set_prefetch(blocks)
        # The skeleton's parameters were on the meta device: only now, sharded, do they get
        # memory, this rank's shards alone. Register the shards on every module that shares
        # a parameter (a tied head), whatever to_empty left there.
        shard_device = torch.device("cpu") if offloaded else self.device
        materialize_on(model, shard_device, buffer_device=self.device)
        self.model = self.module = model
        # Which parameters this rank holds the first copy of is fixed by their placements (their
        # gradients share them): decided once, not on every step's read of the shards.
        self._first_copy = {name: holds_first_copy(p) for name, p in model.named_parameters()}
        self._reshard()
        self.optimizer = build_adamw(param_groups(model, train_cfg.weight_decay), train_cfg)
        check_skips_on_device(self.optimizer)
        if offloaded:
            self.name += " (parameters, gradients and optimizer offloaded to host memory, stepped by torch AdamW)"

    def _set_prefetch(self, blocks: list[nn.Module]) -> None:
        """Explicit prefetch: while block i computes, the all-gathers of the next
        `parallel.prefetch` blocks (in forward) or previous ones (in backward) are already issued,
        so communication overlaps compute even when the host is not running ahead of the GPU."""
        depth = self.cfg.prefetch
        if depth == 0:
            return  # FSDP2's implicit prefetching alone
        for i, block in enumerate(blocks):
            block.set_modules_to_forward_prefetch(blocks[i + 1:i + 1 + depth])
            block.set_modules_to_backward_prefetch(blocks[max(0, i - depth):i][::-1])

    def _reshard(self) -> None:
        """Register every FSDP unit's sharded parameters on its modules (all sharers of a tied one)."""
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def backward(self, loss: torch.Tensor, loss_scale: Optional[torch.Tensor], last_micro_batch: bool) -> None:
        # By default gradients are reduce-scattered once per optimizer step: before then FSDP2
        # accumulates each unit's unsharded gradient in fp32 (reduce_dtype), a full-size buffer
        # per unit traded for 1/grad_accum of the traffic. reduce_every_micro_batch reduces each
        # micro-batch into the fp32 shards instead.
        if not self.cfg.reduce_every_micro_batch:
            self.model.set_requires_gradient_sync(last_micro_batch)
        (loss * loss_scale.to(loss.dtype) if loss_scale is not None else loss).backward()

    def local_grad_shards(self) -> list[GradShard]:
        return [GradShard(name, p.grad.to_local(), self._first_copy[name])
                for name, p in self.model.named_parameters() if p.grad is not None]

    def apply_decision(self, decision: DeviceDecision, lr: float) -> None:
        """On the device, never waiting: the gradients are multiplied by the decision's multiplier
        and fused AdamW reads the skip flag as `found_inf` (torch.amp.GradScaler's mechanism),
        leaving weights, moments and its step count untouched on a skipped step."""
        grads = [shard.grad for shard in self.local_grad_shards()]
        shard_device = grads[0].device if grads else self.device
        # Offloaded shards live in host memory: one copy brings both values there.
        multiplier, found_inf = torch.stack([decision.grad_multiplier, decision.skip.double()]).to(shard_device).float()
        if grads:
            torch._foreach_mul_(grads, multiplier)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.found_inf = found_inf
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf
        self.optimizer.zero_grad(set_to_none=True)
        self.weights_changed()


    def scale_grads(self, multiplier: float) -> None:
        grads = [shard.grad for shard in self.local_grad_shards()]
        if multiplier != 1.0 and grads:
            torch._foreach_mul_(grads, multiplier)

    def optimizer_step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.weights_changed()

    def after_state_load(self) -> None:
        self.weights_changed(after_step=False)

    def skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def torch_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer

    def state_pieces(self, with_optimizer_state: bool = True) -> list[StatePiece]:
        self._reshard()  # the pieces must be views of the sharded DTensors, not a forward's unsharded ones
        if with_optimizer_state:
            ensure_adam_state(self.optimizer)
        pieces = []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            tensors = {"param": p.to_local().view(-1)}
            if with_optimizer_state:
                state = self.optimizer.state[p]
                tensors.update({kind: state[kind].to_local().view(-1) for kind in STATE_KINDS[1:]})
            pieces.append(_piece(name, p, tensors, self._first_copy[name]))
        return pieces

    def frozen_pieces(self) -> list[StatePiece]:
        self._reshard()
        return [_piece(name, p, {"param": p.to_local().view(-1)}, self._first_copy[name])
                for name, p in self.model.named_parameters() if not p.requires_grad]


def _piece(name: str, p: torch.Tensor, tensors: dict[str, torch.Tensor], first_copy: bool) -> StatePiece:
    """A DTensor parameter's local shard as a block of its full tensor (a dim-0 shard today: one run)."""
    local_shape, global_offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return StatePiece(name, tuple(p.shape), box_runs(tuple(p.shape), tuple(global_offset), tuple(local_shape)),
                      tensors, counted=first_copy)
