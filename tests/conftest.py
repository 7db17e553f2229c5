"""Shared fixtures, and how the suite shares this machine between pytest-xdist workers."""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

import pytest
import torch.distributed as dist

# `make test` runs two xdist workers: most tests leave a core idle part of the time (one process,
# a launcher, a drill waiting for a fault), so a second worker fills it. --dist loadfile keeps a
# module's tests on one worker, so its module-scoped fixture (one spawn for many scenarios) is
# built once. (Not loadgroup: xdist 3.8 rewrites item._nodeid, which pytest 9 no longer reads.)
# A test marked `exclusive` (a drill with a deadline measured from a fault, a Slurm preemption)
# runs with the machine to itself.


class MachineShare:
    """A readers-writer lock across the xdist workers of one run, on two flock()ed files.

    Ordinary tests hold `main` shared; an exclusive one holds it alone. A writer waits holding
    `turnstile`, which every test passes through first, so a stream of shared tests on the other
    worker cannot keep it waiting forever.
    """

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.turnstile = open(folder / "turnstile.lock", "a+")
        self.main = open(folder / "main.lock", "a+")

    def acquire(self, exclusive: bool) -> None:
        fcntl.flock(self.turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(self.main, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            fcntl.flock(self.turnstile, fcntl.LOCK_UN)

    def release(self) -> None:
        fcntl.flock(self.main, fcntl.LOCK_UN)


_SHARE_KEY = pytest.StashKey["MachineShare | None"]()


def _machine_share() -> MachineShare | None:
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run_id is None:  # not under xdist: every test already has the machine to itself
        return None
    return MachineShare(Path(tempfile.gettempdir()) / f"harness-tests-{run_id}")


def pytest_configure(config):
    config.stash[_SHARE_KEY] = _machine_share()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Setup, call and teardown (module fixtures included) inside the test's share of the machine."""
    share = item.config.stash[_SHARE_KEY]
    if share is None:
        yield
        return
    share.acquire(exclusive=item.get_closest_marker("exclusive") is not None)
    try:
        yield
    finally:
        share.release()


@pytest.fixture(scope="session")
def world_of_one():
    """A real single-rank gloo process group in the pytest process, for code that all-reduces."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if created:
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def deepspeed_scaler_cls(world_of_one):
    """DeepSpeed's own DynamicLossScaler (its update_scale needs deepspeed.comm to be up)."""
    import deepspeed
    import deepspeed.comm

    # Avoid JIT-compiling DeepSpeed's shared-memory op; a world of one never uses it.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.comm.init_distributed(dist_backend="gloo")
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    return DynamicLossScaler
