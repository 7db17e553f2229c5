"""The suite's own readers-writer lock (conftest.MachineShare): how two xdist workers share the
machine. flock() locks belong to an open file, so two MachineShare objects in one process
contend exactly as two workers do."""

from __future__ import annotations

import fcntl
import threading
import time

import pytest

from tests.conftest import MachineShare


def _acquire_in_thread(share: MachineShare, exclusive: bool) -> threading.Event:
    got = threading.Event()

    def take() -> None:
        share.acquire(exclusive)
        got.set()

    threading.Thread(target=take, daemon=True).start()
    return got


def _wait_until_turnstile_held(share: MachineShare, timeout: float = 30.0) -> None:
    """Until someone holds `share`'s turnstile (a writer waiting for `main`): a fixed sleep races a
    loaded machine. The probe is a file of its own, so it contends as another worker would."""
    deadline = time.monotonic() + timeout
    with open(share.turnstile.name, "a+") as probe:
        while time.monotonic() < deadline:
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            fcntl.flock(probe, fcntl.LOCK_UN)
            time.sleep(0.01)
    raise AssertionError(f"nobody took the turnstile within {timeout} s")


def test_shared_holders_run_together_and_an_exclusive_one_waits_for_them(tmp_path):
    first, second, writer = MachineShare(tmp_path), MachineShare(tmp_path), MachineShare(tmp_path)
    first.acquire(exclusive=False)
    second.acquire(exclusive=False)  # would hang if shared holders excluded each other
    wrote = _acquire_in_thread(writer, exclusive=True)
    assert not wrote.wait(0.3)
    first.release()
    assert not wrote.wait(0.3)
    second.release()
    assert wrote.wait(5)
    writer.release()


def test_an_exclusive_holder_keeps_others_out_and_a_waiting_one_goes_first(tmp_path):
    reader, writer, late_reader = MachineShare(tmp_path), MachineShare(tmp_path), MachineShare(tmp_path)
    reader.acquire(exclusive=False)
    wrote = _acquire_in_thread(writer, exclusive=True)
    _wait_until_turnstile_held(writer)  # the writer is now waiting, holding the turnstile
    late = _acquire_in_thread(late_reader, exclusive=False)
    assert not late.wait(0.3), "a reader arriving after a waiting writer must not overtake it"
    reader.release()
    assert wrote.wait(5)
    assert not late.wait(0.3), "nobody shares the machine with an exclusive holder"
    writer.release()
    assert late.wait(5)
    late_reader.release()


@pytest.mark.spawns
def test_xdist_keeps_each_module_on_one_worker():
    """Module-scoped fixtures (one spawn for many scenarios) must be built once, not per worker."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    modules = ["tests/model/test_model_weights.py", "tests/numerics/test_grad_scale.py", "tests/runtime/test_dist.py"]
    result = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadfile", "-v",
                             "-p", "no:cacheprovider", *modules],
                            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    workers: dict[str, set[str]] = {}
    for worker, module in re.findall(r"\[(gw\d)\].* PASSED (tests/[\w/]+\.py)::", result.stdout):
        workers.setdefault(module, set()).add(worker)
    assert sorted(workers) == modules, result.stdout[-3000:]
    assert all(len(ran_on) == 1 for ran_on in workers.values()), workers
