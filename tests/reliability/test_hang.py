"""A rank hangs: the others do not wait for the collective timeout. The watchdog ends the job within
parallel.timeout_s (+ a margin), with one line naming the step, the phase and the silent rank, and
every rank that can dumps its stack to run.dir/hang-rank-<r>.txt."""

from __future__ import annotations

import json
import re
import signal
import time
from datetime import timedelta

import pytest

from harness.checkpoint import complete_checkpoints, verify
from harness.runtime.watchdog import EXIT_HUNG, Beat, Watchdog, diagnose, store_factory
from tests.distributed import free_port
from tests.reliability.drills import BACKENDS, Job, no_process_left

# Detection is timed from the freeze: a second worker's load would eat into the margins.
pytestmark = pytest.mark.exclusive

TIMEOUT_S = 10
# Detection within one heartbeat interval of the timeout, a second round of heartbeats, then
# launcher.FAILURE_GRACE_S for a frozen rank that cannot exit by itself.
MARGIN_S = 30
HANG_LINE = re.compile(r"harness: hang: no progress for \d+ s \(parallel\.timeout_s=10\) in (\w+) of step (\d+)"
                       r"(?: \(its last heartbeat\))?: silent rank 1 ")


def _check_stopped(job: Job, finished, silent_dumped: bool) -> re.Match:
    # Every assertion shows the job's output: a failure must say what the job did.
    said = f"after {finished.seconds:.1f} s, exit {finished.returncode}:\n{finished.output[-3000:]}"
    assert finished.returncode == EXIT_HUNG, said
    assert finished.seconds < TIMEOUT_S + MARGIN_S, said
    assert "Traceback" not in finished.output, said
    lines = [line for line in finished.output.splitlines() if line.startswith("harness: hang:")]
    assert len(lines) == 1, said  # one rank reports, the others only dump stacks
    match = HANG_LINE.search(lines[0])
    assert match, said
    dump = (job.run_dir / "hang-rank-0.txt").read_text()
    assert "Thread" in dump and "harness" in dump and lines[0] in dump, dump[-3000:]
    assert (job.run_dir / "hang-rank-1.txt").exists() == silent_dumped, said
    assert no_process_left(job.run_dir), said
    checkpoints = complete_checkpoints(job.run_dir / "checkpoints")
    assert checkpoints and all(verify(path) is None for path in checkpoints)
    return match


@pytest.mark.spawns
def test_a_frozen_rank_is_named_and_the_job_ends(tmp_path):
    job = Job(tmp_path / "run", *BACKENDS["fsdp2"], f"parallel.timeout_s={TIMEOUT_S}", "checkpoint.every=3",
              "train.steps=100000")
    job.wait_for_step(4)
    time.sleep(2.5)  # two heartbeat intervals of training: rank 1's last beat is from inside a step
    job.signal_rank(1, signal.SIGSTOP)
    finished = job.finish(timeout=TIMEOUT_S + MARGIN_S + 30)
    match = _check_stopped(job, finished, silent_dumped=False)  # a stopped process cannot write
    assert match.group(1) in ("data", "forward", "backward", "decision", "step", "read", "checkpoint")
    assert "no heartbeat" in finished.output, finished.output[-3000:]


@pytest.mark.spawns
def test_a_rank_stuck_in_its_own_code_is_named_with_its_phase_and_step(tmp_path):
    job = Job(tmp_path / "run", *BACKENDS["zero3"], f"parallel.timeout_s={TIMEOUT_S}", "checkpoint.every=2",
              "train.steps=6", "faults.hang_at_step=4", "faults.hang_rank=1")
    job.wait_for_step(3)
    job.fault_at = time.monotonic()  # rank 1 starts sleeping in step 4, right after step 3 is read
    finished = job.finish(timeout=TIMEOUT_S + MARGIN_S + 30)
    match = _check_stopped(job, finished, silent_dumped=True)
    assert match.group(1, 2) == ("forward", "4")
    assert "not inside a collective" in finished.output, finished.output[-3000:]
    assert "in maybe_hang" in (job.run_dir / "hang-rank-1.txt").read_text()  # the sleeping rank's own stack


def _beat(rank, step, seq, waiting=True, count=5, phase="decision"):
    return Beat(rank, step, phase, seq, 1.0, waiting, count, "node", 100 + rank)


def test_diagnosis_names_frozen_stuck_and_lagging_ranks():
    first = {r: _beat(r, 7, 3) for r in range(4)}
    frozen = {**{r: _beat(r, 7, 3, count=6) for r in range(4)}, 2: _beat(2, 7, 3)}
    text, reporter = diagnose(0, 4, first, frozen, "decision of step 7")
    assert "silent rank 2" in text and "no heartbeat" in text and reporter == 0

    busy = {**{r: _beat(r, 7, 3, count=6) for r in range(4)}, 0: _beat(0, 7, 1, waiting=False, count=6, phase="forward")}
    text, reporter = diagnose(3, 4, first, busy, "decision of step 7")
    assert text.startswith("forward of step 7: silent rank 0") and "not inside a collective" in text and reporter == 1

    behind = {**{r: _beat(r, 7, 3, count=6) for r in range(4)}, 3: _beat(3, 6, 9, count=6)}
    text, _ = diagnose(0, 4, first, behind, "decision of step 7")
    assert "silent rank 3" in text and "furthest behind" in text

    same = {r: _beat(r, 7, 3, count=6) for r in range(4)}
    text, reporter = diagnose(2, 4, first, same, "decision of step 7")
    assert "every rank waits in the same collective" in text and reporter == 0

    text, _ = diagnose(1, 4, first, {}, "decision of step 7")
    assert "rendezvous store does not answer" in text


