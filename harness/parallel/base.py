"""The interface every sharding backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from harness.config import TrainConfig


class ParallelBackend(ABC):
    """Wraps one model and its optimizer so that parameters, gradients and optimizer state are
    fp32 and sharded across ranks while the math runs in the precision policy's compute dtype.

    The backend never decides whether a step is applied or how gradients are clipped: it hands
    its local gradient shards to harness.grad_scale and obeys the decision.
    """

    name: str
    model: nn.Module
    """Call this for forward passes (it may be a wrapper around the original module)."""

    @abstractmethod
    def setup(self, model: nn.Module, train_cfg: TrainConfig) -> None:
        """Shard `model` (fp32, on the CPU, identical on every rank) and build the optimizer."""

    @abstractmethod
    def backward(self, loss: torch.Tensor, loss_scale: float, last_micro_batch: bool) -> None:
        """Accumulate d(loss * loss_scale)/d(params) into this rank's gradient shards.
        `last_micro_batch` marks the end of gradient accumulation for this optimizer step."""

    @abstractmethod
    def local_grad_shards(self) -> list[tuple[str, torch.Tensor]]:
        """(parameter name, this rank's piece of its gradient); pieces are disjoint across ranks,
        so sums over them add up to the full gradient. Writable in place."""

    @abstractmethod
    def local_param_shards(self) -> list[tuple[str, torch.Tensor]]:
        """(parameter name, this rank's piece of its fp32 master weight)."""

    @abstractmethod
    def scale_grads(self, multiplier: float) -> None:
        """Multiply the gradients by `multiplier` (unscale and clip) before optimizer_step."""

    @abstractmethod
    def optimizer_step(self, lr: float) -> None:
        """Apply the scaled gradients with learning rate `lr`, then clear them."""

    @abstractmethod
    def skip_step(self) -> None:
        """Discard this step's (non-finite) gradients without touching weights or optimizer state."""

    @abstractmethod
    def optimizer_state_shards(self) -> list[torch.Tensor]:
        """This rank's optimizer state tensors (e.g. Adam moments), for memory accounting and tests."""
