"""The held-out loss: the same number for any world size and backend."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from harness.data.batch import first_rows, to_device
from harness.model.loss import per_sequence_sums
from harness.observe.step_counter import host_read
from harness.train.callbacks import LossFn


@torch.no_grad()
def held_out_loss(model: nn.Module, eval_data: list, device: torch.device, loss_fn: Optional[LossFn],
                  chunk_tokens: int) -> float:
    """Mean loss over every trained token of the fixed held-out sequences (`eval_data`: this
    rank's (batch, row weights), padded so every rank runs as many micro-batches: a forward pass is
    collective, and a weight-0 row counts nothing): next-token cross entropy, or the user's loss,
    summed over the real rows and divided by their tokens."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for batch, weights in eval_data:
        batch, real_rows = to_device(batch, device), int(weights.sum())
        if loss_fn is not None:
            total, tokens = loss_fn(model, first_rows(batch, real_rows or len(weights)))
            if real_rows:
                totals[0] += torch.as_tensor(total, dtype=torch.float64, device=device)
                totals[1] += torch.as_tensor(tokens, dtype=torch.float64, device=device)
            continue
        sums, counts = per_sequence_sums(model, batch, chunk_tokens)
        weights = weights.to(device).double()
        totals[0] += (sums.double() * weights).sum()
        totals[1] += (counts.double() * weights).sum()
    model.train()
    dist.all_reduce(totals)
    # Through host_read, where the watchdog sees a rank waiting for the others (on a GPU the wait
    # for the all-reduce happens here, not inside torch.distributed).
    total, weight = host_read(totals)
    return total / weight
