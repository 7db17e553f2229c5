"""Text -> tokens -> packed fixed-length sequences -> a globally defined batch order.

The order is a property of the run, not of the world size: the global batch of step k is the
positions [(k-1)*G, k*G) of a stream that walks seeded permutations of all training sequences,
epoch after epoch (G = micro_batch_size x grad_accum x world size). Rank r takes a contiguous
slice of that global batch and cuts it into its micro-batches. So 1 rank with grad_accum 2 and
2 ranks with grad_accum 1 see the same sequences at every step, and a run can resume on another
world size from nothing but the step number.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from harness import assets
from harness.config import DataConfig
from harness.errors import HarnessError, first_line
from harness.locks import file_lock

_FORMATS = {".txt": "text", ".md": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_CACHE_VERSION = 1


@dataclass
class TokenCorpus:
    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    """len(tokenizer): every token id is below this."""
    description: str


# --------------------------------------------------------------------------------------------
# Loading and tokenizing


@dataclass(frozen=True)
class _Source:
    builder: str
    """A datasets builder (text/json/parquet) or a hub dataset name."""
    files: tuple[str, ...]
    kwargs: tuple[tuple[str, Any], ...]

    def load(self, split: str):
        import datasets

        kwargs = dict(self.kwargs)
        if self.files:
            return datasets.load_dataset(self.builder, data_files=list(self.files), split="train", **kwargs)
        return datasets.load_dataset(self.builder, split=split, **kwargs)

    def identity(self) -> list[Any]:
        """What the token cache key depends on: files by size and mtime, or the hub name."""
        stats = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in self.files]
        return [self.builder, stats, list(self.kwargs)]


def _find_source(cfg: DataConfig) -> _Source:
    if assets.is_bundled(cfg.path):
        files = tuple(str(f) for f in assets.bundled_text_files(cfg.path))
        return _Source("text", files, (("sample_by", "document"),))
    files = _local_files(cfg.path)
    if files is None:
        if cfg.format not in ("auto", "hub"):
            raise HarnessError(f"data.path {cfg.path!r} does not exist; point it at a local {cfg.format} file or folder")
        return _Source(cfg.path, (), (("name", cfg.name),) if cfg.name else ())
    builder = cfg.format if cfg.format != "auto" else _format_of(files, cfg.path)
    kwargs = (("sample_by", "document"),) if builder == "text" else ()
    return _Source(builder, tuple(files), kwargs)


def _local_files(path: str) -> list[str] | None:
    """The files a local data.path names, or None if it is not local (then it is a hub name)."""
    expanded = os.path.expanduser(path)
    if any(ch in expanded for ch in "*?["):
        files = sorted(f for f in glob.glob(expanded, recursive=True) if os.path.isfile(f))
        if not files:
            raise HarnessError(f"data.path {path!r} matches no files; check the pattern")
        return files
    p = Path(expanded)
    if p.is_file():
        return [str(p)]
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in _FORMATS)
        if not files:
            raise HarnessError(f"data.path {path!r} has no {', '.join(sorted(_FORMATS))} files")
        return files
    if expanded.startswith((".", "/", "~")) or Path(expanded).suffix.lower() in _FORMATS:
        raise HarnessError(f"data.path {path!r} does not exist; check the path (or use bundled:shakespeare)")
    return None


def _format_of(files: list[str], path: str) -> str:
    formats = {_FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in formats:
        odd = next(f for f in files if Path(f).suffix.lower() not in _FORMATS)
        raise HarnessError(f"data.path {path!r}: cannot tell the format of {odd}; set data.format=text|json|parquet")
    if len(formats) > 1:
        raise HarnessError(f"data.path {path!r} mixes formats {sorted(formats)}; point it at one kind of file")
    return formats.pop()


def load_tokenizer(ref: str):
    from transformers import AutoTokenizer

    resolved = assets.resolve_tokenizer(ref)
    try:
        return AutoTokenizer.from_pretrained(resolved)
    except (OSError, ValueError) as exc:
        raise HarnessError(
            f"data.tokenizer {ref!r} could not be loaded ({first_line(exc)}); use bundled:gpt2 or a local folder"
        ) from None


def load_corpus(cfg: DataConfig) -> TokenCorpus:
    """Tokenize (or reuse the cached tokens of) the corpus and split off the validation tail."""
    source = _find_source(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer)
    key = _cache_key(source, cfg, tokenizer)
    cache_dir = Path(cfg.cache_dir or assets.cache_root() / "tokens")
    path = cache_dir / f"{key}.npy"
    if not path.exists():
        with file_lock(cache_dir / f"{key}.lock"):
            if not path.exists():
                tokens = _tokenize(source, cfg, tokenizer)
                staging = path.with_name(f"{key}.tmp-{os.getpid()}.npy")
                np.save(staging, tokens)
                staging.rename(path)
    tokens = np.load(path, mmap_mode="r")
    n_val = int(len(tokens) * cfg.val_fraction)
    split = len(tokens) - n_val
    return TokenCorpus(
        train=tokens[:split],
        val=tokens[split:],
        vocab_size=len(tokenizer),
        description=f"{cfg.path} ({len(source.files) or 'hub'} files, {len(tokens):,} tokens)",
    )


def _cache_key(source: _Source, cfg: DataConfig, tokenizer) -> str:
    blob = json.dumps(
        [_CACHE_VERSION, source.identity(), cfg.split, cfg.text_field, tokenizer.name_or_path, len(tokenizer)],
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _tokenize(source: _Source, cfg: DataConfig, tokenizer) -> np.ndarray:
    try:
        dataset = source.load(cfg.split)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as exc:
        raise HarnessError(
            f"data.path {cfg.path!r} could not be loaded ({first_line(exc)}); "
            "point it at a local text/json/parquet file or folder"
        ) from None
    # Plain text files always come as one "text" column; text_field names the column elsewhere.
    field = "text" if source.builder == "text" else cfg.text_field
    if field not in dataset.column_names:
        raise HarnessError(
            f"data.text_field={field!r} is not a column of {cfg.path!r}; "
            f"columns: {', '.join(dataset.column_names)}"
        )
    # Whole documents are encoded at once; the model_max_length warning does not apply to packing.
    tokenizer.model_max_length = 1 << 60
    encoded = dataset.map(
        lambda batch: {"ids": tokenizer(list(batch[field]), add_special_tokens=False)["input_ids"]},
        batched=True,
        remove_columns=dataset.column_names,
        num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
        desc="tokenizing",
    )
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pieces = [np.asarray(ids + eos) for ids in encoded["ids"] if ids]
    if not pieces:
        raise HarnessError(f"data.path {cfg.path!r} holds no text in column {field!r}")
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    return np.concatenate(pieces).astype(dtype)



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


class GlobalOrder:
    """Position in the run's sequence stream -> sequence index, epoch after epoch."""

    def __init__(self, num_sequences: int, seed: int) -> None:
        self.num_sequences = num_sequences
        self.seed = seed
        self._epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)
            self._epoch = epoch
        return self._perm

    def take(self, start: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        for i in range(count):
            epoch, offset = divmod(start + i, self.num_sequences)
            out[i] = self._permutation(epoch)[offset]
        return out


@dataclass(frozen=True)
class BatchShape:
    micro_batch_size: int
    grad_accum: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size


class TrainBatches:
    """This rank's micro-batches for any step, computed from the step number alone.

    A resumed run starts at (`start_step`, `start_offset`): the step it resumes after and how
    many sequences the run had consumed by then, so the stream continues with no sequence
    repeated or skipped, even if the global batch changed on resume."""

    def __init__(
        self,
        sequences: PackedSequences,
        seed: int,
        shape: BatchShape,
        rank: int,
        start_step: int = 0,
        start_offset: int = 0,
    ) -> None:
        if len(sequences) < shape.global_batch:
            raise HarnessError(
                f"the training split has {len(sequences)} sequences of {sequences.seq_len + 1} tokens, fewer than "
                f"one global batch ({shape.global_batch}); use more data or lower train.seq_len/micro_batch_size"
            )
        self.sequences = sequences
        self.order = GlobalOrder(len(sequences), seed)
        self.shape = shape
        self.rank = rank
        self.start_step = start_step
        self.start_offset = start_offset

    def consumed_after(self, step: int) -> int:
        """Sequences the run has consumed once step `step` is done."""
        return self.start_offset + (step - self.start_step) * self.shape.global_batch

    def global_indices(self, step: int) -> np.ndarray:
        """The sequence indices of step `step` (1-based), in global-batch order."""
        return self.order.take(self.consumed_after(step - 1), self.shape.global_batch)

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
        return [batch.pin_memory() for batch in micro_batches] if self.pin_memory else micro_batches

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
    """The first `count` held-out sequences, dealt round-robin to ranks.

    Every rank gets the same number of micro-batches (padded with weight-0 rows) because FSDP
    forward passes are collective: a rank that stopped early would hang the others.
    """
    n = min(count, len(sequences))
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
        idx = np.asarray(mine[i : i + micro_batch_size])
        out.append((sequences.batch(idx), torch.tensor(weights[i : i + micro_batch_size])))
    return out
