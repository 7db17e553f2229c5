"""A lock between processes (and nodes) sharing a folder, for building caches once.

`flock` is the lock of choice: the kernel drops it when its holder dies. Some shared filesystems
do not implement it (NFS mounted with `nolock`, some FUSE and object-store mounts: ENOLCK,
EOPNOTSUPP, ENOSYS), so there the lock falls back to a marker file created with O_EXCL (atomic on
any POSIX filesystem, NFSv3 included) that names its holder. A marker left by a process that died
on this host is removed; one held past `timeout_s` (default 600 s) by another host is an error
naming the holder and the file to delete, never a silent hang. (Two waiters may both clear the
same dead holder's marker; what harness builds under a lock is written to a private folder and
renamed into place, so at worst it is built twice.)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from harness.errors import HarnessError
from harness.runtime.process import process_alive

_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_POLL_S = 0.2


@contextlib.contextmanager
def file_lock(path: Path, timeout_s: float = 600.0, wait_s: Optional[float] = None,
              on_wait: Optional[Callable[[str], None]] = None) -> Iterator[None]:
    """Hold an exclusive lock named by `path` while the block runs.

    `timeout_s` bounds the wait on the marker fallback; `wait_s` also bounds an flock wait (None:
    wait as long as the holder lives, which the kernel knows). `on_wait(holder)` is called once
    when the lock is found held ("host pid" of the holder, as it wrote it), to say who is waited for."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            _flock_waiting(handle, path, wait_s, on_wait)
        except OSError as exc:
            if exc.errno not in _NO_FLOCK:
                raise
            if on_wait is not None and (path.with_name(path.name + ".held")).exists():
                on_wait(read_holder(path.with_name(path.name + ".held")))
            with marker_lock(path.with_name(path.name + ".held"), wait_s or timeout_s):
                yield
            return
        handle.seek(0)
        handle.truncate()
        handle.write(f"{socket.gethostname()} {os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _flock_waiting(handle, path: Path, wait_s: Optional[float], on_wait: Optional[Callable[[str], None]]) -> None:
    if wait_s is None and on_wait is None:
        fcntl.flock(handle, fcntl.LOCK_EX)
        return
    deadline = None if wait_s is None else time.monotonic() + wait_s
    told = False
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        holder = read_holder(path)
        if not told and on_wait is not None:
            on_wait(holder)
            told = True
        if deadline is not None and time.monotonic() > deadline:
            raise HarnessError(
                f"waited {wait_s:.0f}s for {holder or 'another process'} holding {path}; if it is still working, "
                "wait for it (or raise the timeout), and if it is gone, its lock is released already: run again"
            )
        time.sleep(_POLL_S)


def try_marker(marker: Path) -> Optional[str]:
    """Create `marker` (O_EXCL) naming this process: None when taken, else its live holder
    ("host pid"). A marker left by a process that died on this host is taken over."""
    while True:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_holder(marker)
            if _is_dead_here(holder):
                with contextlib.suppress(FileNotFoundError):
                    marker.unlink()
                continue
            return holder or "an unknown process"
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}\n")
        return None


@contextlib.contextmanager
def marker_lock(marker: Path, timeout_s: float = 600.0) -> Iterator[None]:
    """The fallback: whoever creates `marker` (O_EXCL) holds the lock until it deletes it."""
    deadline = time.monotonic() + timeout_s
    while (holder := try_marker(marker)) is not None:
        if time.monotonic() > deadline:
            raise HarnessError(
                f"{marker} has been held by {holder} for over {timeout_s:.0f}s "
                f"(this filesystem has no flock); if that process is gone, delete {marker}"
            )
        time.sleep(_POLL_S)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            marker.unlink()


def read_holder(marker: Path) -> str:
    try:
        return marker.read_text().strip()
    except OSError:
        return ""


def _is_dead_here(holder: str) -> bool:
    """The holder ran on this host and its process no longer exists."""
    host, _, pid = holder.partition(" ")
    return host == socket.gethostname() and pid.isdigit() and not process_alive(int(pid))
