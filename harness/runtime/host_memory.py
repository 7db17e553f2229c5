"""Host memory a rank holds, as the OS counts it, and keeping setup's transient copies from sticking.

Setup makes many short-lived tensors of a few MB to a few hundred MB (a block's fp32 init, a
tensor read from a checkpoint, DeepSpeed's staging buffers). glibc serves allocations above its
mmap threshold straight from the OS and returns them on free, but the threshold starts at 128 KiB
and grows to the size of every large block freed (up to 32 MiB): after the first freed block,
everything below that size comes from the heap and stays resident after it is freed. On a 300M
model on 4 ranks that kept ~0.25 GB per rank resident for nothing. During setup harness pins the
threshold at 1 MiB, then leaves it at glibc's own ceiling for the steps, and gives freed heap
memory back after every checkpoint (`return_free_memory`): a save's transient buffers, freed by
the writer thread's arena, otherwise kept a long run's RSS drifting up and down by 40%
(bench/soak.sh).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import sys
import time
from pathlib import Path
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


def return_free_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim, every arena)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # musl or another libc
        pass


@contextlib.contextmanager
def setup_allocations_returned_to_os() -> Iterator[None]:
    _set_mmap_threshold(SETUP_MMAP_THRESHOLD)
    try:
        yield
    finally:
        _set_mmap_threshold(STEADY_MMAP_THRESHOLD)


def process_resources(threads_quiet_s: float = 0.05) -> dict:
    """This process's resident memory (GiB), open file descriptors and threads, from /proc: what
    grows when something leaks. Threads are counted once their number held still for
    `threads_quiet_s` (see _settled_thread_count)."""
    status = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        status[key] = value.split()
    return {
        "rss_gb": round(int(status["VmRSS"][0]) * 1024 / 2**30, 4),
        "open_fds": len(os.listdir("/proc/self/fd")) - 1,  # less the one listing them
        "threads": _settled_thread_count(threads_quiet_s),
    }


def _settled_thread_count(quiet_s: float = 0.05, limit_s: float = 1.0) -> int:
    """The process's OS threads, once the count has held still for `quiet_s`.

    Thread.join() returns when a thread's Python code is done, a moment before the kernel removes
    the thread: read at once after a join (a checkpoint writer, the batch worker), /proc still
    lists it in about 2% of tries here. A thread that lives on is still counted."""
    count, stable_since, deadline = _thread_count(), time.monotonic(), time.monotonic() + limit_s
    while time.monotonic() < deadline:
        time.sleep(0.005)
        now = _thread_count()
        if now != count:
            count, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since >= quiet_s:
            break
    return count


def _thread_count() -> int:
    return len(os.listdir("/proc/self/task"))
