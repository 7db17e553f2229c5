"""Writing checkpoints: every rank its own pieces, committed atomically by rank 0 (see format.py)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from harness.checkpoint.format import (
    FORMAT,
    MANIFEST,
    CheckpointError,
    TrainerState,
    complete_checkpoints,
    fsync,
    rank_file_name,
    sha256_of,
    step_dir_name,
)
from harness.checkpoint.staging import HostStaging, Snapshot, write_safetensors
from harness.config import Config, dump_yaml
from harness.observe.console import print0
from harness.parallel.base import ParallelBackend
from harness.runtime.dist import RankInfo
from harness.runtime.host_memory import return_free_memory


def _write_rank_file(path: Path, snapshot: Snapshot, rank: int) -> tuple[Optional[dict], Optional[str]]:
    """Write, fsync and hash one rank's file: (manifest entry, None) or (None, what went wrong)."""
    try:
        size, sha256 = write_safetensors(path, snapshot.tensors, {"format": FORMAT, "index": json.dumps(snapshot.index)})
        return {"file": path.name, "bytes": size, "sha256": sha256}, None
    except OSError as exc:
        return None, f"rank {rank} could not write {path.name}: {exc.strerror or exc}"


@dataclass
class _InFlight:
    """A save whose rank file is being written by a background thread."""

    step: int
    staging: Path
    state: TrainerState
    backend_name: str
    lora_base: Optional[dict]
    thread: threading.Thread
    result: list
    started: float


class Checkpointer:
    """Writes step-<N> checkpoints atomically. Every method is collective: all ranks call it at
    the same point of the loop.

    With `async_save`, `save()` only copies this rank's state to host memory (staging.py: reused
    buffers, one copy) and returns; a thread
    writes, fsyncs and hashes the file while training goes on, and the checkpoint is committed
    (manifest, rename, pruning) between two later steps, once every rank's file is on disk. One
    save is in flight at a time; the next save, a stop signal and the end of the run wait for it.
    Until it is committed a checkpoint is only a step-<N>.tmp folder, which nothing resumes from.
    """

    def __init__(self, cfg: Config, model_config_json: str, info: RankInfo, device: torch.device) -> None:
        self.cfg = cfg
        self.root = Path(cfg.checkpoint.dir)
        self.model_config_json = model_config_json
        self.info = info
        self.device = device
        self.in_flight: Optional[_InFlight] = None
        self.staging = HostStaging(device)

    def save(self, step: int, backend: ParallelBackend, state: TrainerState, lora_base: Optional[dict] = None,
             blocking: bool = True) -> Optional[Path]:
        """Save step `step` with the run's trainer state (harness.train.run_state) and, with LoRA,
        the base the adapters belong to (harness.model.lora.base_identity), named in the manifest.
        Returns the committed folder, or None while an async save is in flight. Raises
        CheckpointError on every rank if any rank failed."""
        self.finish()
        started = time.perf_counter()
        staging = self._begin(step)
        snapshot = self.staging.snapshot(backend)
        path = staging / rank_file_name(self.info.rank, self.info.world_size)
        if blocking or not self.cfg.checkpoint.async_save:
            result = _write_rank_file(path, snapshot, self.info.rank)
            return self._commit(step, staging, state, backend.name, lora_base, result, started, None)
        result: list = []
        thread = threading.Thread(
            target=lambda: result.append(_write_rank_file(path, snapshot, self.info.rank)),
            name=f"checkpoint-step-{step}", daemon=True,
        )
        thread.start()
        self.in_flight = _InFlight(step, staging, state, backend.name, lora_base, thread, result, started)
        print0(self.info.rank, f"checkpoint step {step}: state copied in {time.perf_counter() - started:.2f}s; "
                               "writing in the background")
        return None

    @property
    def writing(self) -> bool:
        """This rank's background write is still running."""
        return self.in_flight is not None and self.in_flight.thread.is_alive()

    def commit_if_written(self, written_on_every_rank: bool) -> Optional[Path]:
        """Between steps: commit the in-flight save once no rank is still writing (the trainer
        learns that in its end-of-step all-reduce; see `writing`)."""
        if self.in_flight is None or not written_on_every_rank:
            return None
        return self.finish()

    def finish(self) -> Optional[Path]:
        """Wait for the in-flight save, if any, and commit it."""
        if self.in_flight is None:
            return None
        flight, self.in_flight = self.in_flight, None
        flight.thread.join()
        result = flight.result[0] if flight.result else (None, f"rank {self.info.rank}'s writer thread died")
        return self._commit(flight.step, flight.staging, flight.state, flight.backend_name, flight.lora_base, result,
                            flight.started, time.perf_counter() - flight.started)

    def _begin(self, step: int) -> Path:
        staging = self.root / (step_dir_name(step) + ".tmp")
        problem = None
        if self.info.is_main:
            try:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
            except OSError as exc:
                problem = f"cannot create {staging}: {exc.strerror or exc}"
        problem = _agree(problem)
        if problem is not None:
            self._fail(step, staging, problem)
        return staging

    def _commit(self, step: int, staging: Path, state: TrainerState, backend_name: str, lora_base: Optional[dict],
                result: tuple[Optional[dict], Optional[str]], started: float, background_s: Optional[float]) -> Path:
        info = self.info
        final = self.root / step_dir_name(step)
        gathered: list = [None] * info.world_size
        dist.all_gather_object(gathered, result)
        problems = [p for _, p in gathered if p]
        problem = problems[0] if problems else None
        if problem is None and info.is_main:
            try:
                _finish(staging, final, step, [e for e, _ in gathered], state, self.cfg, self.model_config_json,
                        backend_name, lora_base)
            except OSError as exc:
                problem = f"rank 0 could not finish {final.name}: {exc.strerror or exc}"
        problem = _agree(problem)
        if problem is not None:
            self._fail(step, staging, problem)
        if info.is_main:
            _prune(self.root, self.cfg.checkpoint.keep_last)
        dist.barrier()
        if info.is_main:  # one rank sizes the files: W ranks stat-ing W files is a metadata storm
            size = sum(f.stat().st_size for f in final.iterdir()) / 2**20
            how = f"written in the background in {background_s:.1f}s" if background_s is not None else \
                f"{time.perf_counter() - started:.1f}s"
            print0(info.rank, f"checkpoint {final} saved ({size:.1f} MiB, {how})")
        return_free_memory()  # the save's transient buffers: back to the OS, not kept by the heap
        return final

    def _fail(self, step: int, staging: Path, problem: str) -> None:
        if self.info.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        earlier = complete_checkpoints(self.root)
        previous = earlier[-1] if earlier else None
        kept = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"checkpoint save at step {step} failed: {problem}; {kept}")


