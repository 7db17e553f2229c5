"""Where the text comes from, read as a stream of documents in a fixed order, in bounded memory.

A source is local files (text, json/jsonl, parquet, arrow), a folder written by `datasets`'
`save_to_disk` (a Dataset, or a DatasetDict and its data.split), the bundled plays, or a
`datasets` hub dataset. Documents are what the tokenizer sees as one unit, each followed by EOS in
the token stream: a whole text file (as `datasets`' text builder with sample_by=document reads it:
UTF-8, universal newlines), or one row's text field.

Rows are read one file at a time, so every bad row is named by its file and number: JSON Lines
and JSON arrays with Python's json (line by line; pyarrow's reader fails a whole file on one bad
line and names no row), parquet and arrow files with `datasets` in streaming mode (no row group
or file held whole), hub datasets likewise.

A document (a text file, or a row's text) larger than PIECE_CHARS is handed over in pieces cut at
a pre-token boundary of the tokenizer (pretoken_cutter), which byte-level BPE tokenizers (GPT-2's,
Llama 3's, SmolLM2's) never merge across, so the tokens are those of the whole document and memory
stays bounded however large it is: a tokenizer's Encoding of a piece (ids, token strings, offsets,
masks) is ~500 bytes a token, ~30 MB for a piece. (SentencePiece tokenizers without such
boundaries read a document whole.)
"""

from __future__ import annotations

import codecs
import glob
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from harness import assets
from harness.config import DataConfig
from harness.errors import HarnessError, first_line

FORMATS = {".txt": "text", ".md": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
           ".arrow": "arrow"}
SAVED_DATASET = ("state.json", "dataset_info.json")
"""The files `Dataset.save_to_disk` writes beside its .arrow files."""
SAVED_DATASET_DICT = "dataset_dict.json"
PIECE_CHARS = 256 << 10
_READ_CHARS = 1 << 20
_CUT_WINDOW = 1 << 14
_CUT_MARGIN = 1 << 10
_INVALID_UTF8 = "harness-count-invalid-utf8"


@dataclass(frozen=True)
class Source:
    builder: str
    """text | json | parquet | arrow, or a hub dataset name."""
    files: tuple[str, ...]
    path: str
    """data.path as the user wrote it (for messages)."""
    hub_name: str | None = None
    split: str = "train"
    text_field: str = "text"

    @property
    def is_local(self) -> bool:
        return bool(self.files)

    def identity(self) -> list[Any]:
        """What the token cache key depends on: files by size and mtime, or the hub name."""
        stats = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in self.files]
        column = "text" if self.builder == "text" else self.text_field
        return [self.builder, stats, self.hub_name, self.split, column]

    def total_bytes(self) -> int:
        return sum(os.stat(f).st_size for f in self.files)


def find_source(cfg: DataConfig, path: str | None = None, fmt: str | None = None, text_field: str | None = None) -> Source:
    """The source data.path (or a data.sources entry's path) names."""
    path = path or cfg.path
    fmt = fmt or cfg.format
    field_name = text_field or cfg.text_field
    if path == "bundled:shakespeare-chat":
        from harness.data.shakespeare_chat import chat_file

        return Source("json", (str(chat_file()),), path, text_field=field_name)
    if assets.is_bundled(path):
        files = tuple(str(f) for f in assets.bundled_text_files(path))
        return Source("text", files, path)
    saved = saved_dataset_files(path, cfg.split)
    if saved is not None:  # what the folder is, whatever data.format says of its rows
        return Source("arrow", saved, path, text_field=field_name)
    files = local_files(path)
    if files is None:
        if fmt not in ("auto", "hub", "chat", "prompt_completion"):
            raise HarnessError(f"data.path {path!r} does not exist; point it at a local {fmt} file or folder")
        return Source(path, (), path, hub_name=cfg.name, split=cfg.split, text_field=field_name)
    by_name = fmt in ("auto", "chat", "prompt_completion") or all(f.endswith(".arrow") for f in files)
    builder = format_of(files, path) if by_name else fmt  # .arrow files are arrow whatever data.format says
    for f in files:
        if os.stat(f).st_size == 0:
            raise HarnessError(f"data file {f} is empty; remove it or point data.path elsewhere")
    return Source(builder, tuple(files), path, text_field=field_name)


def local_files(path: str) -> list[str] | None:
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
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in FORMATS)
        if not files:
            raise HarnessError(f"data.path {path!r} has no {', '.join(sorted(FORMATS))} files")
        return files
    if expanded.startswith((".", "/", "~")) or Path(expanded).suffix.lower() in FORMATS:
        raise HarnessError(f"data.path {path!r} does not exist; check the path (or use bundled:shakespeare)")
    return None


