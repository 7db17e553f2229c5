"""What a checkpoint is on disk: its layout, names, manifest and integrity check.

Layout of one checkpoint, `<checkpoint.dir>/step-<N>/`:

    manifest.json                     step, world size, backend, config hash, trainer state
                                      (scaler, data position, AdamW step), and every file's
                                      size and sha256
    config.yaml                       the resolved harness config that wrote it
    model_config.json                 the Hugging Face model config (for `harness export`)
    rank-<r>-of-<W>.safetensors       what rank r holds: for every parameter piece it owns,
                                      the fp32 master weight and both AdamW moments, as three
                                      flat tensors plus an index (name, full shape, the piece's
                                      runs in the flattened parameter, length, where it starts
                                      in the flat tensors); and its RNG states

Every rank writes only its own pieces; nothing is gathered. A piece's place in its parameter is a
list of runs, each [offset, length, count, stride]: `count` stretches of `length` elements,
`stride` apart, from `offset` of the flattened parameter (harness.parallel.base.Run). One run
with count 1 is a flat range (an FSDP2 dim-0 shard, a ZeRO-3 partition, a ZeRO-1/2 flat-buffer
slice); one strided run is a 2-D block; an N-D box is a few strided runs. So any backend at any
world size and sharding can find the elements it needs. Format 1 (before 2026-12-07) wrote one
flat range per piece as "offset" and "length"; it still loads.

Atomicity: ranks write into `step-<N>.tmp/`; once every rank reported success, rank 0 writes the
manifest last and renames the folder. A folder without a valid manifest, or whose files do not
match it, is never resumed from; `resume=auto` falls back to the previous good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from harness.errors import HarnessError

FORMAT = "harness-checkpoint/2"
READABLE_FORMATS = ("harness-checkpoint/1", FORMAT)
"""Format 1 differs only in how the index places a piece (one flat range)."""
MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step-(\d+)$")
# Settings that define which sequences exist and in what order; a resume that changes them
# cannot continue the same data stream.
DATA_KEYS = ("train.seed", "train.seq_len", "data.path", "data.name", "data.split", "data.text_field",
              "data.tokenizer", "data.val_fraction", "data.sources", "data.format", "data.token_dtype")



class CheckpointError(HarnessError):
    """A checkpoint cannot be written or read."""


@dataclass
class TrainerState:
    """Everything besides model and optimizer tensors that an exact resume needs."""

    step: int
    sequences_consumed: int
    global_batch: int
    world_size: int
    scaler: dict
    adam_steps: int
    spikes: dict = field(default_factory=dict)
    """The loss-spike guard's running window (harness.numerics.spikes)."""
    skipped_batches: int = 0
    """Batches left out by loss-spike rollbacks so far."""
    skip_steps: list = field(default_factory=list)
    """Steps after this one whose batch a rollback left out (the stream skips one batch at each)."""
    rollbacks: int = 0


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def rank_file_name(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}.safetensors"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_step(path: Path) -> int:
    """N of a step-<N> checkpoint folder."""
    match = STEP_DIR.match(path.name)
    if match is None:
        raise CheckpointError(f"{path} is not a step-<N> checkpoint folder")
    return int(match.group(1))


def complete_checkpoints(root: Path) -> list[Path]:
    """step-<N> folders (not staging ones), oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]



# --------------------------------------------------------------------------------------------
# Verifying


def read_manifest(path: Path) -> dict:
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} has no {MANIFEST}: it is incomplete or not a harness checkpoint")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}/{MANIFEST} is not valid JSON: the checkpoint is damaged") from None
    found = manifest.get("format")
    if found not in READABLE_FORMATS:
        version = found.rsplit("/", 1)[-1] if isinstance(found, str) and found.startswith("harness-checkpoint/") else ""
        if version.isdigit() and int(version) > int(FORMAT.rsplit("/", 1)[-1]):
            raise CheckpointError(f"{path} was written by a newer harness (format {found}; this one reads {FORMAT}): "
                                  "upgrade harness to load it")
        raise CheckpointError(f"{path} has format {found!r}, not a harness checkpoint ({FORMAT})")
    return manifest


def verify(path: Path, part: int = 0, parts: int = 1) -> Optional[str]:
    """None if the checkpoint is complete and intact, else what is wrong with it. With `parts`,
    only every parts-th file from `part` is hashed (ranks split the reading)."""
    try:
        manifest = read_manifest(path)
    except CheckpointError as exc:
        return str(exc)
    for entry in manifest["files"][part::parts]:
        file = path / entry["file"]
        if not file.is_file():
            return f"{file.name} is missing"
        size = file.stat().st_size
        if size != entry["bytes"]:
            return f"{file.name} has {size} bytes, the manifest says {entry['bytes']} (truncated or replaced)"
        if sha256_of(file) != entry["sha256"]:
            return f"{file.name} does not match its sha256 in the manifest (corrupted)"
    return None


