"""A hung rank must not hold a job for hours: the heartbeat watchdog.

Every rank runs one daemon thread. The training loop tells it where the rank is (`enter(phase,
step)`, a few attribute writes); every `interval` seconds the thread publishes a heartbeat to the
job's rendezvous store: the step, the phase, how long the rank has been in it, a counter, and
whether the main thread is waiting inside a collective (read off its Python stack).

When a rank has waited for the others (inside a collective, or for the device to finish one) in
one phase for `timeout_s`, it stops the job: it reads every rank's heartbeat twice, one interval
apart, and names the silent rank:
- a rank whose counter did not move is frozen (SIGSTOP, a dead host, uninterruptible sleep);
- else a rank that is not inside a collective while the others are: it is stuck in its own code;
- else the ranks furthest behind; if all are at the same place, a collective never completed.
It posts the verdict in the store, writes its own threads' stacks to run.dir/hang-rank-<r>.txt,
the lowest healthy rank prints one line (step, phase, silent rank), and the process exits with
EXIT_HUNG; every other rank's watchdog sees the verdict within an interval and dumps its stacks
and exits too (the stuck rank included: its stack shows where it is stuck). torch's own
collective timeout is set a little later (`backstop_timeout_s`), so the watchdog speaks first.

Ranks that are all busy in their own code for a long time (compiling, a huge first step) are not
a hang: nobody waits, so nobody trips. A frozen process cannot dump its stack; every other rank does.
"""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional

from harness.runtime.process import process_alive

EXIT_HUNG = 4
"""A rank stopped the job because some rank made no progress for parallel.timeout_s."""
PHASES = ("setup", "data", "forward", "backward", "decision", "step", "read", "checkpoint", "eval")
_VERDICT = "harness/hang"
# Frames of code that waits for other ranks: the collectives and the libraries that issue them.
_COLLECTIVE_PATHS = (f"torch{os.sep}distributed{os.sep}", f"deepspeed{os.sep}comm{os.sep}",
                     f"deepspeed{os.sep}runtime{os.sep}zero{os.sep}")
_HOST_READ = os.path.join("harness", "observe", "step_counter.py")
_LIBRARY_PATHS = (f"site-packages{os.sep}torch{os.sep}", f"site-packages{os.sep}deepspeed{os.sep}")


def interval_for(timeout_s: float) -> float:
    """How often heartbeats are written: often enough to tell a frozen rank within the timeout."""
    return max(0.5, min(5.0, timeout_s / 10))


def backstop_timeout_s(timeout_s: int) -> int:
    """torch's collective timeout: after the watchdog has had time to diagnose and report."""
    return timeout_s + int(4 * interval_for(timeout_s)) + 10


@dataclass(frozen=True)
class Beat:
    rank: int
    step: int
    phase: str
    seq: int
    """Phases entered so far in this step: where in the step the rank is, comparable across ranks."""
    in_phase_s: float
    waiting: bool
    """The main thread is inside a collective (waiting for other ranks)."""
    count: int
    host: str
    pid: int

    def where(self) -> str:
        return _where(self.phase, self.step)


def _where(phase: str, step: int) -> str:
    return f"{phase} of step {step}" if step > 0 else "start-up (before its first step)"


