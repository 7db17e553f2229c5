"""A token stream stored as a few large shard files, read through memory maps.

A prepared corpus is a folder:

    index.json            format, dtype, vocabulary size, tokenizer, EOS id, the settings hash,
                          the source, each shard's file, token count and sha256, totals
    tokens-00000.bin ...  the stream, raw little-endian uint16 or uint32 (what nanoGPT's and
                          Megatron's preprocessors write), split in shards of data.shard_mb
    documents.bin         int64: the stream position just after each document (after its EOS)

The folder appears under its final name only once complete (prepare.py), so whatever has an
index.json is whole. A flat token file (`data.format=tokens`: .npy or raw .bin) is read as a
stream of one shard.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from harness.errors import HarnessError

FORMAT = "harness-tokens/1"
INDEX = "index.json"


class TokenStream:
    """Tokens [start, stop) of the concatenated shards; slicing returns numpy arrays."""

    def __init__(self, shards: Sequence[np.ndarray], start: int = 0, stop: Optional[int] = None) -> None:
        self.shards = list(shards)
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        total = int(self.offsets[-1])
        self.start = start
        self.stop = total if stop is None else stop

    @property
    def dtype(self) -> np.dtype:
        return self.shards[0].dtype if self.shards else np.dtype(np.uint16)

    def __len__(self) -> int:
        return self.stop - self.start

    def view(self, start: int, stop: int) -> "TokenStream":
        return TokenStream(self.shards, self.start + start, self.start + stop)

    def __getitem__(self, key: Union[slice, int]) -> np.ndarray:
        if isinstance(key, int):
            return self[key:key + 1][0]
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError("token streams are sliced contiguously")
        return self.read(self.start + start, self.start + max(start, stop))

    def read(self, begin: int, end: int) -> np.ndarray:
        """Absolute positions [begin, end) across shard boundaries."""
        first = int(np.searchsorted(self.offsets, begin, side="right")) - 1
        parts = []
        position = begin
        shard = max(first, 0)
        while position < end and shard < len(self.shards):
            local = position - int(self.offsets[shard])
            take = min(end - position, len(self.shards[shard]) - local)
            if take > 0:
                parts.append(self.shards[shard][local:local + take])
                position += take
            shard += 1
        if not parts:
            return np.empty(0, dtype=self.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def tolist(self) -> list[int]:
        return self[:].tolist()

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out.astype(dtype) if dtype is not None else out


def open_prepared(folder: Path) -> tuple[TokenStream, dict]:
    """The stream of a prepared corpus folder and its index."""
    index = json.loads((folder / INDEX).read_text())
    if index.get("format") != FORMAT:
        raise HarnessError(f"{folder} was prepared by another harness version ({index.get('format')}); delete it to prepare again")
    dtype = np.dtype(index["dtype"])
    shards = [np.memmap(folder / shard["file"], dtype=dtype, mode="r") for shard in index["shards"] if shard["tokens"]]
    return TokenStream(shards), index


def open_token_file(path: str, dtype_name: Optional[str], vocab_size: int, checked_dir: Optional[Path] = None) -> TokenStream:
    """data.format=tokens: an existing flat token file, checked against the vocabulary. The check
    reads the whole file once; with `checked_dir` its result is kept there (keyed by the file's
    path, size and mtime), so later starts and the other ranks do not read terabytes again."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise HarnessError(f"data.path {path!r} does not exist; point data.format=tokens at a .npy or .bin token file")
    if file.stat().st_size == 0:
        raise HarnessError(f"token file {file} is empty; point data.path at a prepared token file")
    if file.suffix == ".npy":
        try:
            tokens = np.load(file, mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise HarnessError(f"token file {file} is not a readable .npy ({exc}); write it with numpy.save") from None
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise HarnessError(f"token file {file} holds {tokens.dtype} of shape {tokens.shape}; expected a 1-D integer array")
    else:
        dtype = np.dtype(dtype_name or ("uint16" if vocab_size <= 65536 else "uint32"))
        if file.stat().st_size % dtype.itemsize:
            raise HarnessError(
                f"token file {file} has {file.stat().st_size} bytes, not a multiple of {dtype.itemsize} ({dtype.name}); "
                "set data.token_dtype to the dtype it was written with"
            )
        tokens = np.memmap(file, dtype=dtype, mode="r")
    _check_vocabulary_once(tokens, vocab_size, file, checked_dir)
    return TokenStream([tokens])


def _check_vocabulary_once(tokens: np.ndarray, vocab_size: int, file: Path, checked_dir: Optional[Path]) -> None:
    if checked_dir is None:
        _check_vocabulary(tokens, vocab_size, file)
        return
    stat = file.stat()
    key = hashlib.sha256(json.dumps([str(file.resolve()), stat.st_size, stat.st_mtime_ns, tokens.dtype.name,
                                     vocab_size]).encode()).hexdigest()[:20]
    marker = checked_dir / f"{key}.checked"
    if marker.exists():
        return
    _check_vocabulary(tokens, vocab_size, file)
    checked_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{file}: every id below {vocab_size}\n")


def _check_vocabulary(tokens: np.ndarray, vocab_size: int, file: Path, block: int = 1 << 24) -> None:
    """Every id below the model's vocabulary, scanned in blocks (bounded memory)."""
    largest = -1
    for start in range(0, len(tokens), block):
        piece = tokens[start:start + block]
        if len(piece):
            largest = max(largest, int(piece.max()))
            if tokens.dtype.kind == "i" and int(piece.min()) < 0:
                raise HarnessError(f"token file {file} holds negative ids; it is not a token file (or data.token_dtype is wrong)")
    if largest >= vocab_size:
        raise HarnessError(
            f"token file {file} holds id {largest}, beyond the vocabulary of {vocab_size} (data.tokenizer); "
            "use the tokenizer it was prepared with, or check data.token_dtype"
        )
