"""Packed fixed-length sequences and the globally defined batch order.

The order is a property of the run, not of the world size: the global batch of step k is the
positions [(k-1)*G, k*G) of a stream that walks seeded permutations of all training sequences,
epoch after epoch (G = micro_batch_size x grad_accum x world size). Rank r takes a contiguous
slice of that global batch and cuts it into its micro-batches. So 1 rank with grad_accum 2 and
2 ranks with grad_accum 1 see the same sequences at every step, and a run can resume on another
world size from nothing but the step number.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from harness.data.batch import pinned
from harness.errors import HarnessError

# --------------------------------------------------------------------------------------------
# Sequences and the global order


class PackedSequences:
    """Non-overlapping windows of seq_len + 1 tokens (inputs and next-token targets)."""

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def batch(self, indices: np.ndarray) -> torch.Tensor:
        rows = [self.tokens[i * self.seq_len : i * self.seq_len + self.seq_len + 1] for i in indices]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def order(self, seed: int) -> "GlobalOrder":
        """Stream position -> the key `batch` takes."""
        return GlobalOrder(len(self), seed)

    def eval_keys(self, count: int) -> np.ndarray:
        """The first `count` held-out sequences, the same for every world size."""
        return np.arange(min(count, len(self)), dtype=np.int64)


class GlobalOrder:
    """Position in the run's sequence stream -> sequence index, epoch after epoch."""

    def __init__(self, num_sequences: int, seed: int, stream: Optional[int] = None) -> None:
        self.num_sequences = num_sequences
        self.seed = seed
        self.stream = stream
        """A mixture's source number: each source walks its own permutations."""
        self._epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            key = [self.seed, epoch] if self.stream is None else [self.seed, self.stream, epoch]
            self._perm = np.random.default_rng(key).permutation(self.num_sequences)
            self._epoch = epoch
        return self._perm

    def take(self, start: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        for i in range(count):
            epoch, offset = divmod(start + i, self.num_sequences)
            out[i] = self._permutation(epoch)[offset]
        return out


class MixedSequences:
    """Several corpora's packed sequences drawn by weight (data.sources).

    The stream is cut in blocks of BLOCK positions; in every block each source gets its share of
    the slots (largest remainders), in an order shuffled by (seed, block). A source's n-th draw is
    the n-th position of its own seeded permutations. So which sequence sits at any stream
    position is a pure function of (seed, position): independent of the world size, exact on
    resume, and the proportions hold in every block, not only on average."""

    BLOCK = 4096

    def __init__(self, parts: list[PackedSequences], weights: list[float], names: list[str]) -> None:
        self.parts, self.names = parts, names
        self.seq_len = parts[0].seq_len
        self.slots = _apportion(weights, self.BLOCK)

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)

    def batch(self, keys: np.ndarray) -> torch.Tensor:
        n = len(self.parts)
        rows = [self.parts[int(key) % n].tokens[int(key) // n * self.seq_len:(int(key) // n + 1) * self.seq_len + 1]
                for key in keys]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def order(self, seed: int) -> "MixtureOrder":
        return MixtureOrder(self, seed)

    def eval_keys(self, count: int) -> np.ndarray:
        return MixtureOrder(self, seed=0, shuffle=False).take(0, min(count, len(self)))


def _apportion(weights: list[float], slots: int) -> np.ndarray:
    """Integer slots per source in proportion to the weights (largest remainders), each >= 1."""
    shares = np.asarray(weights, dtype=np.float64) / sum(weights) * slots
    counts = np.maximum(np.floor(shares).astype(np.int64), 1)
    while counts.sum() < slots:
        counts[int(np.argmax(shares - counts))] += 1
    while counts.sum() > slots:
        counts[int(np.argmax(counts - shares))] -= 1
    return counts


class MixtureOrder:
    """Stream position -> key (sequence index x number of sources + source)."""

    def __init__(self, sequences: MixedSequences, seed: int, shuffle: bool = True) -> None:
        self.sequences, self.seed, self.shuffle = sequences, seed, shuffle
        n = len(sequences.parts)
        self.orders = [GlobalOrder(len(part), seed, stream=i) for i, part in enumerate(sequences.parts)]
        self.template = np.repeat(np.arange(n), sequences.slots)
        self._block = -1
        self._schedule = self.template

    def schedule(self, block: int) -> np.ndarray:
        """The source of every position of block `block`."""
        if block != self._block:
            self._schedule = (np.random.default_rng([self.seed, 1 << 30, block]).permutation(self.template)
                              if self.shuffle else self.template)
            self._block = block
        return self._schedule

    def draws_before(self, position: int) -> np.ndarray:
        """How many times each source was drawn at stream positions [0, position)."""
        block, within = divmod(position, MixedSequences.BLOCK)
        counts = self.sequences.slots * block
        return counts + np.bincount(self.schedule(block)[:within], minlength=len(self.orders))

    def take(self, start: int, count: int) -> np.ndarray:
        n = len(self.orders)
        out = np.empty(count, dtype=np.int64)
        drawn = self.draws_before(start)
        for i in range(count):
            block, within = divmod(start + i, MixedSequences.BLOCK)
            if within == 0 and i > 0:
                drawn = self.draws_before(start + i)
            source = int(self.schedule(block)[within])
            out[i] = self.orders[source].take(int(drawn[source]), 1)[0] * n + source
            drawn[source] += 1
        return out


@dataclass(frozen=True)
class BatchShape:
    micro_batch_size: int
    grad_accum: int
    data_ranks: int
    """Ranks that take different data: the mesh's data-parallel size (harness.parallel.mesh), the
    world size while every rank is a data-parallel rank."""

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.data_ranks


class TrainBatches:
    """This rank's micro-batches for any step, computed from the step number alone. `rank` is the
    data-parallel rank (of shape.data_ranks), from the mesh.

    A resumed run starts at (`start_step`, `start_offset`): the step it resumes after and how
    many sequences the run had consumed by then, so the stream continues with no sequence
    repeated or skipped, even if the global batch changed on resume.

    `skip_steps` are the steps (after start_step) whose batch is left out: from each of them on,
    the stream is one global batch further along (a loss-spike rollback re-runs those steps
    with the batches that followed)."""

    def __init__(
        self,
        sequences: "PackedSequences | MixedSequences",
        seed: int,
        shape: BatchShape,
        rank: int,
        start_step: int = 0,
        start_offset: int = 0,
        skip_steps: Sequence[int] = (),
    ) -> None:
        if hasattr(sequences, "__len__") and len(sequences) < shape.global_batch:  # a stream has no length
            raise HarnessError(
                f"the training split has {len(sequences)} sequences of {sequences.seq_len + 1} tokens, fewer than "
                f"one global batch ({shape.global_batch}); use more data or lower train.seq_len/micro_batch_size"
            )
        self.sequences = sequences
        self.order = sequences.order(seed)
        self.shape = shape
        self.rank = rank
        self.restart(start_step, start_offset, skip_steps)

    def restart(self, start_step: int, start_offset: int, skip_steps: Sequence[int] = ()) -> None:
        """Continue after `start_step`, with `start_offset` sequences consumed (a checkpoint's)."""
        self.start_step = start_step
        self.start_offset = start_offset
        self.skip_steps = sorted({s for s in skip_steps if s > start_step})

    def _skipped_by(self, step: int) -> int:
        return sum(1 for s in self.skip_steps if s <= step)

    def consumed_after(self, step: int) -> int:
        """Sequences the run has consumed once step `step` is done (left-out batches included)."""
        return self.start_offset + (step - self.start_step + self._skipped_by(step)) * self.shape.global_batch

    def global_indices(self, step: int) -> np.ndarray:
        """The sequence indices of step `step` (1-based), in global-batch order."""
        return self.order.take(self.consumed_after(step) - self.shape.global_batch, self.shape.global_batch)

    def tokens_by_source(self, step: int) -> Optional[dict[str, int]]:
        """A mixture's tokens consumed so far, per source, once step `step` is done."""
        if not isinstance(self.order, MixtureOrder):
            return None
        draws = self.order.draws_before(self.consumed_after(step))
        return {name: int(count) * self.sequences.seq_len for name, count in zip(self.sequences.names, draws)}

    def packing_efficiency(self, step: int) -> Optional[float]:
        """Instruction rows: example tokens over row tokens in step `step`'s global batch."""
        if not hasattr(self.sequences, "packing_efficiency"):
            return None
        return self.sequences.packing_efficiency(self.global_indices(step))

    def micro_batches(self, step: int) -> list[torch.Tensor]:
        per_rank = self.shape.micro_batch_size * self.shape.grad_accum
        mine = self.global_indices(step)[self.rank * per_rank : (self.rank + 1) * per_rank]
        mb = self.shape.micro_batch_size
        return [self.sequences.batch(mine[i : i + mb]) for i in range(0, per_rank, mb)]


class PrefetchedBatches:
    """A TrainBatches whose next step is prepared in a background thread while this one runs:
    the micro-batches are gathered from the token stream and, for a GPU, copied into page-locked
    memory, so the trainer's host-to-device copies are asynchronous and the host issues the next
    step at once. Same batches, same order: only when they are built changes."""

    def __init__(self, batches: TrainBatches, pin_memory: bool) -> None:
        self.batches = batches
        self.pin_memory = pin_memory
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="harness-batches")
        self._next: Optional[tuple[int, Future]] = None

    def _prepare(self, step: int) -> list[torch.Tensor]:
        micro_batches = self.batches.micro_batches(step)
        return [pinned(batch) for batch in micro_batches] if self.pin_memory else micro_batches

    def micro_batches(self, step: int) -> list[torch.Tensor]:
        if self._next is not None and self._next[0] == step:
            ready = self._next[1].result()
        else:  # the first step, or a step asked for out of order
            ready = self._prepare(step)
        self._next = (step + 1, self._worker.submit(self._prepare, step + 1))
        return ready

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)


def eval_batches(
    sequences: PackedSequences, count: int, micro_batch_size: int, rank: int, world_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `count` held-out sequences, dealt round-robin to the data-parallel ranks (`rank`
    of `world_size`: the mesh's data-parallel coordinates).

    Every rank gets the same number of micro-batches (padded with weight-0 rows) because FSDP
    forward passes are collective: a rank that stopped early would hang the others.
    """
    keys = sequences.eval_keys(count)
    n = len(keys)
    if n == 0:
        raise HarnessError(
            f"the validation split has no sequence of {sequences.seq_len + 1} tokens; "
            "raise data.val_fraction or lower train.seq_len"
        )
    mine = list(range(rank, n, world_size))
    per_rank = -(-n // world_size)
    padded = per_rank + (-per_rank) % micro_batch_size
    weights = [1.0] * len(mine) + [0.0] * (padded - len(mine))
    mine = mine + [0] * (padded - len(mine))
    out = []
    for i in range(0, padded, micro_batch_size):
        idx = keys[np.asarray(mine[i : i + micro_batch_size])]
        out.append((sequences.batch(idx), torch.tensor(weights[i : i + micro_batch_size])))
    return out
