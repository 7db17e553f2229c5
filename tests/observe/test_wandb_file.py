"""Reading a wandb run file back: what the backfill of a resumed run trusts. A record cut off by a
kill is left out; any other damage stops the resume in one line instead of re-logging a history."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.observe.tracking import recorded_steps
from harness.observe.wandb_file import BLOCK, HEADER, read_run


def _record(step: int) -> bytes:
    from wandb.proto import wandb_internal_pb2

    record = wandb_internal_pb2.Record()
    for key, value in (("step", step), ("loss", 10.0 - step)):
        item = record.history.item.add()
        item.key, item.value_json = key, json.dumps(value)
    return record.SerializeToString()


def _run_file(path: Path, payloads: list[bytes]) -> Path:
    """wandb's framing: a 7-byte file header, then records in 32 KiB blocks (full records only)."""
    data = bytearray(b":W&B" + struct.pack("<HB", 0xBEE1, 0))
    for payload in payloads:
        if BLOCK - len(data) % BLOCK < HEADER + len(payload):
            data += b"\0" * (BLOCK - len(data) % BLOCK)
        data += struct.pack("<IHB", 0, len(payload), 1) + payload
    path.write_bytes(bytes(data))
    return path


def test_steps_of_an_intact_file_and_of_one_cut_off_mid_record(tmp_path):
    whole = _run_file(tmp_path / "whole.wandb", [_record(s) for s in (1, 2, 3)])
    assert [row["step"] for row in read_run(whole)["history"]] == [1, 2, 3]
    cut = tmp_path / "cut.wandb"
    cut.write_bytes(whole.read_bytes()[:-5])  # killed while writing step 3
    assert recorded_steps([cut]) == {1, 2}


def test_a_damaged_file_stops_the_resume_naming_it(tmp_path):
    damaged = _run_file(tmp_path / "damaged.wandb", [_record(1), b"\xff\xff\xff\xff not a record", _record(3)])
    with pytest.raises(HarnessError) as caught:
        recorded_steps([damaged])
    message = str(caught.value)
    assert "\n" not in message and "damaged.wandb" in message
    assert "move that file away" in message and "log.wandb=false" in message
