"""Instruction data: chat conversations or prompt/completion pairs -> tokenized examples whose
trained tokens are marked, prepared once per filesystem like the text corpora (prepare.py).

data.format=chat: rows hold `messages` (data.messages_field), a list of {role, content} with
roles system/user/assistant/tool, rendered by the tokenizer's chat template (or the Jinja file
data.chat_template). The tokens of each assistant turn, as the template renders it (its
end-of-turn token included, so the model learns to stop), carry loss under data.train_on=assistant;
every other token is context. Spans are found by rendering the conversation up to each assistant
turn (with the generation prompt) and through it: the difference is the turn, whatever the
template's markup, so no {% generation %} marks are needed.

data.format=prompt_completion: rows hold `prompt` and `completion` (data.prompt_field,
data.completion_field): lists of messages (rendered as a conversation, trained on the
completion's turns), or strings. With data.prompt_template=chat (the default) and a tokenizer
that has a chat template, string prompts are one user turn and completions the assistant's, so
training sees what inference sends; with none (or no template), the prompt as the tokenizer
encodes text, the completion right after it, then EOS.

On disk (a folder per cache key): tokens.bin, trained.bin (one byte per token), ends.bin (int64:
where each example ends) and index.json with what was truncated or dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from harness.config import DataConfig
from harness.data.prepare import cache_dir, remove_stale, token_dtype
from harness.data.sources import Source, find_source, stream_rows
from harness.errors import HarnessError, first_line
from harness.runtime.locks import file_lock

INSTRUCTION_FORMATS = ("chat", "prompt_completion")
ROLES = ("system", "user", "assistant", "tool")
VERSION = 1
_CHUNK_EXAMPLES = 1024


@dataclass
class Examples:
    """Prepared examples, memory-mapped: example i is tokens[starts[i]:ends[i]]."""

    tokens: np.ndarray
    trained: np.ndarray
    ends: np.ndarray
    index: dict
    folder: Path

    def __len__(self) -> int:
        return len(self.ends)

    @property
    def starts(self) -> np.ndarray:
        return np.concatenate([[0], self.ends[:-1]]).astype(np.int64)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(np.concatenate([[0], self.ends])).astype(np.int64)


# --------------------------------------------------------------------------------------------
# One row -> (token ids, trained flags)


def load_chat_template(tokenizer: Any, template_file: str, tokenizer_ref: str) -> None:
    """data.chat_template replaces the tokenizer's template; without either, chat cannot render."""
    if template_file:
        path = Path(os.path.expanduser(template_file))
        if not path.is_file():
            raise HarnessError(f"data.chat_template {template_file!r} does not exist; point it at a Jinja file")
        tokenizer.chat_template = path.read_text()
    if not getattr(tokenizer, "chat_template", None):
        raise HarnessError(f"data.tokenizer {tokenizer_ref!r} has no chat template; set data.chat_template to a "
                           "Jinja file (the template of the model you fine-tune)")


def with_instruction_template(tokenizer: Any, cfg: DataConfig) -> Any:
    """The tokenizer with the chat template cfg's instruction rows render with: needed for
    data.format=chat, and data.chat_template replaces the tokenizer's own for any format."""
    if cfg.format == "chat" or cfg.chat_template:
        load_chat_template(tokenizer, cfg.chat_template, cfg.tokenizer)
    return tokenizer


