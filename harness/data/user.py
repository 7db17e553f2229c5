"""Datasets a user hands to `harness.Trainer(data=...)`, batched and ordered by the harness.

Items are token-id sequences (lists, arrays or tensors of one length: inputs and next-token
targets together, as the harness's own packed sequences are) or dicts with `input_ids` and
`labels` of one length (labels aligned with the inputs, -100 where no loss is taken, as
transformers has it). Batches are int64 tensors, or dicts of them.

- A map-style dataset (`len` and `[i]`) is ordered like the harness's corpora: a permutation per
  epoch seeded by train.seed (harness.data.order.GlobalOrder), so a run is the same whatever the
  world size and a resume continues exactly.
- An iterable dataset is read in its own order (the harness cannot shuffle what it cannot index):
  stream position k is its k-th item, epoch after epoch (it is iterated again from the start). A
  resume, or a loss-spike rollback, re-reads the stream up to where the run is, so the iterable
  must yield the same items each time it is iterated.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any, Iterator, Optional, Union

import numpy as np

from harness.data.batch import Batch, collate
from harness.data.order import GlobalOrder
from harness.errors import HarnessError


def _item_length(item: Any) -> int:
    """Tokens in one item (checked as collate checks a batch: one-line errors)."""
    batch = collate([item])
    return int((batch["input_ids"] if isinstance(batch, dict) else batch).shape[1])


class DatasetSequences:
    """A map-style dataset as the harness's sequences (len, batch(keys), order(seed), eval_keys)."""

    def __init__(self, dataset: Any) -> None:
        if len(dataset) == 0:
            raise HarnessError("the dataset given to harness.Trainer is empty")
        self.dataset = dataset
        length = _item_length(dataset[0])
        # A token sequence holds inputs and targets (seq_len + 1 tokens); a dict's labels are aligned.
        self.seq_len = length - 1 if not isinstance(dataset[0], Mapping) else length

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, keys: np.ndarray) -> Batch:
        return collate([self.dataset[int(key)] for key in keys])

    def order(self, seed: int) -> GlobalOrder:
        return GlobalOrder(len(self), seed)

    def eval_keys(self, count: int) -> np.ndarray:
        return np.arange(min(count, len(self)), dtype=np.int64)


class StreamOrder:
    """Stream position -> itself: an iterable dataset is taken in the order it yields."""

    def take(self, start: int, count: int) -> np.ndarray:
        return np.arange(start, start + count, dtype=np.int64)


class IterableSequences:
    """An iterable dataset as the harness's sequences: positions are read in order, each rank
    keeping the items of its own rows (every rank reads the whole stream)."""

    def __init__(self, dataset: Iterable) -> None:
        self.dataset = dataset
        self._lock = threading.Lock()  # the next step's batch is built in a background thread
        self._iterator: Optional[Iterator] = None
        self._position = 0
        """The stream position of the next item the iterator yields."""
        first = next(iter(dataset), None)
        if first is None:
            raise HarnessError("the iterable dataset given to harness.Trainer yields nothing")
        length = _item_length(first)
        self.seq_len = length - 1 if not isinstance(first, Mapping) else length

    def order(self, seed: int) -> StreamOrder:
        return StreamOrder()

    def batch(self, positions: np.ndarray) -> Batch:
        with self._lock:
            return collate([self._item(int(p)) for p in positions])

    def eval_keys(self, count: int) -> np.ndarray:
        return np.arange(count, dtype=np.int64)

    def _item(self, position: int) -> Any:
        if self._iterator is None or position < self._position:  # the start, or behind the stream
            self._iterator, self._position = iter(self.dataset), 0
        while True:
            try:
                item = next(self._iterator)
            except StopIteration:
                if self._position == 0:
                    raise HarnessError("the iterable dataset given to harness.Trainer yields nothing") from None
                self._iterator = iter(self.dataset)  # the next epoch: the stream continues from its start
                continue
            self._position += 1
            if self._position - 1 == position:
                return item


def user_sequences(dataset: Any) -> Union[DatasetSequences, IterableSequences]:
    """A dataset with len() and [i] is map-style; anything else iterable is read as a stream."""
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        return DatasetSequences(dataset)
    if isinstance(dataset, Iterable):
        return IterableSequences(dataset)
    raise HarnessError(f"harness.Trainer(data=...) takes a dataset (len and [i]) or an iterable, got {type(dataset).__name__}")
