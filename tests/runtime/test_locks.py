"""The cache lock: flock where the filesystem has it, an O_EXCL marker where it does not (ENOLCK on
NFS without lockd), with dead holders cleared and live ones named after a timeout."""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import socket
import time
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.runtime import locks


def _no_flock(monkeypatch) -> None:
    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(locks.fcntl, "flock", refuse)


def _hold_and_record(path: str, log: str, name: str, no_flock: bool) -> None:
    if no_flock:
        def refuse(fd, op):
            raise OSError(errno.ENOLCK, "No locks available")

        locks.fcntl.flock = refuse
    with locks.file_lock(Path(path)):
        with open(log, "a") as f:
            f.write(f"{name} in\n")
        time.sleep(0.3)
        with open(log, "a") as f:
            f.write(f"{name} out\n")


@pytest.mark.parametrize("no_flock", [False, True], ids=["flock", "marker"])
def test_holders_never_overlap(tmp_path, no_flock):
    log = tmp_path / "log"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_hold_and_record, args=(str(tmp_path / "x.lock"), str(log), f"p{i}", no_flock))
             for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    lines = log.read_text().splitlines()
    assert len(lines) == 6
    for i in range(0, 6, 2):  # every "in" is followed by the same holder's "out"
        assert lines[i].endswith(" in") and lines[i + 1] == lines[i].replace(" in", " out")
    assert not (tmp_path / "x.lock.held").exists()


def test_a_dead_holders_marker_is_cleared(tmp_path, monkeypatch):
    _no_flock(monkeypatch)
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)  # a pid that no longer exists
    (tmp_path / "x.lock.held").write_text(f"{socket.gethostname()} {child}\n")
    with locks.file_lock(tmp_path / "x.lock", timeout_s=5):
        assert (tmp_path / "x.lock.held").read_text().split() == [socket.gethostname(), str(os.getpid())]
    assert not (tmp_path / "x.lock.held").exists()


def test_a_live_holder_on_another_host_times_out_naming_it(tmp_path, monkeypatch):
    _no_flock(monkeypatch)
    (tmp_path / "x.lock.held").write_text("other-node 4242\n")
    with pytest.raises(HarnessError, match=r"held by other-node 4242 for over 1s .* delete .*x.lock.held"):
        with locks.file_lock(tmp_path / "x.lock", timeout_s=1):
            pass


def test_other_flock_errors_are_not_swallowed(tmp_path, monkeypatch):
    def broken(fd, op):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(locks.fcntl, "flock", broken)
    with pytest.raises(OSError):
        with locks.file_lock(tmp_path / "x.lock"):
            pass