def _render(tokenizer: Any, messages: list, generation_prompt: bool, where: str) -> str:
    """The template's text; a template that cannot render the row (its own raise_exception, a
    field it needs) is a one-line error about that row, not a Jinja traceback."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja2's TemplateError and whatever the template's own code raises
        raise HarnessError(f"{where}: the chat template cannot render this conversation ({first_line(exc)}); fix the "
                           "row, or use a template that accepts it (data.chat_template)") from None


def check_message(message: Any, where: str, number: int) -> None:
    """One message: {role, content} with a known role and string content (an assistant message
    that calls tools may leave content empty)."""
    if not isinstance(message, dict) or "role" not in message:
        raise HarnessError(f"{where}: message {number} must be a {{role, content}} object, got {str(message)[:60]!r}")
    role = message["role"]
    if role not in ROLES:
        raise HarnessError(f"{where}: message {number} has unknown role {role!r}; roles are {', '.join(ROLES)}")
    content = message.get("content")
    if isinstance(content, str) or (content is None and role == "assistant" and message.get("tool_calls")):
        return
    what = "no 'content'" if "content" not in message else \
        f"content that is {'null' if content is None else type(content).__name__}, not a string"
    raise HarnessError(f"{where}: message {number} ({role}) has {what}; give every message a string content")


@dataclass
class Budget:
    """How much of a long text needs tokenizing: tokens past train.seq_len are cut off anyway, and
    a token covers at most `longest_token` characters, so a text is cut (at a pre-token boundary,
    where the tokens before the cut are those of the whole text) after (seq_len + 1) x that many.
    A megabyte-long message then costs what a long-enough one does, not its size in Encodings."""

    chars: int
    cutter: Optional[Callable[[str], int]]

    def cut(self, text: str) -> str:
        if self.cutter is None or len(text) <= self.chars:
            return text
        at = self.cutter(text[:self.chars])
        return text[:at] if at > 0 else text


def token_budget(tokenizer: Any, seq_len: int) -> Budget:
    from harness.data.sources import pretoken_cutter

    longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
    return Budget((seq_len + 1) * longest + 1024, pretoken_cutter(tokenizer))


def chat_example(tokenizer: Any, messages: Any, train_on: str, where: str, first_trained: int = 0,
                 budget: Optional[Budget] = None) -> Optional[tuple[list[int], list[bool]]]:
    """A conversation's tokens and which carry loss (the assistant turns from message
    `first_trained` on); None when it has no assistant turn to train on (train_on=assistant).
    With a `budget`, only the tokens a row can hold (and one more, to tell it was cut) are made.
    Bad rows are one-line errors naming `where`."""
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if isinstance(messages, list) else "null" if messages is None else type(messages).__name__
        raise HarnessError(f"{where}: messages must be a non-empty list of {{role, content}}, got {got}")
    for number, message in enumerate(messages, 1):
        check_message(message, where, number)
    turns = [i for i, message in enumerate(messages) if message["role"] == "assistant" and i >= first_trained]
    if train_on == "assistant" and not turns:
        return None
    text = _render(tokenizer, messages, False, where)
    spans = []
    for i in turns:
        before = _render(tokenizer, messages[:i], True, where)
        through = _render(tokenizer, messages[:i + 1], False, where)
        if not (text.startswith(through) and through.startswith(before)) or len(through) == len(before):
            raise HarnessError(f"{where}: the chat template renders no assistant span for turn {i + 1} (rendering the "
                               "conversation up to a turn is not a prefix of rendering all of it); use a template "
                               "that renders each turn after the ones before it (data.chat_template)")
        spans.append((len(before), len(through)))
    encoded = tokenizer(budget.cut(text) if budget else text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    if train_on == "all":
        return ids, [True] * len(ids)
    trained = [any(start <= begin < end for start, end in spans) for begin, _ in offsets]
    return ids, trained


def prompt_completion_example(tokenizer: Any, prompt: Any, completion: Any, train_on: str, where: str,
                              budget: Optional[Budget] = None,
                              template: str = "chat") -> tuple[list[int], list[bool]]:
    """Lists of messages: the conversation prompt + completion, trained on the completion's turns.
    Strings with template=chat and a tokenizer that has a chat template: the prompt as one user
    turn and the completion as the assistant's, as the model is prompted at inference
    (apply_chat_template with the generation prompt). Otherwise (template=none, or no chat
    template): the prompt as the tokenizer encodes text (its BOS, if any), the completion right
    after it, then EOS."""
    if isinstance(prompt, list) and isinstance(completion, list):
        if not getattr(tokenizer, "chat_template", None):
            raise HarnessError(f"{where}: prompt and completion are messages but the tokenizer has no chat template; "
                               "set data.chat_template to a Jinja file")
        example = chat_example(tokenizer, prompt + completion, train_on, where, first_trained=len(prompt), budget=budget)
        if example is None:
            raise HarnessError(f"{where}: the completion has no assistant message")
        return example
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise HarnessError(f"{where}: prompt and completion must both be strings (or both lists of messages), got "
                           f"{_kind(prompt)} and {_kind(completion)}")
    if template == "chat" and getattr(tokenizer, "chat_template", None):
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        example = chat_example(tokenizer, turns, train_on, where, first_trained=1, budget=budget)
        assert example is not None  # the assistant turn is there to train on
        return example
    prompt_ids = tokenizer(budget.cut(prompt) if budget else prompt)["input_ids"]
    completion_ids = tokenizer(budget.cut(completion) if budget else completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    trained = [train_on == "all"] * len(prompt_ids) + [True] * len(completion_ids)
    return prompt_ids + completion_ids, trained


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# --------------------------------------------------------------------------------------------
# Reading rows


def instruction_source(cfg: DataConfig) -> Source:
    """data.path as rows (JSONL, JSON, parquet or a hub dataset); plain text is refused."""
    fmt = "auto"
    source = find_source(cfg, cfg.path, fmt, cfg.text_field)
    if source.builder == "text":
        raise HarnessError(f"data.format={cfg.format} reads rows (JSONL, JSON, parquet or a hub dataset), but data.path "
                           f"{cfg.path!r} is plain text; use data.format=text, or point data.path at rows of "
                           f"{'messages' if cfg.format == 'chat' else 'prompt/completion'}")
    return source


def _rows(source: Source) -> Iterator[tuple[str, dict]]:
    """(where, row) in the source's order, streamed; `where` names the file and row."""
    yield from stream_rows(source)


