"""Run a function on N real ranks (spawned processes, gloo) and collect what each returns.

Each rank pays the torch/transformers import once, so tests put several checks in one function.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        result: Any = ("ok", fn(*args))
    except BaseException:  # report any failure to the parent, which re-raises it
        result = ("error", traceback.format_exc())
    Path(out_dir, f"rank-{rank}.pkl").write_bytes(pickle.dumps(result))
    from harness.runtime.dist import shutdown

    if result[0] == "ok":
        shutdown()
    # Skip gloo's static destructors, which can abort at exit (pytorch #190489).
    os._exit(0)


def run_on_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 600) -> list[Any]:
    """fn(*args) on every rank, with RANK/WORLD_SIZE/MASTER_* set; returns the results by rank."""
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [
            ctx.Process(target=_worker, args=(rank, world_size, port, out_dir, fn, args))
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
        results = []
        for rank in range(world_size):
            path = Path(out_dir, f"rank-{rank}.pkl")
            if not path.exists():
                raise RuntimeError(f"rank {rank} died without a result (exit code {procs[rank].exitcode})")
            status, value = pickle.loads(path.read_bytes())
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results.append(value)
        return results