def saved_dataset_files(path: str, split: str) -> tuple[str, ...] | None:
    """The .arrow files of a folder written by `Dataset.save_to_disk` (or of data.split's folder of
    a `DatasetDict.save_to_disk` one), in the dataset's row order; None for any other path."""
    folder = Path(os.path.expanduser(path))
    if not folder.is_dir():
        return None
    if (folder / SAVED_DATASET_DICT).is_file():
        splits = json.loads((folder / SAVED_DATASET_DICT).read_text()).get("splits", [])
        if split not in splits:
            raise HarnessError(f"data.path {path!r} is a saved DatasetDict without a {split!r} split (it has "
                               f"{', '.join(splits) or 'none'}); set data.split")
        folder = folder / split
    if not all((folder / name).is_file() for name in SAVED_DATASET):
        return None
    state = json.loads((folder / "state.json").read_text())
    files = tuple(str(folder / entry["filename"]) for entry in state.get("_data_files", []))
    missing = [f for f in files if not os.path.isfile(f)]
    if not files or missing:
        raise HarnessError(f"data.path {path!r} is a saved dataset whose state.json names "
                           f"{'no data files' if not files else 'missing ' + missing[0]}; save it again "
                           "(Dataset.save_to_disk)")
    return files


def format_of(files: list[str], path: str) -> str:
    formats = {FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in formats:
        odd = next(f for f in files if Path(f).suffix.lower() not in FORMATS)
        raise HarnessError(f"data.path {path!r}: cannot tell the format of {odd} by its name; give the files one of "
                           f"the endings {', '.join(sorted(FORMATS))}")
    if len(formats) > 1:
        raise HarnessError(f"data.path {path!r} mixes formats {sorted(formats)}; point it at one kind of file")
    return formats.pop()


# --------------------------------------------------------------------------------------------
# Reading documents


@dataclass
class Piece:
    """Part (or all) of one document's text."""

    text: str
    first: bool
    last: bool


@dataclass
class ReadStats:
    invalid_utf8: int = 0
    """Undecodable bytes skipped (data.invalid_utf8=skip)."""
    invalid_files: list[str] = field(default_factory=list)
    bytes_read: int = 0
    """Of local files, for the progress bar's ETA."""
    skipped_rows: int = 0
    """Rows whose text field was null."""


class _Counter:
    """A codecs error handler that drops each undecodable byte and counts it."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, error: UnicodeDecodeError):
        self.count += error.end - error.start
        return "", error.end


_counter = _Counter()
codecs.register_error(_INVALID_UTF8, _counter)


def iter_pieces(source: Source, invalid_utf8: str, stats: ReadStats,
                cutter: Optional[Callable[[str], int]] = None) -> Iterator[Piece]:
    """Every document of `source`, in order; with a `cutter` (pretoken_cutter), text files come
    in pieces of about PIECE_CHARS characters."""
    if source.builder == "text" and source.is_local:
        for path in source.files:
            yield from _text_file_pieces(path, invalid_utf8, stats, cutter)
    else:
        for piece in _row_pieces(source, stats):
            yield from _cut_row(piece, cutter)


def _cut_row(piece: Piece, cutter: Optional[Callable[[str], int]]) -> Iterator[Piece]:
    """A row's text in pieces of about PIECE_CHARS (whole without a cutter)."""
    text, first = piece.text, True
    while cutter is not None and len(text) > 2 * PIECE_CHARS:
        cut = cutter(text[:PIECE_CHARS])
        if cut <= 0:
            break
        yield Piece(text[:cut], first, False)
        text, first = text[cut:], False
    yield Piece(text, first, True)


def _text_file_pieces(path: str, invalid_utf8: str, stats: ReadStats,
                      cutter: Optional[Callable[[str], int]]) -> Iterator[Piece]:
    errors = _INVALID_UTF8 if invalid_utf8 == "skip" else "strict"
    before = _counter.count
    raw = open(path, "rb")
    with io.TextIOWrapper(raw, encoding="utf-8", errors=errors, newline=None) as f:
        pending, first = "", True
        try:
            while True:
                block = f.read(_READ_CHARS)
                if not block:
                    break
                pending += block
                if cutter is not None and len(pending) >= PIECE_CHARS:
                    cut = cutter(pending)
                    if cut > 0:
                        yield Piece(pending[:cut], first, False)
                        pending, first = pending[cut:], False
        except UnicodeDecodeError as exc:
            raise HarnessError(
                f"data file {path} is not valid UTF-8 ({first_line(exc)}); fix the file, or set "
                "data.invalid_utf8=skip to drop undecodable bytes with a count"
            ) from None
        stats.bytes_read += os.stat(path).st_size
        yield Piece(pending, first, True)
    skipped = _counter.count - before
    if skipped:
        stats.invalid_utf8 += skipped
        stats.invalid_files.append(path)


def pretoken_cutter(tokenizer) -> Optional[Callable[[str], int]]:
    """A function giving where a long text can be cut without changing its tokens, or None when
    the tokenizer gives no such guarantee (no pre-tokenizer, or SentencePiece's Metaspace, which
    marks the start of every text it sees).

    Byte-level BPE merges only inside pre-tokens, and a regex pre-tokenizer restarts cleanly at a
    pre-token boundary: a cut there, after a non-space character (a trailing space would be
    matched differently at the end of a piece), leaves every token as it was. The boundary is
    found by pre-tokenizing a window at the end of the text, away from the window's edges."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None)
    if pre is None or "Metaspace" in repr(pre):
        return None

    def cut(text: str) -> int:
        lo = max(0, len(text) - _CUT_WINDOW)
        window = text[lo:]
        margin = min(_CUT_MARGIN, len(window) // 4)
        for _, (start, _end) in reversed(pre.pre_tokenize_str(window)):
            if margin <= start <= len(window) - margin and not window[start - 1].isspace():
                return lo + start
        return 0

    return cut


def stream_rows(source: Source) -> Iterator[tuple[str, dict]]:
    """(where, row) for every row of a json/parquet/arrow/hub source, in order; `where` names the
    file and the row's number in it (the line, in JSON Lines), for one-line errors. A row that is
    no object, a line that is no JSON, an unreadable file: each a one-line error."""
    if not source.is_local:
        yield from _hub_rows(source)
        return
    for path in source.files:
        if source.builder == "json":
            yield from _json_rows(path)
        else:
            yield from _dataset_file_rows(source.builder, path)


def _row_object(row: Any, where: str) -> dict:
    if isinstance(row, dict):
        return row
    what = "null" if row is None else f"a JSON {type(row).__name__}"
    raise HarnessError(f"{where} is {what}, not an object of columns; fix or remove that row")


def _json_rows(path: str) -> Iterator[tuple[str, dict]]:
    """JSON Lines (one object a line; blank lines skipped), or one JSON array of objects."""
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip()
    if head.startswith(b"["):
        yield from _json_array_rows(path)
        return
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            where = f"data file {path}, line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise HarnessError(f"{where} is not valid UTF-8 ({first_line(exc)}); fix or remove that line") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                if number == 1 and head.startswith(b"{") and _is_one_object(path):
                    raise HarnessError(f"data file {path} holds one JSON object, not rows; write JSON Lines (one "
                                       "object per line) or a JSON array of objects") from None
                raise HarnessError(f"{where} is not JSON ({first_line(exc)}); fix or remove that line") from None
            yield where, _row_object(row, where)


def _is_one_object(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as handle:
            return isinstance(json.load(handle), dict)
    except (ValueError, UnicodeDecodeError):
        return False


def _json_array_rows(path: str) -> Iterator[tuple[str, dict]]:
    try:
        with open(path, encoding="utf-8") as handle:
            rows = json.load(handle)
    except UnicodeDecodeError as exc:
        raise HarnessError(f"data file {path} is not valid UTF-8 ({first_line(exc)}); fix the file") from None
    except ValueError as exc:
        raise HarnessError(f"data file {path} is not valid JSON ({first_line(exc)}); fix the file") from None
    for i, row in enumerate(rows):
        where = f"data file {path}, row {i + 1}"
        yield where, _row_object(row, where)


def _dataset_file_rows(builder: str, path: str) -> Iterator[tuple[str, dict]]:
    """A parquet or arrow file, streamed by `datasets`."""
    import datasets

    try:
        rows = datasets.load_dataset(builder, data_files=[path], split="train", streaming=True)
        for i, row in enumerate(rows):
            yield f"data file {path}, row {i + 1}", row
    except HarnessError:
        raise
    except Exception as exc:  # datasets/pyarrow raise many types for unreadable files
        raise HarnessError(f"data file {path} could not be read as {builder} ({first_line(exc)}); check the file "
                           "(corrupt, or written by another tool?) or point data.path elsewhere") from None


def _hub_rows(source: Source) -> Iterator[tuple[str, dict]]:
    import datasets

    kwargs = {"name": source.hub_name} if source.hub_name else {}
    try:
        rows = datasets.load_dataset(source.builder, split=source.split, streaming=True, **kwargs)
        for i, row in enumerate(rows):
            yield f"row {i + 1} of hub dataset {source.path!r} ({source.split})", row
    except HarnessError:
        raise
    except Exception as exc:
        raise HarnessError(f"data.path {source.path!r} could not be read ({first_line(exc)}); check the name and "
                           "split, or point data.path at local files") from None


def _row_pieces(source: Source, stats: ReadStats) -> Iterator[Piece]:
    field_name = source.text_field
    for where, row in stream_rows(source):
        if field_name not in row:
            raise HarnessError(f"{where} has no column data.text_field={field_name!r} (columns: {', '.join(row)}); "
                               "set data.text_field")
        text = row[field_name]
        if text is None:
            stats.skipped_rows += 1
            continue
        if not isinstance(text, str):
            raise HarnessError(f"{where}: data.text_field={field_name!r} holds {type(text).__name__}, not text; "
                               "point data.text_field at a string column")
        yield Piece(text, True, True)
    stats.bytes_read = source.total_bytes()
