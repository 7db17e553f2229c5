"""Read back a wandb run file (run-<id>.wandb, online and offline runs both write one); wandb
ships no public reader. harness uses it to see which steps an interrupted attempt really
recorded, and the tests to check what was logged.

Format (wandb 0.31, ../shared/NOTES.md): a 7-byte header (":W&B", u16 0xBEE1, u8 version), then
32 KiB blocks of records, each with a 7-byte header (crc32 u32, length u16, type u8: 1 full,
2 first, 3 middle, 4 last); a block tail shorter than 7 bytes is padding. Payloads are
wandb_internal_pb2.Record protos.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def _payloads(data: bytes):
    pos, parts = HEADER, []
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if length == 0 and kind == 0:
            pos += room
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        if len(chunk) < length:  # the last record, cut off by a kill while it was written
            return
        pos += HEADER + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            parts = [chunk]
        elif kind == 3:
            parts.append(chunk)
        elif kind == 4:
            parts.append(chunk)
            yield b"".join(parts)


class UnreadableRunFile(ValueError):
    """A record of a run file does not parse: not a cut-off tail, but damage or another format."""


def read_run(path: Path) -> dict:
    """{"history": [row dicts], "config": {key: value}, "run_id": str}. A last record cut off by a
    kill is left out; any other record that does not parse raises UnreadableRunFile."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    history, config, run_id = [], {}, None
    for payload in _payloads(Path(path).read_bytes()):
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(payload)
        except DecodeError as exc:
            raise UnreadableRunFile(f"{path}: a record does not parse ({exc})") from None
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            history.append(row)
        elif kind == "run":
            run_id = record.run.run_id
            for item in record.run.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return {"history": history, "config": config, "run_id": run_id}


def find_runs(wandb_dir: Path, run_id: str = "*") -> list[Path]:
    """The run files under <wandb_dir>/wandb/, oldest first (folder names start with the time)."""
    return sorted(Path(wandb_dir).glob(f"wandb/*run-*-{run_id}/run-{run_id}.wandb"))
