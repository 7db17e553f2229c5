"""What a batch is: an int64 tensor of token ids (rows x length), or a dict of such tensors
(`input_ids`, `labels`) from a user's dataset; and the few things done to either."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

import torch

from harness.errors import HarnessError

Batch = Union[torch.Tensor, dict]


def collate(items: list[Any]) -> Batch:
    """Items -> one int64 batch: a (rows, length) tensor, or a dict of them."""
    if isinstance(items[0], Mapping):
        if "input_ids" not in items[0]:
            raise HarnessError(f"dataset items are dicts without input_ids (keys: {', '.join(map(str, items[0]))}); "
                               "give each item input_ids (and labels)")
        keys = [key for key in ("input_ids", "labels") if key in items[0]]
        batch = {key: _stack([item[key] for item in items], key) for key in keys}
        batch.setdefault("labels", batch["input_ids"])
        return batch
    return _stack(items, "item")


def _stack(rows: list[Any], what: str) -> torch.Tensor:
    tensors = [torch.as_tensor(row, dtype=torch.int64).reshape(-1) for row in rows]
    lengths = sorted({t.numel() for t in tensors})
    if len(lengths) > 1:
        raise HarnessError(f"dataset {what}s in one batch have lengths {lengths[0]}..{lengths[-1]}; every item must have "
                           "the same length (pad or pack them to train.seq_len + 1 tokens)")
    return torch.stack(tensors)


def to_device(batch: Batch, device: torch.device, non_blocking: bool = False) -> Batch:
    if isinstance(batch, dict):
        return {key: value.to(device, non_blocking=non_blocking) for key, value in batch.items()}
    return batch.to(device, non_blocking=non_blocking)


def pinned(batch: Batch) -> Batch:
    if isinstance(batch, dict):
        return {key: value.pin_memory() for key, value in batch.items()}
    return batch.pin_memory()


def first_rows(batch: Batch, rows: int) -> Batch:
    if isinstance(batch, dict):
        return {key: value[:rows] for key, value in batch.items()}
    return batch[:rows]
