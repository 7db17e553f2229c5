"""The interface every sharding backend implements."""

from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

import torch
from torch import nn

from harness.config import TrainConfig
from harness.numerics.grad_scale import DeviceDecision, GradShard, StepDecision

STATE_KINDS = ("param", "exp_avg", "exp_avg_sq")
"""What a checkpoint holds per parameter: the fp32 master weight and AdamW's two moments."""


@dataclass(frozen=True)
class Run:
    """`count` stretches of `length` consecutive elements, `stride` apart, the first at `offset`,
    in the flattened (row-major) full tensor. One run with count 1 is a flat range (a ZeRO
    partition, an FSDP2 dim-0 shard); one strided run is a 2-D block (rows a:b, columns c:d)."""

    offset: int
    length: int
    count: int = 1
    stride: int = 0

    @property
    def numel(self) -> int:
        return self.length * self.count

    def spans(self) -> list[tuple[int, int]]:
        """(first element, element count) of each stretch, in order."""
        return [(self.offset + i * self.stride, self.length) for i in range(self.count)]

    def as_list(self) -> list[int]:
        return [self.offset, self.length, self.count, self.stride]


def flat_range(offset: int, length: int) -> tuple[Run, ...]:
    return (Run(offset, length),)


def box_runs(shape: tuple[int, ...], starts: tuple[int, ...], sizes: tuple[int, ...]) -> tuple[Run, ...]:
    """The runs of an N-D box [starts, starts + sizes) of a tensor of `shape`, in the row-major
    order of the box itself (the order of a contiguous local shard): dimensions after the last
    partial one are contiguous, the one before it becomes the stride, and any further outer
    dimensions give one run per index."""
    if 0 in sizes:
        return flat_range(0, 0)
    partial = [d for d in range(len(shape)) if sizes[d] != shape[d]]
    if not partial:  # the whole tensor (a 0-dim one too)
        return flat_range(0, math.prod(shape))
    last = partial[-1]
    inner = math.prod(shape[last + 1:])
    length = sizes[last] * inner
    if last == 0:
        return flat_range(starts[0] * inner, length)
    stride = shape[last] * inner
    outer_dims = range(last - 1)
    runs = []
    for index in itertools.product(*(range(starts[d], starts[d] + sizes[d]) for d in outer_dims)):
        base = sum(i * math.prod(shape[d + 1:]) for d, i in zip(outer_dims, index))
        first = base + starts[last - 1] * stride + starts[last] * inner
        runs.append(Run(first, length, sizes[last - 1], stride))
    return tuple(runs)


@dataclass
class StatePiece:
    """This rank's block of one parameter: its master weight and moments, as runs of the
    parameter's flattened element space.

    Every backend's sharding (FSDP2 shards, ZeRO-3 per-parameter partitions, ZeRO-1/2 slices of a
    flat buffer, a weight sharded on two dimensions) is a set of such pieces, which is what lets a
    checkpoint written by one backend and world size be read by any other."""

    name: str
    shape: tuple[int, ...]
    """The full (unsharded) shape."""
    runs: tuple[Run, ...]
    """Where this piece's elements sit in the flattened full tensor, in the order of `tensors`."""
    tensors: dict[str, torch.Tensor]
    """STATE_KINDS -> writable 1-D fp32 views of equal length into the live state."""
    counted: bool = True
    """Whether this is the first copy of its elements (harness.parallel.mesh.holds_first_copy):
    only first copies are written to a checkpoint and counted when checking coverage."""

    @property
    def numel(self) -> int:
        return self.tensors["param"].numel()

    def flat_views(self, kind: str = "param") -> list[tuple[int, torch.Tensor]]:
        """(offset in the flattened full tensor, the slice of the live view it starts) per stretch."""
        views, at, tensor = [], 0, self.tensors[kind]
        for run in self.runs:
            for offset, length in run.spans():
                views.append((offset, tensor.narrow(0, at, length)))
                at += length
        return views


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
    notes: tuple[str, ...] = ()
    """One-line remarks on this configuration that the user should read at start-up (a switch
    known to cost rather than save on this backend, say); printed once by rank 0."""

    def full_shape(self, param: torch.Tensor) -> torch.Size:
        """A parameter's full (unsharded) shape, for a parameter of the skeleton or of the model
        this backend wraps."""
        return param.shape

    def full_numel(self, param: torch.Tensor) -> int:
        return self.full_shape(param).numel()

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
    def local_grad_shards(self) -> list[GradShard]:
        """This rank's part of every gradient, writable in place; the counted parts are disjoint
        across ranks, so sums over them add up to the full gradient."""


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
