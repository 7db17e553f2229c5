"""Next-token losses, computed in fp32 whatever the compute dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def next_token_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over the batch, computed in fp32 whatever the compute dtype."""
    logits = model(input_ids=batch[:, :-1]).logits
    targets = batch[:, 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def per_sequence_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of each sequence (fp32), for weighted evaluation."""
    logits = model(input_ids=batch[:, :-1]).logits
    targets = batch[:, 1:]
    losses = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    return losses.view(targets.shape).mean(dim=1)