def _example(cfg: DataConfig, tokenizer: Any, where: str, row: dict,
             budget: Budget) -> Optional[tuple[list[int], list[bool]]]:
    if cfg.format == "chat":
        if cfg.messages_field not in row:
            raise HarnessError(f"{where} has no {cfg.messages_field!r} (columns: {', '.join(row)}); data.format=chat "
                               "reads a list of {role, content} messages per row (data.messages_field)")
        return chat_example(tokenizer, row[cfg.messages_field], cfg.train_on, where, budget=budget)
    for name in (cfg.prompt_field, cfg.completion_field):
        if name not in row:
            raise HarnessError(f"{where} has no {name!r} (columns: {', '.join(row)}); data.format=prompt_completion "
                               "reads data.prompt_field and data.completion_field")
    return prompt_completion_example(tokenizer, row[cfg.prompt_field], row[cfg.completion_field], cfg.train_on, where,
                                     budget, cfg.prompt_template)


@dataclass
class RowCheck:
    """What harness check found reading instruction rows as training would."""

    rows: int
    problems: list[str]
    sampled: bool
    """Only the first rows were read (a hub dataset)."""


def check_rows(cfg: DataConfig, tokenizer: Any, seq_len: int, hub_sample: int, max_problems: int = 10) -> RowCheck:
    """Every row of local files (the first `hub_sample` of a hub dataset) through the code that
    prepares them, collecting up to `max_problems` bad rows, each in its one line."""
    source = instruction_source(cfg)
    budget = token_budget(tokenizer, seq_len)
    problems: list[str] = []
    rows = 0
    try:
        for where, row in _rows(source):
            if not source.is_local and rows >= hub_sample:
                return RowCheck(rows, problems, sampled=True)
            rows += 1
            try:
                _example(cfg, tokenizer, where, row, budget)
            except HarnessError as exc:
                problems.append(str(exc))
                if len(problems) >= max_problems:
                    problems.append(f"(stopped after {max_problems} bad rows; there may be more)")
                    break
    except HarnessError as exc:  # the file itself (not JSON, not an object) stops the reading
        problems.append(str(exc))
    return RowCheck(rows, problems, sampled=False)


# --------------------------------------------------------------------------------------------
# Preparing (cached, crash-safe, shared like prepare.py's corpora)


def examples_key(cfg: DataConfig, source: Source, tokenizer: Any, seq_len: int) -> str:
    fields = [cfg.format, cfg.messages_field, cfg.prompt_field, cfg.completion_field, cfg.train_on, cfg.overlong,
              cfg.prompt_template]
    blob = json.dumps([VERSION, source.identity(), tokenizer.name_or_path, len(tokenizer),
                       getattr(tokenizer, "chat_template", None), fields, seq_len], default=str)
    return "examples-" + hashlib.sha256(blob.encode()).hexdigest()[:20]


def prepare_examples(cfg: DataConfig, tokenizer: Any, seq_len: int, log=print) -> Examples:
    """The prepared examples of data.path: from the cache, or built now under the key's lock."""
    source = instruction_source(cfg)
    root = cache_dir(cfg)
    key = examples_key(cfg, source, tokenizer, seq_len)
    folder = root / key
    if not (folder / "index.json").exists():
        with file_lock(root / f"{key}.lock", wait_s=cfg.wait_timeout_s,
                       on_wait=lambda holder: log(f"data: waiting for {holder or 'another process'} to prepare "
                                                  f"{cfg.path} ({folder})")):
            if not (folder / "index.json").exists():
                _build(cfg, source, tokenizer, seq_len, root, key, log)
    return open_examples(folder)


