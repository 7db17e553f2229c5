"""Getting a rank's state to disk at disk speed.

- `HostStaging`: one flat fp32 host buffer per state kind (master weights, both AdamW moments),
  allocated once and reused by every save, page-locked on CUDA so the device-to-host copies are
  DMA transfers issued without waiting (`non_blocking`) and awaited once, with one event. The
  buffers are the snapshot: nothing is concatenated, so a save holds one copy of the rank's state
  in host memory, not two.
- `write_safetensors`: writes the safetensors format (8-byte header length, JSON header, raw
  data) straight from those buffers in 8 MiB slices, hashing each slice as it goes out, then
  fsyncs: the sha256 in the manifest costs no second read of the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from harness.parallel.base import STATE_KINDS, ParallelBackend

_SLICE = 8 << 20
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.uint8: "U8", torch.int8: "I8", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL"}


@dataclass
class Snapshot:
    """What this rank writes, in host memory: taken between steps, so training may go on while it
    is written (the next save waits for the write before it refills the buffers)."""

    tensors: dict[str, torch.Tensor]
    index: list[dict]


class HostStaging:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffers: dict[str, torch.Tensor] = {}

    def _buffer(self, kind: str, numel: int) -> torch.Tensor:
        buffer = self.buffers.get(kind)
        if buffer is None or buffer.numel() != numel:
            old = self.buffers.pop(kind, None)  # free the old size before allocating the new one
            if old is not None and self.device.type == "cuda":
                torch.cuda.cudart().cudaHostUnregister(old.data_ptr())
            buffer = torch.empty(numel, dtype=torch.float32)
            if self.device.type == "cuda" and numel:
                # Page-locked in place. torch's pinned allocator (pin_memory=True) rounds every
                # block up to a power of two: 538 MB became 1 GiB, doubling the host cost.
                status = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), numel * buffer.element_size(), 0)
                if int(status) != 0:
                    raise RuntimeError(f"cudaHostRegister failed ({status}) for a {numel * 4 / 2**20:.0f} MiB staging buffer")
            self.buffers[kind] = buffer
        return buffer

    def snapshot(self, backend: ParallelBackend) -> Snapshot:
        # A piece that is a copy of another rank's (an HSDP replica's) is not written, so every
        # element is in the checkpoint exactly once; a rank of copies writes its RNG states only.
        pieces = [piece for piece in backend.state_pieces() if piece.counted]
        index, at = [], 0
        for piece in pieces:
            index.append({"name": piece.name, "shape": list(piece.shape), "runs": [run.as_list() for run in piece.runs],
                          "length": piece.numel, "at": at})
            at += piece.numel
        tensors = {}
        for kind in STATE_KINDS:
            buffer = self._buffer(kind, at)
            for entry, piece in zip(index, pieces):
                source = piece.tensors[kind].detach().reshape(-1)
                buffer[entry["at"]:entry["at"] + entry["length"]].copy_(source, non_blocking=True)
            tensors[kind] = buffer
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
            done.synchronize()  # the copies above are all queued before it
        tensors["rng.cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        return Snapshot(tensors, index)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[int, str]:
    """Write `tensors` (host, contiguous) as a safetensors file and fsync it; returns its size and
    sha256, computed from the bytes as they were written."""
    layout = [(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in tensors.items()]
    return write_safetensors_streamed(path, layout, tensors.__getitem__, metadata)


def write_safetensors_streamed(path: Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                               produce: Callable[[str], torch.Tensor], metadata: dict[str, str]) -> tuple[int, str]:
    """A safetensors file whose tensors are produced one at a time, in `layout` order (name,
    dtype, shape), and dropped once written: the header is known from the layout alone, so no
    more than one tensor is ever held. fsynced; returns its size and sha256."""
    header: dict = {}
    offset = 0
    for name, dtype, shape in layout:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    digest = hashlib.sha256()
    size = 0
    # Hashing runs beside the writes, on the same slices in order (one worker keeps the order;
    # hashlib and file writes both release the GIL), so a save takes max(write, hash), not both.
    with open(path, "wb") as f, ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-sha256") as hasher:
        for chunk in (struct.pack("<Q", len(encoded)), encoded):
            f.write(chunk)
            digest.update(chunk)
            size += len(chunk)
        for name, dtype, shape in layout:
            tensor = produce(name)
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{name}: produced {tensor.dtype} {tuple(tensor.shape)}, the header says {dtype} {shape}")
            data = memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
            hashed = []
            for start in range(0, len(data), _SLICE):
                chunk = data[start:start + _SLICE]
                hashed.append(hasher.submit(digest.update, chunk))
                f.write(chunk)
            for update in hashed:  # before the tensor may be freed
                update.result()
            size += len(data)
            del tensor, data
        f.flush()
        os.fsync(f.fileno())
    return size, digest.hexdigest()