def _agree(problem: Optional[str]) -> Optional[str]:
    """Rank 0's verdict, shared with every rank."""
    box = [problem]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _finish(staging: Path, final: Path, step: int, files: list, state: TrainerState, cfg: Config,
            model_config_json: str, backend_name: str, lora_base: Optional[dict]) -> None:
    (staging / "config.yaml").write_text(dump_yaml(cfg))
    (staging / "model_config.json").write_text(model_config_json)
    extras = {}
    for name in ("config.yaml", "model_config.json"):
        extras[name] = {"file": name, "bytes": (staging / name).stat().st_size, "sha256": sha256_of(staging / name)}
    manifest = {
        "format": FORMAT,
        "step": step,
        "world_size": state.world_size,
        "backend": backend_name,
        "precision": cfg.precision,
        "config_hash": cfg.fingerprint(),
        "trainer_state": asdict(state),
        "lora_base": lora_base,
        "files": files + list(extras.values()),
    }
    manifest_path = staging / MANIFEST
    manifest_path.write_text(json.dumps(manifest, indent=2))
    for name in ("config.yaml", "model_config.json", MANIFEST):  # each rank fsynced its own file
        fsync(staging / name)
    if final.exists():  # re-saving a step after resuming from an earlier one
        replaced = final.with_name(final.name + ".replaced")
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
        os.rename(staging, final)
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        os.rename(staging, final)
    fsync(final.parent)


def _prune(root: Path, keep_last: int) -> None:
    checkpoints = complete_checkpoints(root)
    for old in checkpoints[: max(0, len(checkpoints) - keep_last)]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
