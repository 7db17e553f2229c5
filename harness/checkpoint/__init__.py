"""Sharded, verified, backend- and world-size-independent checkpoints.

Layout of one checkpoint, `<checkpoint.dir>/step-<N>/`:

    manifest.json                     step, world size, backend, config hash, trainer state
                                      (scaler, data position, AdamW step), and every file's
                                      size and sha256
    config.yaml                       the resolved harness config that wrote it
    model_config.json                 the Hugging Face model config (for `harness export`)
    rank-<r>-of-<W>.safetensors       what rank r holds: for every parameter piece it owns,
                                      the fp32 master weight and both AdamW moments, as three
                                      flat tensors plus an index (name, full shape, offset in
                                      the flattened parameter, length); and its RNG states

Every rank writes only its own pieces; nothing is gathered. Because a piece is "elements
[offset, offset + length) of the flattened parameter", any backend (FSDP2 dim-0 shards, ZeRO-3
partitions, ZeRO-1/2 flat-buffer slices) at any world size can find the elements it needs.

Atomicity: ranks write into `step-<N>.tmp/`; once every rank reported success, rank 0 writes the
manifest last and renames the folder. A folder without a valid manifest, or whose files do not
match it, is never resumed from; `resume=auto` falls back to the previous good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from harness.config import Config, dump_yaml
from harness.console import print0
from harness.dist import RankInfo
from harness.errors import HarnessError
from harness.host_memory import return_free_memory
from harness.optim import adam_step_count, set_adam_step_count
from harness.checkpoint.staging import HostStaging, Snapshot, write_safetensors
from harness.parallel.base import STATE_KINDS, ParallelBackend

FORMAT = "harness-checkpoint/1"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Settings that define which sequences exist and in what order; a resume that changes them
# cannot continue the same data stream.
_DATA_KEYS = ("train.seed", "train.seq_len", "data.path", "data.name", "data.split", "data.text_field",
              "data.tokenizer", "data.val_fraction", "data.sources", "data.format", "data.token_dtype")


class CheckpointError(HarnessError):
    """A checkpoint cannot be written or read."""


@dataclass
class TrainerState:
    """Everything besides model and optimizer tensors that an exact resume needs."""

    step: int
    sequences_consumed: int
    global_batch: int
    world_size: int
    scaler: dict
    adam_steps: int
    spikes: dict = field(default_factory=dict)
    """The loss-spike guard's running window (harness.spikes)."""
    skipped_batches: int = 0
    """Batches left out by loss-spike rollbacks so far."""
    skip_steps: list = field(default_factory=list)
    """Steps after this one whose batch a rollback left out (the stream skips one batch at each)."""
    rollbacks: int = 0


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def rank_file_name(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}.safetensors"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _config_value(cfg_dict: dict, dotted: str) -> Any:
    node: Any = cfg_dict
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


