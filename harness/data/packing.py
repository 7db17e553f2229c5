"""Instruction examples -> rows of train.seq_len tokens, as the trainer's sequences.

Packed (data.pack=true): whole examples share a row, placed best-fit in decreasing length (the
fewest rows for the lengths at hand; deterministic, so every rank builds the same rows). Each
example's position ids restart at 0, which is how the model's attention is kept within it
(harness.model.loss.sequence_layout), and its first token is never a target: no example learns
from the one before it. Padded (data.pack=false): one example per row, padding behind it (no
position ids: causal attention never looks ahead, so the padding is invisible to the example).

A batch is a dict of int64 tensors: input_ids, labels (aligned with the inputs, -100 where no loss
is taken: context, padding, example starts) and, packed, position_ids.
"""

from __future__ import annotations

import bisect
from typing import Any

import numpy as np
import torch

from harness.config import DataConfig
from harness.data.instruct import Examples, prepare_examples, with_instruction_template
from harness.data.order import GlobalOrder

IGNORE = -100


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Rows of example indices, each row's lengths summing to at most `capacity`."""
    rows: list[list[int]] = []
    open_rows: dict[int, list[int]] = {}  # remaining room -> rows with that much room
    rooms: list[int] = []  # the keys of open_rows, sorted
    for example in np.argsort(-lengths, kind="stable"):
        length = int(lengths[example])
        at = bisect.bisect_left(rooms, length)
        if at == len(rooms):
            row, room = len(rows), capacity
            rows.append([])
        else:
            room = rooms[at]
            row = open_rows[room].pop()
            if not open_rows[room]:
                del open_rows[room]
                rooms.pop(at)
        rows[row].append(int(example))
        left = room - length
        if left > 0:
            if left not in open_rows:
                open_rows[left] = []
                bisect.insort(rooms, left)
            open_rows[left].append(row)
    return rows


class ExampleRows:
    """Examples (a subset of the prepared ones) laid out in rows of seq_len tokens."""

    def __init__(self, examples: Examples, chosen: np.ndarray, seq_len: int, pack: bool, pad_id: int) -> None:
        self.examples = examples
        self.seq_len = seq_len
        self.pack = pack
        self.pad_id = pad_id
        self._starts = examples.starts
        lengths = examples.lengths
        if pack:
            rows = best_fit_decreasing(lengths[chosen], seq_len)
            self._members = chosen[np.fromiter((i for row in rows for i in row), dtype=np.int64)]
            sizes = np.fromiter((len(row) for row in rows), dtype=np.int64, count=len(rows))
        else:
            self._members = np.asarray(chosen, dtype=np.int64)
            sizes = np.ones(len(chosen), dtype=np.int64)
        self._bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        """Row i holds examples _members[_bounds[i]:_bounds[i + 1]] (flat arrays: a million examples
        cost 16 MB, not a list of lists per rank)."""
        self.filled = np.add.reduceat(lengths[self._members], self._bounds[:-1]) if len(sizes) else \
            np.zeros(0, dtype=np.int64)
        """Tokens of each row that belong to an example (the rest is padding)."""

    def __len__(self) -> int:
        return len(self._bounds) - 1

    def examples_of(self, row: int) -> np.ndarray:
        """The example indices row `row` holds, in order."""
        return self._members[self._bounds[row]:self._bounds[row + 1]]

    def order(self, seed: int) -> GlobalOrder:
        return GlobalOrder(len(self), seed)

    def eval_keys(self, count: int) -> np.ndarray:
        """Every row: the held-out examples were chosen before they were laid out."""
        return np.arange(len(self), dtype=np.int64)

    @property
    def examples_in_rows(self) -> int:
        return len(self._members)

    def describe(self) -> str:
        layout = "packed" if self.pack else "padded, one example per row"
        efficiency = self.packing_efficiency(np.arange(len(self))) if len(self) else 0.0
        return f"{len(self):,} rows of {self.seq_len} tokens ({layout}; {efficiency:.0%} example tokens)"

    def packing_efficiency(self, keys: np.ndarray) -> float:
        """Example tokens (trained and context) over row tokens, for these rows."""
        return float(self.filled[keys].sum()) / (len(keys) * self.seq_len)

    def batch(self, keys: np.ndarray) -> dict[str, torch.Tensor]:
        n, length = len(keys), self.seq_len
        ids = np.full((n, length), self.pad_id, dtype=np.int64)
        labels = np.full((n, length), IGNORE, dtype=np.int64)
        positions = np.zeros((n, length), dtype=np.int64)
        for r, key in enumerate(keys):
            column = 0
            for example in self.examples_of(int(key)):
                start, end = int(self._starts[example]), int(self.examples.ends[example])
                size = end - start
                tokens = np.asarray(self.examples.tokens[start:end], dtype=np.int64)
                ids[r, column:column + size] = tokens
                labels[r, column:column + size] = np.where(self.examples.trained[start:end] > 0, tokens, IGNORE)
                labels[r, column] = IGNORE
                positions[r, column:column + size] = np.arange(size)
                column += size
            positions[r, column:] = np.arange(length - column)  # the padding: a sequence of its own
        batch: dict[str, Any] = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}
        if self.pack:
            batch["position_ids"] = torch.from_numpy(positions)
        return batch


HELD_OUT_SEED = 0
"""Which examples are held out is a property of the data, not of train.seed: runs with different
seeds evaluate on the same examples."""


def instruction_rows(cfg: DataConfig, seq_len: int, eval_examples: int, log=print) -> tuple[ExampleRows, ExampleRows, Examples]:
    """The config's instruction data: training rows, the rows of the first `eval_examples`
    held-out examples (data.val_fraction of them are held out, chosen by a fixed seed), and the
    prepared examples."""
    from harness.data.corpus import load_tokenizer

    tokenizer = with_instruction_template(load_tokenizer(cfg.tokenizer), cfg)
    examples = prepare_examples(cfg, tokenizer, seq_len, log)
    count = len(examples)
    held_out = min(count - 1, max(1, int(count * cfg.val_fraction))) if cfg.val_fraction > 0 else 0
    shuffled = np.random.default_rng(HELD_OUT_SEED).permutation(count)
    val, train = np.sort(shuffled[:held_out]), np.sort(shuffled[held_out:])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return (ExampleRows(examples, train, seq_len, cfg.pack, pad),
            ExampleRows(examples, val[:eval_examples], seq_len, cfg.pack, pad), examples)
