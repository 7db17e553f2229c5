"""The interface every sharding backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

import torch
from torch import nn

from harness.config import TrainConfig
from harness.numerics.grad_scale import DeviceDecision, StepDecision

STATE_KINDS = ("param", "exp_avg", "exp_avg_sq")
"""What a checkpoint holds per parameter: the fp32 master weight and AdamW's two moments."""


@dataclass
class StatePiece:
    """This rank's contiguous piece of one parameter, in the parameter's flattened element space.

    Every backend's sharding (FSDP2 dim-0 shards, ZeRO-3 per-parameter partitions, ZeRO-1/2
    slices of a flat buffer) is a set of such pieces, which is what lets a checkpoint written by
    one backend and world size be read by any other."""

    name: str
    shape: tuple[int, ...]
    """The full (unsharded) shape."""
    offset: int
    """Index of this piece's first element in the flattened full tensor."""
    tensors: dict[str, torch.Tensor]
    """STATE_KINDS -> writable 1-D fp32 views of equal length into the live state."""

    @property
    def numel(self) -> int:
        return self.tensors["param"].numel()


class ParallelBackend(ABC):
    """Wraps one model and its optimizer so that parameters, gradients and optimizer state are
    fp32 and sharded across ranks while the math runs in the precision policy's compute dtype.

    The backend never decides whether a step is applied or how gradients are clipped: it hands
    its local gradient shards to harness.numerics.grad_scale and obeys the decision.
    """

    name: str
    device: torch.device
    """Where this rank computes (and where its collectives' tensors live)."""
    model: nn.Module
    """Call this for forward passes (it may be a wrapper around the original module)."""
    module: nn.Module
    """The original model (same parameter and module names), for hooks and diagnostics."""
    primary_copy: bool = True
    """False on a rank whose state pieces and gradient shards are copies of another rank's (an
    HSDP replica other than the first): they count once in the global gradient norm, in the
    initial-weights coverage check, and in a checkpoint (only the first replica writes them)."""

    notes: tuple[str, ...] = ()
    """One-line remarks on this configuration that the user should read at start-up (a switch
    known to cost rather than save on this backend, say); printed once by rank 0."""

    def construction_context(self, hidden_size: int) -> Optional[ContextManager]:
        """Where the model's parameters are created; None: on the meta device (no memory), to be
        allocated shard by shard in setup()."""
        return None

    @abstractmethod
    def setup(self, model: nn.Module, train_cfg: TrainConfig, hidden_size: int) -> None:
        """Shard the skeleton `model` (of width `hidden_size`, which sizes DeepSpeed's buckets) (built in construction_context(), no values written yet),
        allocate this rank's fp32 master pieces and build the optimizer. The initial values are
        written afterwards through state_pieces(with_optimizer_state=False)."""

    @abstractmethod
    def backward(self, loss: torch.Tensor, loss_scale: Optional[torch.Tensor], last_micro_batch: bool) -> None:
        """Accumulate d(loss * loss_scale)/d(params) into this rank's gradient shards; loss_scale
        is a device tensor (fp16), or None for a fixed scale of 1 (bf16/fp32).
        `last_micro_batch` marks the end of gradient accumulation for this optimizer step."""

    @abstractmethod
    def local_grad_shards(self) -> list[tuple[str, torch.Tensor]]:
        """(parameter name, this rank's piece of its gradient); pieces are disjoint across ranks,
        so sums over them add up to the full gradient. Writable in place."""


    def on_weights_changed(self, hook: Callable[[bool], None]) -> None:
        """Run `hook(after_step)` whenever this rank's weights may have changed: after every
        optimizer step (applied or skipped on the device; after_step=True) and after a state load
        (False). FP8 all-gather recomputes its weight scales there (harness.numerics.fp8)."""
        self._weight_hooks = (*getattr(self, "_weight_hooks", ()), hook)

    def weights_changed(self, after_step: bool = True) -> None:
        for hook in getattr(self, "_weight_hooks", ()):
            hook(after_step)

    def apply_decision(self, decision: DeviceDecision, lr: float) -> Optional[StepDecision]:
        """Unscale + clip and step, or skip, as the shared scaler decided. This default reads the
        decision on the host (one sync per step; returns what it read), for optimizers that take
        their orders there; a backend whose optimizer can obey a device tensor overrides it and
        never waits (returns None)."""
        outcome = decision.read()
        self.apply_outcome(outcome, lr)
        return outcome

    def apply_outcome(self, outcome: StepDecision, lr: float) -> None:
        """Step or skip as the decision read on the host says."""
        if outcome.skipped:
            self.skip_step()
        else:
            self.scale_grads(outcome.grad_multiplier)
            self.optimizer_step(lr)

    @abstractmethod
    def scale_grads(self, multiplier: float) -> None:
        """Multiply the gradients by `multiplier` (unscale and clip) before optimizer_step."""

    @abstractmethod
    def optimizer_step(self, lr: float) -> None:
        """Apply the scaled gradients with learning rate `lr`, then clear them."""

    @abstractmethod
    def skip_step(self) -> None:
        """Discard this step's (non-finite) gradients without touching weights or optimizer state."""

    @property
    @abstractmethod
    def torch_optimizer(self) -> torch.optim.Optimizer:
        """The torch AdamW holding this rank's fp32 master partitions and moments."""

    @abstractmethod
    def state_pieces(self, with_optimizer_state: bool = True) -> list[StatePiece]:
        """This rank's pieces of every trainable parameter's master weight and moments (moments are created,
        zero, if no step has run yet). Writing into the views changes the live state.
        With with_optimizer_state=False the pieces hold only "param" and no optimizer state is
        created (to write the initial weights before step 1)."""

    def frozen_pieces(self) -> list[StatePiece]:
        """This rank's pieces of every frozen parameter (LoRA's base), "param" only: views into
        the compute-dtype storage itself, which has no fp32 master. Written once with the initial
        weights; never part of a checkpoint."""
        return []

    def after_state_load(self) -> None:  # noqa: B027 (optional hook: most backends keep no derived copy)
        """Called after state_pieces() views were overwritten (e.g. refresh low-precision copies)."""
