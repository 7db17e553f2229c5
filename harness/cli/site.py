"""What the Slurm site says about its nodes (sinfo), for defaults that depend on the hardware:
cores per rank, host memory per node, whether to ask for GPUs. Each answer is None (or False)
where no sinfo answers, e.g. on a laptop preparing a --dry-run."""

from __future__ import annotations

import shutil
import subprocess
from typing import Optional


def _sinfo(field: str, partition: str) -> Optional[str]:
    if shutil.which("sinfo") is None:
        return None
    cmd = ["sinfo", "-h", "-o", field] + (["-p", partition] if partition else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def _smallest(field: str, partition: str) -> Optional[int]:
    """The smallest value over the partition's nodes (sinfo writes "128+" for mixed groups)."""
    counts = [int(w.rstrip("+")) for w in (_sinfo(field, partition) or "").split() if w.rstrip("+").isdigit()]
    return min(counts) if counts else None


def node_cores(partition: str) -> Optional[int]:
    """CPU cores of the partition's smallest node."""
    return _smallest("%c", partition)


def node_memory_gib(partition: str) -> Optional[float]:
    """Host memory of the partition's smallest node, in GiB (sinfo reports MB; a node without
    RealMemory configured says 1, which is no answer)."""
    mb = _smallest("%m", partition)
    return mb / 1024 if mb and mb > 1 else None


def has_gpus(partition: str) -> bool:
    """Whether the partition's nodes have a gpu GRES."""
    return "gpu" in (_sinfo("%G", partition) or "")