# --------------------------------------------------------------------------------------------
# Saving


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

    def save(self, step: int, backend: ParallelBackend, state: TrainerState, blocking: bool = True) -> Optional[Path]:
        """Save step `step`. Returns the committed folder, or None while an async save is in
        flight. Raises CheckpointError on every rank if any rank failed."""
        self.finish()
        started = time.perf_counter()
        staging = self._begin(step)
        snapshot = self.staging.snapshot(backend)
        path = staging / rank_file_name(self.info.rank, self.info.world_size)
        if blocking or not self.cfg.checkpoint.async_save:
            result = _write_rank_file(path, snapshot, self.info.rank)
            return self._commit(step, staging, state, backend.name, result, started, None)
        result: list = []
        thread = threading.Thread(
            target=lambda: result.append(_write_rank_file(path, snapshot, self.info.rank)),
            name=f"checkpoint-step-{step}", daemon=True,
        )
        thread.start()
        self.in_flight = _InFlight(step, staging, state, backend.name, thread, result, started)
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
        return self._commit(flight.step, flight.staging, flight.state, flight.backend_name, result,
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

    def _commit(self, step: int, staging: Path, state: TrainerState, backend_name: str,
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
                        backend_name)
            except OSError as exc:
                problem = f"rank 0 could not finish {final.name}: {exc.strerror or exc}"
        problem = _agree(problem)
        if problem is not None:
            self._fail(step, staging, problem)
        if info.is_main:
            _prune(self.root, self.cfg.checkpoint.keep_last)
        dist.barrier()
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
            model_config_json: str, backend_name: str) -> None:
    (staging / "config.yaml").write_text(dump_yaml(cfg))
    (staging / "model_config.json").write_text(model_config_json)
    extras = {}
    for name in ("config.yaml", "model_config.json"):
        extras[name] = {"file": name, "bytes": (staging / name).stat().st_size, "sha256": _sha256(staging / name)}
    manifest = {
        "format": FORMAT,
        "step": step,
        "world_size": state.world_size,
        "backend": backend_name,
        "precision": cfg.precision,
        "config_hash": cfg.fingerprint(),
        "trainer_state": asdict(state),
        "files": files + list(extras.values()),
    }
    manifest_path = staging / MANIFEST
    manifest_path.write_text(json.dumps(manifest, indent=2))
    for name in ("config.yaml", "model_config.json", MANIFEST):  # each rank fsynced its own file
        _fsync(staging / name)
    if final.exists():  # re-saving a step after resuming from an earlier one
        replaced = final.with_name(final.name + ".replaced")
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
        os.rename(staging, final)
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        os.rename(staging, final)
    _fsync(final.parent)


def checkpoint_step(path: Path) -> int:
    """N of a step-<N> checkpoint folder."""
    match = _STEP_DIR.match(path.name)
    if match is None:
        raise CheckpointError(f"{path} is not a step-<N> checkpoint folder")
    return int(match.group(1))