class Watchdog:
    def __init__(self, rank: int, world_size: int, timeout_s: float, run_dir: str,
                 store_factory: Optional[Callable[[], object]] = None) -> None:
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.run_dir = Path(run_dir)
        self.interval = interval_for(timeout_s)
        self._store_factory = store_factory
        self._store = None
        self.step, self.phase, self.seq = 0, "data", 0
        self._since = time.monotonic()
        self._armed = False
        self._count = 0
        self._main = threading.main_thread().ident
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._host = socket.gethostname()

    # -- the training loop's side ----------------------------------------------------------

    def enter(self, phase: str, step: int) -> None:
        """The main thread starts `phase` of `step` (a few attribute writes, no I/O)."""
        if step != self.step:
            self.step, self.seq = step, 0
        self.phase, self.seq = phase, self.seq + 1
        self._since = time.monotonic()
        self._armed = True

    def start(self) -> "Watchdog":
        # Connect and beat now, not an interval later in the thread: a rank frozen in its first
        # steps (tiny steps take milliseconds) is then still known, with where it was.
        self._connect()
        self._publish()
        self._thread = threading.Thread(target=self._run, name="harness-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self, wait: bool = True) -> None:
        """End the thread. wait=False when the rank is failing: the thread may be inside a call to a
        store whose host is already gone, and the launcher gives a failed job only seconds."""
        self._stop.set()
        if self._thread is not None and wait:
            self._thread.join(timeout=2 * self.interval + 5)
        self._thread = None

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._publish()
            verdict = self._verdict()
            if verdict is not None:
                self._dump_stacks(verdict)
                os._exit(EXIT_HUNG)
            if self._armed and time.monotonic() - self._since > self.timeout_s and self._main_thread_waits():
                self.trip()

    def _verdict(self) -> Optional[str]:
        """The line another rank posted when it stopped the job, if any."""
        store = self._connect()
        try:
            if store is not None and store.check([_VERDICT]):
                return store.get(_VERDICT).decode()
        except Exception:
            return None
        return None

    def _beat(self) -> Beat:
        return Beat(self.rank, self.step, self.phase, self.seq, time.monotonic() - self._since,
                    self._main_thread_waits(), self._count, self._host, os.getpid())

    def _main_thread_waits(self) -> bool:
        """Whether the main thread's innermost frames are a collective's (torch.distributed,
        DeepSpeed's comm or ZeRO coordinator) or a read of the device (which waits for the
        collectives queued on it), rather than the rank's own code."""
        frame = sys._current_frames().get(self._main)
        while frame is not None:
            path = frame.f_code.co_filename
            if frame.f_code.co_name == "host_read" and path.endswith(_HOST_READ):
                return True
            if any(p in path for p in _COLLECTIVE_PATHS):
                return True
            if not any(p in path for p in _LIBRARY_PATHS):
                return False  # reached the rank's own code (harness, transformers, a fault's sleep)
            frame = frame.f_back
        return False

    def _connect(self):
        if self._store is None and self._store_factory is not None:
            try:
                self._store = self._store_factory()
            except Exception:  # the store is gone (its host died): diagnose without it
                self._store = None
        return self._store

    def _publish(self) -> None:
        self._count += 1
        store = self._connect()
        if store is None:
            return
        try:
            store.set(f"harness/heartbeat/{self.rank}", json.dumps(self._beat().__dict__))
        except Exception:
            # The connection broke (the store's host restarted or is gone): reconnect next interval.
            # Beats that never arrive are what the other ranks' diagnosis reports.
            self._store = None

    def read_beats(self) -> dict[int, Beat]:
        """Every rank's last heartbeat. A read that fails is tried once more on a fresh
        connection (a client left broken by a timeout under load must not turn a frozen rank
        into "the store does not answer"); a rank whose beat is still unreadable is left out."""
        beats: dict[int, Beat] = {}
        for _ in range(2):
            store, broken = self._connect(), False
            if store is None:
                break
            for rank in range(self.world_size):
                if rank in beats:
                    continue
                key = f"harness/heartbeat/{rank}"
                try:
                    if store.check([key]):  # a rank that never beat is missing, not an error
                        beats[rank] = Beat(**json.loads(store.get(key)))
                except Exception:
                    broken = True
            if not broken:
                break
            self._store = None  # reconnect for the second attempt
        return beats

    def peers_gone(self) -> list[int]:
        """The other ranks that evidently stopped, for telling a collective that failed because a
        peer died from a bug of this rank's own: a peer on this host whose process is gone (or a
        zombie), a peer whose heartbeat never arrived, a peer on another host whose heartbeat did
        not move in an interval and a half (read twice, apart), and rank 0 when the store it hosts
        does not answer. [] when every peer is alive."""
        first = self.read_beats()
        if not first:
            return [0]
        peers = [r for r in range(self.world_size) if r != self.rank]
        gone = [r for r in peers if r not in first or (first[r].host == self._host and not process_alive(first[r].pid))]
        remote = [r for r in peers if r in first and first[r].host != self._host]
        if gone or not remote:
            return gone
        time.sleep(self.interval + 0.5)
        second = self.read_beats()
        return [r for r in remote if r not in second or second[r].count == first[r].count]

    # -- the report ------------------------------------------------------------------------

    def trip(self) -> None:
        """Diagnose, dump this rank's stacks, report (lowest healthy rank) and exit EXIT_HUNG."""
        stuck_s = time.monotonic() - self._since
        first = self.read_beats()
        time.sleep(self.interval + 0.5)
        self._publish()
        second = self.read_beats()
        diagnosis, reporter = diagnose(self.rank, self.world_size, first, second, self.where())
        line = (f"harness: hang: no progress for {stuck_s:.0f} s (parallel.timeout_s={self.timeout_s:g}) "
                f"in {diagnosis}; stacks in {self.run_dir}/hang-rank-*.txt")
        store = self._connect()
        try:
            if store is not None:
                store.set(_VERDICT, line)  # the other ranks dump their stacks and exit too
        except Exception:
            pass
        self._dump_stacks(line)
        if self.rank == reporter:
            print(line, file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_HUNG)

    def where(self) -> str:
        return _where(self.phase, self.step)

    def _dump_stacks(self, line: str) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / f"hang-rank-{self.rank}.txt", "w") as f:
                f.write(f"rank {self.rank} (host {self._host}, pid {os.getpid()}): in {self.where()} "
                        f"for {time.monotonic() - self._since:.0f} s\n{line}\n\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError as exc:
            print(f"[rank {self.rank}] could not write its stack to {self.run_dir}: {exc}", file=sys.stderr, flush=True)


def diagnose(rank: int, world_size: int, first: dict[int, Beat], second: dict[int, Beat], own_where: str) -> tuple[str, int]:
    """What the job is stuck in and which rank is silent, from two rounds of heartbeats one
    interval apart; and which rank reports it (the lowest one that is not silent)."""
    missing = [r for r in range(world_size) if r not in second]
    frozen = sorted(r for r in second if r in first and second[r].count == first[r].count)
    if not second:
        return f"{own_where}; the rendezvous store does not answer (its host, rank 0 or the launcher, is gone)", rank
    live = {r: b for r, b in second.items() if r not in frozen}
    silent: list[int]
    if frozen or missing:
        silent = frozen + missing
        why = "no heartbeat: the process is frozen or gone"
    else:
        outside = [r for r, b in live.items() if not b.waiting]
        if outside and len(outside) < len(live):
            silent = outside
            why = "not inside a collective while the others wait for it"
        else:
            behind = min((b.step, b.seq) for b in live.values())
            silent = sorted(r for r, b in live.items() if (b.step, b.seq) == behind)
            why = "furthest behind"
            if len(silent) == len(live):
                place = live[min(live)].where()
                return (f"{place}: every rank waits in the same collective, which never completed "
                        "(network, or a device that stopped)"), min(live)
    reporter = min((r for r in live if r not in silent), default=rank)
    beat = second.get(silent[0]) or first.get(silent[0])
    if beat is None:
        where = "a place it never reported (no heartbeat ever arrived from it)"
    elif frozen or missing:
        where = f"{beat.where()} (its last heartbeat)"
    else:
        where = beat.where()
    host = f" on {beat.host}, pid {beat.pid}" if beat is not None else ""
    ranks = ", ".join(str(r) for r in silent)
    waiting = live.get(reporter)
    others = f"; the others wait in {waiting.where()}" if waiting is not None and reporter not in silent else ""
    return f"{where}: silent rank {ranks}{host} ({why}){others}", reporter


def store_factory(master_addr: str, master_port: int, timeout_s: float) -> Callable[[], object]:
    """A separate client of the job's rendezvous store, with a short timeout, so that a store
    whose host froze costs the watchdog seconds, not the collective timeout."""
    def connect():
        import torch.distributed as dist

        return dist.TCPStore(master_addr, master_port, is_master=False, timeout=timedelta(seconds=timeout_s),
                             wait_for_workers=False)
    return connect
