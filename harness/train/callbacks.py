"""What a user's code can hook into a run (harness.Trainer(loss=..., callbacks=...))."""

from __future__ import annotations

from typing import Any, Callable, Union

import torch
from torch import nn

LossFn = Callable[[nn.Module, Any], tuple[Union[torch.Tensor, float], Union[torch.Tensor, int]]]
"""loss(model, batch) -> (sum of the token losses, number of tokens): the harness divides, so every
micro-batch's loss is a mean over its tokens (the built-in next-token loss's normalisation)."""


class Callback:
    """Subclass and override what you need; every rank calls it, with the same values."""

    def on_step_end(self, row: dict) -> None:
        """After each step's metrics row is written (rows arrive in groups, every log.every steps:
        the host reads the device only then)."""

    def on_eval(self, step: int, eval_loss: float) -> None:
        """After an evaluation (eval.every)."""