def complete_checkpoints(root: Path) -> list[Path]:
    """step-<N> folders (not staging ones), oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def _prune(root: Path, keep_last: int) -> None:
    checkpoints = complete_checkpoints(root)
    for old in checkpoints[: max(0, len(checkpoints) - keep_last)]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Verifying and choosing


def read_manifest(path: Path) -> dict:
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} has no {MANIFEST}: it is incomplete or not a harness checkpoint")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}/{MANIFEST} is not valid JSON: the checkpoint is damaged") from None
    found = manifest.get("format")
    if found != FORMAT:
        version = found.rsplit("/", 1)[-1] if isinstance(found, str) and found.startswith("harness-checkpoint/") else ""
        if version.isdigit() and int(version) > int(FORMAT.rsplit("/", 1)[-1]):
            raise CheckpointError(f"{path} was written by a newer harness (format {found}; this one reads {FORMAT}): "
                                  "upgrade harness to load it")
        raise CheckpointError(f"{path} has format {found!r}, not a harness checkpoint ({FORMAT})")
    return manifest


def verify(path: Path, part: int = 0, parts: int = 1) -> Optional[str]:
    """None if the checkpoint is complete and intact, else what is wrong with it. With `parts`,
    only every parts-th file from `part` is hashed (ranks split the reading)."""
    try:
        manifest = read_manifest(path)
    except CheckpointError as exc:
        return str(exc)
    for entry in manifest["files"][part::parts]:
        file = path / entry["file"]
        if not file.is_file():
            return f"{file.name} is missing"
        size = file.stat().st_size
        if size != entry["bytes"]:
            return f"{file.name} has {size} bytes, the manifest says {entry['bytes']} (truncated or replaced)"
        if _sha256(file) != entry["sha256"]:
            return f"{file.name} does not match its sha256 in the manifest (corrupted)"
    return None


def _verify_together(path: Path, info: RankInfo) -> Optional[str]:
    """verify() with the hashing split across ranks; every rank gets the same verdict."""
    mine = verify(path, info.rank, info.world_size)
    found: list = [None] * info.world_size
    dist.all_gather_object(found, mine)
    return next((problem for problem in found if problem), None)


def choose_resume(cfg: Config, info: RankInfo) -> Optional[Path]:
    """The checkpoint to resume from; every rank takes part and gets the same answer."""
    wanted = cfg.resume.path
    if wanted == "none":
        return None
    if wanted != "auto":
        path = Path(wanted)
        if not path.is_dir():
            raise CheckpointError(f"resume={wanted}: no such checkpoint folder; use resume=auto or a step-<N> folder")
        problem = _verify_together(path, info)
        if problem:
            what = "" if "newer harness" in problem or "not a harness checkpoint" in problem else "the checkpoint is damaged: "
            raise CheckpointError(f"resume={wanted}: {what}{problem}")
        return path
    root = Path(cfg.checkpoint.dir)
    box = [[str(p) for p in complete_checkpoints(root)] if info.is_main else None]
    dist.broadcast_object_list(box, src=0)  # one listing, so every rank walks the same candidates
    candidates = [Path(p) for p in box[0]]
    if not candidates:
        print0(info.rank, f"resume=auto: no checkpoint in {root}; starting from step 0")
        return None
    for path in reversed(candidates):
        problem = _verify_together(path, info)
        if problem is None:
            print0(info.rank, f"resume=auto: resuming from {path}")
            return path
        print0(info.rank, f"resume=auto: skipping damaged checkpoint {path.name}: {problem}")
    raise CheckpointError(
        f"resume=auto: every checkpoint in {root} is damaged (see above); move them away to start over, "
        "or set resume=none"
    )


# --------------------------------------------------------------------------------------------
# Loading


class ShardReader:
    """Reads any element range of any saved parameter, whichever ranks wrote it."""

    def __init__(self, path: Path, manifest: dict) -> None:
        from safetensors import safe_open

        self.path = path
        self.files = [e["file"] for e in manifest["files"] if e["file"].endswith(".safetensors")]
        self.handles = []
        self.segments: dict[str, list[tuple[int, dict]]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for i, name in enumerate(self.files):
            handle = safe_open(str(path / name), framework="pt")
            self.handles.append(handle)
            for seg in json.loads(handle.metadata()["index"]):
                self.segments.setdefault(seg["name"], []).append((i, seg))
                self.shapes[seg["name"]] = tuple(seg["shape"])

    def names(self) -> list[str]:
        return list(self.segments)

    def read_into(self, name: str, offset: int, kind: str, out: torch.Tensor) -> None:
        """Fill `out` (1-D) with elements [offset, offset + len(out)) of `name`'s `kind`."""
        if name not in self.segments:
            raise CheckpointError(f"{self.path.name} has no parameter {name}; was it written for another model?")
        end = offset + out.numel()
        covered = 0
        for i, seg in self.segments[name]:
            lo, hi = max(offset, seg["offset"]), min(end, seg["offset"] + seg["length"])
            if lo >= hi:
                continue
            start = seg["at"] + lo - seg["offset"]
            data = self.handles[i].get_slice(kind)[start : start + hi - lo]
            out[lo - offset : hi - offset].copy_(data)
            covered += hi - lo
        if covered != out.numel():
            raise CheckpointError(
                f"{self.path.name} covers {covered} of elements [{offset}, {end}) of {name}: a shard is missing"
            )

    def full_tensor(self, name: str, kind: str = "param") -> torch.Tensor:
        shape = self.shapes[name]
        out = torch.empty(int(torch.Size(shape).numel()), dtype=torch.float32)
        self.read_into(name, 0, kind, out)
        return out.view(shape)

    def rng_state(self, rank: int, world_size: int, key: str) -> Optional[torch.Tensor]:
        target = rank_file_name(rank, world_size)
        if target not in self.files:
            return None
        handle = self.handles[self.files.index(target)]
        return handle.get_tensor(key) if key in handle.keys() else None


