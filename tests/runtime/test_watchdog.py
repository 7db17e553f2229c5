"""Which peers are gone, from evidence (their processes, their heartbeats, the store), not from the
words of an exception: a collective that failed because a peer died ends the rank in one line; the
same words from this rank's own bug keep its traceback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import torch.distributed as dist

from harness.runtime.dist import is_communication_failure
from harness.runtime.watchdog import Beat, Watchdog


def _beat(rank: int, pid: int, host: str, count: int = 1) -> str:
    return json.dumps(Beat(rank, 3, "forward", 1, 0.1, True, count, host, pid).__dict__)


def _watchdog(store, rank: int = 0, world_size: int = 3) -> Watchdog:
    return Watchdog(rank, world_size, timeout_s=1.0, run_dir="unused", store_factory=lambda: store)


def test_a_peer_whose_process_is_gone_or_a_zombie_is_gone_and_a_running_one_is_not(tmp_path):
    host = socket.gethostname()
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # exits, and is not reaped until wait()
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        zombie_pid = zombie.pid
        import time

        time.sleep(1.0)  # let it exit
        store = dist.HashStore()
        store.set("harness/heartbeat/1", _beat(1, finished.pid, host))
        store.set("harness/heartbeat/2", _beat(2, running.pid, host))
        watchdog = _watchdog(store)
        watchdog._publish()
        assert watchdog.peers_gone() == [1]
        store.set("harness/heartbeat/2", _beat(2, zombie_pid, host))
        assert watchdog.peers_gone() == [1, 2]
        store.set("harness/heartbeat/1", _beat(1, running.pid, host))
        store.set("harness/heartbeat/2", _beat(2, running.pid, host))
        assert watchdog.peers_gone() == []  # every peer alive: this rank's own failure
    finally:
        running.kill()
        running.wait()
        zombie.wait()


def test_a_peer_that_never_beat_or_whose_remote_heartbeat_stopped_is_gone_and_a_dead_store_is_rank_0():
    store = dist.HashStore()
    watchdog = _watchdog(store, world_size=2)
    watchdog._publish()
    assert watchdog.peers_gone() == [1]  # no heartbeat ever arrived
    store.set("harness/heartbeat/1", _beat(1, 1, "another-host", count=4))
    assert watchdog.peers_gone() == [1]  # on another host and its count did not move in 1.5 intervals

    def unreachable():
        raise RuntimeError("connection refused")

    assert Watchdog(1, 2, 1.0, "unused", store_factory=unreachable).peers_gone() == [0]


def test_what_counts_as_a_failed_collective():
    assert is_communication_failure(RuntimeError("[gloo] Connection closed by peer"))
    assert is_communication_failure(dist.DistError("NCCL communicator was aborted"))
    assert not is_communication_failure(ValueError("socket timeout in the user's parser"))
