"""Text -> a prepared token stream on disk, in bounded memory, once per filesystem.

`harness prepare-data CONFIG` runs this ahead of training; training runs it itself when the cache
is missing. The parent process reads documents (sources.py) and cuts them into tasks of about
TASK_CHARS characters; `data.num_proc` worker processes tokenize them (batched, the tokenizer's
fast path), at most two tasks per worker in flight, so memory does not grow with the corpus; the
parent appends the tokens, in order, to shard files while hashing them, and records where each
document ends. The stream is the one the previous implementation produced: each non-empty
document's tokens, then EOS.

Crash safety: everything is written into `<key>.tmp-<host>-<pid>/` and renamed to `<key>/`
after index.json, so a cache folder that exists is complete; a killed preparation leaves only a
tmp folder nothing reads (removed by the next preparation on that host). Sharing: one lock per
cache key; ranks and nodes on a shared filesystem wait for the one preparing (told who, bounded
by data.wait_timeout_s); without a shared filesystem every node prepares its own, and the
trainer compares the stream hashes of all ranks.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from harness import assets
from harness.config import DataConfig
from harness.data.sources import Piece, ReadStats, Source, iter_pieces, pretoken_cutter
from harness.data.stream import FORMAT, INDEX, TokenStream, open_prepared
from harness.errors import HarnessError
from harness.runtime.locks import file_lock
from harness.runtime.process import process_alive

TASK_CHARS = 1 << 20
CACHE_VERSION = 2


@dataclass
class Prepared:
    stream: TokenStream
    index: dict
    folder: Path


def cache_dir(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir or assets.cache_root() / "tokens")


def cache_key(source: Source, cfg: DataConfig, tokenizer) -> str:
    blob = json.dumps(
        [CACHE_VERSION, source.identity(), tokenizer.name_or_path, len(tokenizer), cfg.invalid_utf8],
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


def prepare(cfg: DataConfig, source: Source, tokenizer, tokenizer_path: str, name: str = "",
            show_progress: bool = True, log=print) -> Prepared:
    """The prepared stream of `source`: from the cache, or built now (under the key's lock)."""
    root = cache_dir(cfg)
    key = cache_key(source, cfg, tokenizer)
    folder = root / key
    if (folder / INDEX).exists():
        return _open(folder)
    label = name or source.path

    def waiting(holder: str) -> None:
        log(f"data: waiting for {holder or 'another process'} to finish preparing {label} ({folder}); "
            f"up to data.wait_timeout_s={cfg.wait_timeout_s}s")

    with file_lock(root / f"{key}.lock", wait_s=cfg.wait_timeout_s, on_wait=waiting):
        if (folder / INDEX).exists():
            return _open(folder)
        remove_stale(root, key)
        staging = root / f"{key}.tmp-{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            index = _write(staging, cfg, source, tokenizer, tokenizer_path, key, label, show_progress, log)
            os.rename(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    if index["invalid_utf8_bytes"]:
        log(f"data: warning: skipped {index['invalid_utf8_bytes']:,} undecodable bytes in "
            f"{len(index['invalid_utf8_files'])} file(s) of {label} (first: {index['invalid_utf8_files'][0]}); "
            "data.invalid_utf8=fail refuses them")
    return _open(folder)


def _open(folder: Path) -> Prepared:
    stream, index = open_prepared(folder)
    return Prepared(stream, index, folder)


def remove_stale(root: Path, key: str) -> None:
    """tmp folders of preparations that died on this host (their pid is gone)."""
    host = socket.gethostname()
    for tmp in root.glob(f"{key}.tmp-*"):
        owner, _, pid = tmp.name.rpartition("-")
        if owner.endswith(host) and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Writing


class _ShardWriter:
    """Appends tokens to tokens-NNNNN.bin files of at most `shard_tokens`, hashing as it writes."""

    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.dtype, self.shard_tokens = folder, dtype, shard_tokens
        self.shards: list[dict] = []
        self.stream_digest = hashlib.sha256()
        self.total = 0
        self._file = None
        self._digest = None
        self._count = 0

    def write(self, tokens: np.ndarray) -> None:
        position = 0
        while position < len(tokens):
            if self._file is None or self._count >= self.shard_tokens:
                self._next_shard()
            take = min(len(tokens) - position, self.shard_tokens - self._count)
            data = tokens[position:position + take].astype(self.dtype, copy=False).tobytes()
            self._file.write(data)
            self._digest.update(data)
            self.stream_digest.update(data)
            self._count += take
            self.total += take
            position += take

    def _next_shard(self) -> None:
        self._close_shard()
        name = f"tokens-{len(self.shards):05d}.bin"
        self._file = open(self.folder / name, "wb")
        self._digest = hashlib.sha256()
        self._count = 0
        self.shards.append({"file": name})

    def _close_shard(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.shards[-1].update(tokens=self._count, sha256=self._digest.hexdigest())
        self._file = None

    def close(self) -> None:
        self._close_shard()


def _write(folder: Path, cfg: DataConfig, source: Source, tokenizer, tokenizer_path: str, key: str, label: str,
           show_progress: bool, log) -> dict:
    dtype = token_dtype(len(tokenizer))
    eos = tokenizer.eos_token_id
    stats = ReadStats()
    writer = _ShardWriter(folder, dtype, max(1, cfg.shard_mb * 2**20 // dtype.itemsize))
    documents = open(folder / "documents.bin", "wb")
    progress = _Progress(label, source.total_bytes(), stats, show_progress, log)
    n_documents = 0
    workers = resolve_num_proc(cfg.num_proc)
    try:
        tasks = _tasks(iter_pieces(source, cfg.invalid_utf8, stats, pretoken_cutter(tokenizer)))
        spec = tokenizer.backend_tokenizer.to_str() if getattr(tokenizer, "is_fast", False) else tokenizer_path
        for tokens, ends in tokenize_in_order(tasks, spec, eos, dtype, workers):
            if len(ends):
                documents.write((ends.astype(np.int64) + writer.total).tobytes())
                n_documents += len(ends)
            writer.write(tokens)
            progress.update(writer.total)
    finally:
        writer.close()
        documents.close()
    if writer.total == 0:
        raise HarnessError(f"data.path {source.path!r} holds no text; point data.path at files with text in them")
    progress.done(writer.total)
    index = {
        "format": FORMAT,
        "key": key,
        "dtype": dtype.name,
        "vocab_size": len(tokenizer),
        "tokenizer": tokenizer.name_or_path,
        "eos": eos,
        "source": {"path": source.path, "builder": source.builder, "files": len(source.files),
                   "bytes": source.total_bytes(), "identity": source.identity()},
        "shards": writer.shards,
        "tokens": writer.total,
        "documents": n_documents,
        "stream_sha256": writer.stream_digest.hexdigest(),
        "invalid_utf8_bytes": stats.invalid_utf8,
        "invalid_utf8_files": stats.invalid_files,
        "null_rows": stats.skipped_rows,
        "prepared": {"host": socket.gethostname(), "seconds": round(progress.elapsed(), 3), "num_proc": workers},
    }
    # The index is written last: a folder is only renamed into place once it is whole.
    staging_index = folder / (INDEX + ".tmp")
    staging_index.write_text(json.dumps(index, indent=1, default=str))
    os.replace(staging_index, folder / INDEX)
    return index


def resolve_num_proc(num_proc: int) -> int:
    """data.num_proc, 0 meaning the cores this process may use."""
    if num_proc > 0:
        return num_proc
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _tasks(pieces: Iterable[Piece]) -> Iterator[list[Piece]]:
    batch: list[Piece] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece.text)
        if size >= TASK_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# --------------------------------------------------------------------------------------------
# Tokenizing (in worker processes)

_worker_tokenizer = None
_worker_eos: Optional[int] = None
_worker_dtype: Optional[np.dtype] = None


def _init_worker(tokenizer_spec: str, eos: Optional[int], dtype: str) -> None:
    """`tokenizer_spec`: a fast tokenizer's serialized Rust tokenizer (what transformers calls
    underneath, without importing transformers: workers start in a fraction of a second), or a
    path for AutoTokenizer."""
    global _worker_tokenizer, _worker_eos, _worker_dtype
    # Each worker is one core: the tokenizer's own thread pool would oversubscribe them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if tokenizer_spec.startswith("{"):
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(tokenizer_spec)
        # One piece at a time, without offsets: only one piece's Encoding is alive at once.
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        _worker_tokenizer = lambda texts: [encode([text], add_special_tokens=False)[0].ids for text in texts]  # noqa: E731
    else:
        from transformers import AutoTokenizer

        slow = AutoTokenizer.from_pretrained(tokenizer_spec)
        # Whole documents are encoded at once; the model_max_length warning does not apply to packing.
        slow.model_max_length = 1 << 60
        _worker_tokenizer = lambda texts: slow(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    _worker_eos, _worker_dtype = eos, np.dtype(dtype)


def tokenize_task(pieces: list[Piece]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens of the pieces with EOS after each non-empty document, positions just after each
    document that ends here)."""
    ids = _worker_tokenizer([piece.text for piece in pieces])
    eos = () if _worker_eos is None else (_worker_eos,)
    runs: list = []
    ends = []
    length = 0
    for piece, piece_ids in zip(pieces, ids):
        runs.append(piece_ids)
        length += len(piece_ids)
        if piece.last and (piece_ids or not piece.first):  # an empty document adds nothing, as before
            runs.append(eos)
            length += len(eos)
            ends.append(length)
    tokens = np.fromiter(itertools.chain.from_iterable(runs), dtype=_worker_dtype, count=length)
    return tokens, np.array(ends, dtype=np.int64)


def tokenize_in_order(tasks: Iterable[list[Piece]], tokenizer_spec: str, eos: Optional[int], dtype: np.dtype,
                      workers: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Results in task order; at most 2 tasks per worker in flight."""
    if workers <= 1:
        _init_worker(tokenizer_spec, eos, dtype.name)
        for task in tasks:
            yield tokenize_task(task)
        return
    context = multiprocessing.get_context("spawn")  # the trainer's process may hold threads: no fork
    pool = context.Pool(workers, initializer=_init_worker, initargs=(tokenizer_spec, eos, dtype.name))
    try:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.apply_async(tokenize_task, (task,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


# --------------------------------------------------------------------------------------------
# Progress


class _Progress:
    """tokens, tokens/s and (for local files) the share read and an ETA; redrawn on a terminal,
    a line every 10 s otherwise."""

    def __init__(self, label: str, total_bytes: int, stats: ReadStats, enabled: bool, log) -> None:
        self.label, self.total_bytes, self.stats, self.enabled, self.log = label, total_bytes, stats, enabled, log
        self.started = time.perf_counter()
        self.last = 0.0
        self.tty = sys.stderr.isatty()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def _line(self, tokens: int) -> str:
        elapsed = max(self.elapsed(), 1e-9)
        line = f"preparing {self.label}: {tokens:,} tokens, {tokens / elapsed:,.0f} tokens/s"
        if self.total_bytes and self.stats.bytes_read:
            share = min(1.0, self.stats.bytes_read / self.total_bytes)
            eta = elapsed * (1 - share) / share if share > 0 else 0
            line += f", {share:.0%} of {self.total_bytes / 2**20:,.0f} MiB, ETA {_duration(eta)}"
        return line

    def update(self, tokens: int) -> None:
        if not self.enabled:
            return
        now = self.elapsed()
        if now - self.last < (0.5 if self.tty else 10.0):
            return
        self.last = now
        if self.tty:
            print("\r" + self._line(tokens), end="", file=sys.stderr, flush=True)
        else:
            self.log(self._line(tokens))

    def done(self, tokens: int) -> None:
        if not self.enabled:
            return
        if self.tty:
            print("\r", end="", file=sys.stderr)
        elapsed = max(self.elapsed(), 1e-9)
        self.log(f"prepared {self.label}: {tokens:,} tokens in {_duration(elapsed)} ({tokens / elapsed:,.0f} tokens/s)")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