_BUSY = """
import sys, time
import torch.distributed as dist
from harness.runtime.watchdog import Watchdog
store = dist.HashStore()
dog = Watchdog(0, 2, timeout_s=0.5, run_dir=sys.argv[1], store_factory=lambda: store).start()
dog.enter("forward", 3)
if sys.argv[2] == "verdict":
    store.set("harness/hang", "harness: hang: (posted by rank 1)")
time.sleep(4)  # busy in its own code, far past the timeout, with nobody waiting
print("alive")
# As harness.cli.train does: a daemon thread still inside a store call while the interpreter tears
# down can abort the process ("terminate called without an active exception").
dog.stop()
"""


@pytest.mark.spawns
def test_busy_ranks_are_not_a_hang_but_a_posted_verdict_stops_them(tmp_path):
    import subprocess
    import sys

    from tests.reliability.drills import ROOT

    busy = subprocess.run([sys.executable, "-c", _BUSY, str(tmp_path / "a"), "busy"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert busy.returncode == 0 and "alive" in busy.stdout, busy.stderr[-2000:]
    assert not (tmp_path / "a").exists()
    stopped = subprocess.run([sys.executable, "-c", _BUSY, str(tmp_path / "b"), "verdict"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert stopped.returncode == EXIT_HUNG and "alive" not in stopped.stdout
    dump = (tmp_path / "b" / "hang-rank-0.txt").read_text()
    assert "posted by rank 1" in dump and "in forward of step 3" in dump and "time.sleep" not in dump.split("\n")[0]


def test_heartbeats_are_read_through_a_fresh_connection_when_the_old_one_broke(tmp_path):
    """The store's host restarted (or a timeout under load broke the client): the diagnosis must
    still read every beat, not report that the store does not answer."""
    port = free_port()
    first = _store_server(port)
    watchdog = Watchdog(0, 2, 10, str(tmp_path), store_factory("127.0.0.1", port, 2.0))
    watchdog._publish()
    assert sorted(watchdog.read_beats()) == [0]  # rank 1 never beat: missing, and no wait for it
    del first  # the server goes away; the watchdog's client is now broken
    second = _store_server(port)
    for rank in (0, 1):
        second.set(f"harness/heartbeat/{rank}", json.dumps(_beat(rank, 3, 1).__dict__))
    assert sorted(watchdog.read_beats()) == [0, 1]


def test_a_rank_that_never_beat_is_named_and_start_beats_at_once(tmp_path):
    """A rank gone before its first heartbeat is still named; and start() beats at once, so a rank
    frozen in its first (millisecond) steps is known with the place it reached."""
    text, reporter = diagnose(0, 2, {0: _beat(0, 3, 2)}, {0: _beat(0, 3, 2, count=6)}, "decision of step 3")
    assert text.startswith("a place it never reported") and "silent rank 1" in text and reporter == 0
    assert "the others wait in decision of step 3" in text

    port = free_port()
    server = _store_server(port)
    watchdog = Watchdog(1, 2, 3600, str(tmp_path), store_factory("127.0.0.1", port, 2.0)).start()
    try:
        assert server.check(["harness/heartbeat/1"])  # the thread itself beats only after an interval (5 s)
        beat = Beat(**json.loads(server.get("harness/heartbeat/1")))
        assert beat.where() == "start-up (before its first step)" and beat.count == 1
    finally:
        watchdog.stop()


def _store_server(port: int):
    """A real rendezvous store on this machine, as torchrun's agent hosts one."""
    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5))


SETUP_OR_EVAL = re.compile(r"harness: hang: no progress for \d+ s \(parallel\.timeout_s=10\) in (.+?): silent rank 1 ")


@pytest.mark.spawns
@pytest.mark.parametrize("phase, where", [("setup", "start-up (before its first step)"), ("eval", "eval of step 2")])
def test_a_rank_stuck_in_setup_or_in_evaluation_is_named_too(tmp_path, phase, where):
    """The watchdog runs from the start of setup, and evaluation reads the device through
    host_read: a rank stuck there is found as one stuck in a step is."""
    job = Job(tmp_path / "run", *BACKENDS["fsdp2"], f"parallel.timeout_s={TIMEOUT_S}", "train.steps=4",
              "eval.every=2", "faults.hang_at_step=2", f"faults.hang_phase={phase}",
              "faults.hang_rank=1")
    job.fault_at = time.monotonic()
    finished = job.finish(timeout=TIMEOUT_S + MARGIN_S + 60)
    said = f"after {finished.seconds:.1f} s, exit {finished.returncode}:\n{finished.output[-3000:]}"
    assert finished.returncode == EXIT_HUNG, said
    assert "Traceback" not in finished.output, said
    lines = [line for line in finished.output.splitlines() if line.startswith("harness: hang:")]
    assert len(lines) == 1 and (match := SETUP_OR_EVAL.search(lines[0])), said
    assert match.group(1) == where, said
    assert "not inside a collective" in lines[0], said
    assert "in maybe_hang" in (job.run_dir / "hang-rank-1.txt").read_text()
    assert no_process_left(job.run_dir), said
