"""Per-step numbers and where they go: run.dir/metrics.jsonl (rank 0) and ranks/rank-r.jsonl.

One JSON object per optimizer step. Non-finite floats are written as null, so every line is
strict JSON that any tool can read; a skipped step says so in `skipped`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Protocol

import torch

from harness.config.fp8 import compute_precision
from harness.runtime import host_memory
from harness.runtime.host_memory import process_resources, return_free_memory

# Dense (no sparsity) peak TFLOP/s per device from the vendors' data sheets, by compute dtype.
# "fp32" is plain IEEE fp32: harness keeps TF32 off so that fp32 runs are an exact reference.
PEAK_TFLOPS = {
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.2},
    "H100": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9},
    "H200": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "B200": {"bf16": 2250.0, "fp16": 2250.0, "fp32": 80.0},
}

class Precision(Protocol):
    name: str
    """fp32, bf16, fp16 or fp8 (a harness.numerics.precision.PrecisionPolicy)."""


PER_RANK_FIELDS = ("step", "loss", "loss_scale", "skipped", "grad_norm", "mem_gb", "mem_reserved_gb", "host_mem_gb")


def device_peak_tflops(device: torch.device, policy: Precision, configured: Optional[float]) -> Optional[float]:
    """The peak used for MFU: the configured value, else the table's entry for this GPU, else None."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():
        if all(part in name for part in key.split()):
            # fp8: MFU against the bf16 peak, as torchtitan reports it (a run that moves to FP8 shows its gain).
            return peaks[compute_precision(policy.name)]
    return None


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated device memory (CUDA) or peak resident set size of this process (CPU), GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return host_memory.peak_gb()


def peak_reserved_gb(device: torch.device) -> Optional[float]:
    """Peak memory the CUDA caching allocator held (allocated + cached), GiB; None off CUDA."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**30
    return None


def strict_json(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    return value


def _rows_up_to(path: Path, step: int) -> list[str]:
    if not path.exists():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut off by the interruption
    return kept


class MetricsWriter:
    """Appends rows to metrics.jsonl on rank 0 and, with per_rank, ranks/rank-<r>.jsonl everywhere."""

    def __init__(self, run_dir: Path, rank: int, per_rank: bool, resume_step: Optional[int] = None) -> None:
        """A fresh run starts the files empty; a run resumed after step k keeps rows 1..k and
        drops the rows an interrupted attempt wrote after its last checkpoint."""
        self.main_path = run_dir / "metrics.jsonl" if rank == 0 else None
        self.rank_path = run_dir / "ranks" / f"rank-{rank}.jsonl" if per_rank else None
        for path in (self.main_path, self.rank_path):
            if path is None:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            kept = _rows_up_to(path, resume_step) if resume_step is not None else []
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, row: dict[str, Any]) -> None:
        if self.main_path is not None:
            self._append(self.main_path, row)
        if self.rank_path is not None:
            self._append(self.rank_path, {k: row[k] for k in PER_RANK_FIELDS if k in row})

    @staticmethod
    def _append(path: Path, row: dict[str, Any]) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(strict_json(row)) + "\n")


def write_json_atomically(path: Path, data: Any) -> None:
    """Write strict JSON to `path` via a temporary file and a rename: readers never see half a file."""
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(strict_json(data), indent=2) + "\n")
    staging.rename(path)


def append_resources(run_dir: Path, rank: int, step: Any) -> None:
    """debug.resources_every: this rank's memory, descriptors and threads, appended to its file.
    The heap's free pages are handed back first: glibc keeps up to tens of MB of a step's freed
    activations cached per thread arena, which made single samples swing by +-20% on a 0.5 GB
    process; after the trim RSS counts what the process holds."""
    return_free_memory()
    path = run_dir / "resources" / f"rank-{rank}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, **process_resources()}) + "\n")
