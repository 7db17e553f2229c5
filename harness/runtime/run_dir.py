"""The run folder is claimed before anything is written to it, and only by one job at a time.

`claim` (rank 0, first thing in setup): the folder must be writable (a read-only mount or a folder
of another user is one line, not a traceback half-way through a checkpoint), and no other live job
may hold it: rank 0 keeps an flock on run.dir/.lock, which names its holder (host and pid), for the
life of the process; the kernel drops it when the process dies, so a crashed job never blocks the
next. Where the filesystem has no flock, a marker file created with O_EXCL does the same (a marker
of a dead process on this host is taken over).

A run folder that did not exist before is removed again when setup fails (`Claim.abandon`), so a
bad config leaves nothing behind; an existing one is left as it was.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Optional

from harness.errors import HarnessError, first_line
from harness.runtime.locks import read_holder, try_marker

LOCK_NAME = ".lock"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


@dataclass
class Claim:
    path: Path
    created: bool
    """The folder did not exist before this job."""
    handle: Optional[IO] = None
    marker: Optional[Path] = None

    def abandon(self) -> None:
        """Setup failed: remove the folder if this job created it, and let go of the lock."""
        self.release()
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        if self.marker is not None:
            self.marker.unlink(missing_ok=True)
            self.marker = None


_HELD: dict[Path, Claim] = {}
"""This process's claims: a process that builds a second trainer on the same folder (a benchmark,
a test) takes it over from itself rather than finding it "in use"."""


def claim(path: Path) -> Claim:
    """Make sure `path` exists and is writable, and take it for this job (see the module docstring)."""
    previous = _HELD.pop(path.resolve(), None)
    if previous is not None:
        previous.release()
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HarnessError(f"run.dir {path} cannot be created ({first_line(exc)}); choose another run.dir") from None
    result = Claim(path, created)
    lock = path / LOCK_NAME
    try:
        handle = open(lock, "a+")
    except OSError as exc:
        result.abandon()
        raise HarnessError(f"run.dir {path} is not writable ({exc.strerror or first_line(exc)}); choose another "
                           "run.dir, or make it writable") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = read_holder(lock)
        handle.close()
        raise HarnessError(_in_use(path, holder, lock)) from None
    except OSError as exc:
        handle.close()
        if exc.errno not in _NO_FLOCK:
            raise
        result.marker = _take_marker(path)
    else:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{socket.gethostname()} {os.getpid()}\n")
        handle.flush()
        result.handle = handle
    _HELD[path.resolve()] = result
    return result


def _take_marker(path: Path) -> Path:
    marker = path / (LOCK_NAME + ".held")
    holder = try_marker(marker)
    if holder is not None:
        raise HarnessError(_in_use(path, holder, marker) + f" (no flock here: if that job is gone, delete {marker})")
    return marker


def _in_use(path: Path, holder: str, lock: Path) -> str:
    host, _, pid = holder.partition(" ")
    who = f"host {host}, pid {pid}" if pid else "an unknown process"
    return (f"run.dir {path} is in use by another job ({who}, holding {lock}); wait for it to finish or stop it, "
            "or choose another run.dir")
