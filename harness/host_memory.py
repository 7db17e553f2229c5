"""Host memory a rank holds, as the OS counts it, and keeping setup's transient copies from sticking.

Setup makes many short-lived tensors of a few MB to a few hundred MB (a block's fp32 init, a
tensor read from a checkpoint, DeepSpeed's staging buffers). glibc serves allocations above its
mmap threshold straight from the OS and returns them on free, but the threshold starts at 128 KiB
and grows to the size of every large block freed (up to 32 MiB): after the first freed block,
everything below that size comes from the heap and stays resident after it is freed. On a 300M
model on 4 ranks that kept ~0.25 GB per rank resident for nothing. During setup harness pins the
threshold at 1 MiB, then leaves it at glibc's own ceiling for the steps.
"""

from __future__ import annotations

import contextlib
import ctypes
import resource
import sys
from typing import Iterator

_M_MMAP_THRESHOLD = -3  # malloc.h
SETUP_MMAP_THRESHOLD = 1 << 20
STEADY_MMAP_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit


def peak_gb() -> float:
    """This process's resident-set high-water mark (ru_maxrss, KiB on Linux), GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def _set_mmap_threshold(size: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl or another libc: nothing to tune
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, size))


@contextlib.contextmanager
def setup_allocations_returned_to_os() -> Iterator[None]:
    _set_mmap_threshold(SETUP_MMAP_THRESHOLD)
    try:
        yield
    finally:
        _set_mmap_threshold(STEADY_MMAP_THRESHOLD)