def _build(cfg: DataConfig, source: Source, tokenizer: Any, seq_len: int, root: Path, key: str, log) -> None:
    remove_stale(root, key)  # staging folders of preparations that died on this host
    staging = root / f"{key}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        index = _write(cfg, source, tokenizer, seq_len, staging, key)
        os.rename(staging, root / key)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"data: prepared {index['examples']:,} examples of {cfg.path} ({index['tokens']:,} tokens, "
        f"{index['trained_tokens']:,} trained); {describe_dropped(index)}")


def describe_dropped(index: dict) -> str:
    parts = [f"{index['truncated']:,} truncated" if index["truncated"] else "",
             f"{index['dropped_overlong']:,} dropped as longer than train.seq_len" if index["dropped_overlong"] else "",
             f"{index['dropped_untrained']:,} dropped with nothing to train on" if index["dropped_untrained"] else ""]
    said = ", ".join(part for part in parts if part)
    return said or "none truncated or dropped"


def _write(cfg: DataConfig, source: Source, tokenizer: Any, seq_len: int, folder: Path, key: str) -> dict:
    dtype = token_dtype(len(tokenizer))
    counts = {"rows": 0, "truncated": 0, "dropped_overlong": 0, "dropped_untrained": 0}
    total = trained_total = 0
    ends: list[int] = []
    digest = hashlib.sha256()
    with open(folder / "tokens.bin", "wb") as tokens_file, open(folder / "trained.bin", "wb") as trained_file, \
            open(folder / "ends.bin", "wb") as ends_file:
        budget = token_budget(tokenizer, seq_len)
        for where, row in _rows(source):
            counts["rows"] += 1
            example = _example(cfg, tokenizer, where, row, budget)
            truncated = example is not None and len(example[0]) > seq_len
            if truncated and cfg.overlong == "drop":
                counts["dropped_overlong"] += 1
                continue
            if truncated:
                example = (example[0][:seq_len], example[1][:seq_len])
            # The first token of an example is never a target (nothing before it in its row).
            if example is None or not any(example[1][1:]):
                counts["dropped_untrained"] += 1
                continue
            counts["truncated"] += truncated
            ids = np.asarray(example[0], dtype=dtype)
            flags = np.asarray(example[1], dtype=np.uint8)
            tokens_file.write(ids.tobytes())
            trained_file.write(flags.tobytes())
            digest.update(ids.tobytes())
            digest.update(flags.tobytes())
            total += len(ids)
            trained_total += int(flags[1:].sum())
            ends.append(total)
            if len(ends) >= _CHUNK_EXAMPLES:
                ends_file.write(np.asarray(ends, dtype=np.int64).tobytes())
                ends = []
        ends_file.write(np.asarray(ends, dtype=np.int64).tobytes())
    examples = counts["rows"] - counts["dropped_overlong"] - counts["dropped_untrained"]
    if examples == 0:
        what = "has no rows" if counts["rows"] == 0 else "left no example to train on"
        raise HarnessError(f"data.path {cfg.path!r} {what}: of {counts['rows']:,} rows, "
                           f"{describe_dropped({**counts, 'truncated': 0})} (no assistant turn, or none within "
                           "train.seq_len); check data.train_on, data.overlong and train.seq_len")
    index = {"key": key, "dtype": dtype.name, "vocab_size": len(tokenizer), "examples": examples, "tokens": total,
             "trained_tokens": trained_total, "sha256": digest.hexdigest(), **counts}
    (folder / "index.json").write_text(json.dumps(index, indent=1))
    return index


def open_examples(folder: Path) -> Examples:
    index = json.loads((folder / "index.json").read_text())
    dtype = np.dtype(index["dtype"])
    tokens = np.memmap(folder / "tokens.bin", dtype=dtype, mode="r")
    trained = np.memmap(folder / "trained.bin", dtype=np.uint8, mode="r")
    ends = np.fromfile(folder / "ends.bin", dtype=np.int64)
    return Examples(tokens, trained, ends, index, folder)