def check_compatible(path: Path, manifest: dict, cfg: Config, global_batch: int) -> None:
    """Refuse resumes that cannot continue the same run."""
    import yaml

    saved_cfg = yaml.safe_load((path / "config.yaml").read_text())
    now = cfg.to_dict()
    for key in _DATA_KEYS:
        before, after = _config_value(saved_cfg, key), _config_value(now, key)
        if before is None and after in ([], "auto", None):
            continue  # a key newer than the checkpoint, at its default: the same data as before
        if before != after:
            raise CheckpointError(
                f"the checkpoint was written with {key}={before!r} and this run has {after!r}: the data position "
                "cannot carry over; restore the setting, or set resume.weights_only=true to start a new run "
                "from these weights"
            )
    saved_batch = manifest["trainer_state"]["global_batch"]
    if saved_batch != global_batch and not cfg.resume.allow_new_global_batch:
        t = cfg.train
        raise CheckpointError(
            f"the checkpoint was trained with a global batch of {saved_batch} sequences; this run has "
            f"{global_batch} (train.micro_batch_size={t.micro_batch_size} x train.grad_accum={t.grad_accum} x "
            f"world size): keep {saved_batch} (adjust train.grad_accum) or set resume.allow_new_global_batch=true"
        )


def load_checkpoint(
    path: Path, backend: ParallelBackend, cfg: Config, info: RankInfo, device: torch.device, global_batch: int
) -> Optional[TrainerState]:
    """Load `path` into the live backend state. Returns the trainer state to continue from, or
    None with resume.weights_only (a new run that starts from these weights)."""
    manifest = read_manifest(path)
    weights_only = cfg.resume.weights_only
    if not weights_only:
        check_compatible(path, manifest, cfg, global_batch)
    reader = ShardReader(path, manifest)
    kinds = ("param",) if weights_only else STATE_KINDS
    with torch.no_grad():
        pieces = backend.state_pieces()
        model_names = {piece.name for piece in pieces}
        for piece in pieces:
            saved_shape = reader.shapes.get(piece.name)
            if saved_shape is not None and saved_shape != piece.shape:
                raise CheckpointError(
                    f"{path.name}: {piece.name} has shape {list(saved_shape)} in the checkpoint and "
                    f"{list(piece.shape)} in this model; the model config differs"
                )
            for kind in kinds:
                staging = torch.empty(piece.numel, dtype=torch.float32)
                reader.read_into(piece.name, piece.offset, kind, staging)
                piece.tensors[kind].copy_(staging.to(piece.tensors[kind].device))
    extra = sorted(set(reader.names()) - _all_model_names(model_names, info))
    if extra:
        raise CheckpointError(f"{path.name} holds parameters this model lacks ({', '.join(extra[:3])}); wrong model?")
    backend.after_state_load()
    if weights_only:
        return None
    state = TrainerState(**manifest["trainer_state"])
    set_adam_step_count(backend.torch_optimizer, state.adam_steps)
    _restore_rng(reader, state, info, device)
    return state


def _all_model_names(local: set[str], info: RankInfo) -> set[str]:
    gathered: list = [None] * info.world_size
    dist.all_gather_object(gathered, sorted(local))
    return {name for names in gathered for name in names}


def _restore_rng(reader: ShardReader, state: TrainerState, info: RankInfo, device: torch.device) -> None:
    if state.world_size != info.world_size:
        print0(info.rank, f"resume: world size {state.world_size} -> {info.world_size}; per-rank RNG streams restart")
        return
    cpu = reader.rng_state(info.rank, info.world_size, "rng.cpu")
    if cpu is not None:
        torch.set_rng_state(cpu)
    cuda = reader.rng_state(info.rank, info.world_size, "rng.cuda")
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def trainer_state_for(step: int, consumed: int, global_batch: int, world_size: int, scaler_state: dict,
                      backend: ParallelBackend, **extra: Any) -> TrainerState:
    return TrainerState(
        step=step,
        sequences_consumed=consumed,
        global_batch=global_batch,
        world_size=world_size,
        scaler=scaler_state,
        adam_steps=adam_step_count(backend.torch_optimizer),
        **extra,
    )
