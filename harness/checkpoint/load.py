"""Reading checkpoints: choosing one to resume from, and loading any backend's or world size's
pieces into this run's (see format.py for why any layout can read any other)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from harness.checkpoint.format import (
    DATA_KEYS,
    CheckpointError,
    TrainerState,
    complete_checkpoints,
    rank_file_name,
    read_manifest,
    verify,
)
from harness.config import Config
from harness.numerics.optim import set_adam_step_count
from harness.observe.console import print0
from harness.parallel.base import STATE_KINDS, ParallelBackend
from harness.runtime.dist import RankInfo


def _verify_together(path: Path, info: RankInfo) -> Optional[str]:
    """verify() with the hashing split across ranks; every rank gets the same verdict."""
    mine = verify(path, info.rank, info.world_size)
    found: list = [None] * info.world_size
    dist.all_gather_object(found, mine)
    return next((problem for problem in found if problem), None)


def choose_resume(cfg: Config, info: RankInfo) -> Optional[Path]:
    """The checkpoint to resume from; every rank takes part and gets the same answer. With
    run.fresh=true, resume=auto starts afresh (the earlier run is moved aside, history.py)."""
    wanted = cfg.resume.path
    if cfg.resume.never or (wanted == "auto" and cfg.run.fresh):
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
        return None
    for path in reversed(candidates):
        problem = _verify_together(path, info)
        if problem is None:
            print0(info.rank, f"resume=auto: resuming from {path}, the newest intact checkpoint of this run "
                              "(run.fresh=true starts afresh instead, moving this run aside)")
            return path
        print0(info.rank, f"resume=auto: skipping damaged checkpoint {path.name}: {problem}")
    raise CheckpointError(
        f"resume=auto: every checkpoint in {root} is damaged (see above); set run.fresh=true to move them "
        "aside and start over"
    )



def _config_value(cfg_dict: dict, dotted: str) -> Any:
    node: Any = cfg_dict
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node



class ShardReader:
    """Reads any element range of any saved parameter, whichever ranks wrote it.

    Data is read with positioned reads (pread) from offsets in the safetensors headers, not
    through a memory map: mapped pages count in the process's resident memory once touched, so a
    reader walking a whole checkpoint (an export, a resume) would otherwise look as large as it."""

    def __init__(self, path: Path, manifest: dict, only: Optional[list[str]] = None) -> None:
        """Every rank file of the checkpoint, or `only` those named."""
        self.path = path
        self.files = [e["file"] for e in manifest["files"] if e["file"].endswith(".safetensors")]
        if only is not None:
            self.files = [name for name in self.files if name in only]
        self.fds: list[int] = []
        self.layouts: list[dict] = []
        """Per file: tensor key -> (absolute byte offset of its data, dtype)."""
        self.segments: dict[str, list[tuple[int, dict]]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for i, name in enumerate(self.files):
            fd = os.open(path / name, os.O_RDONLY)
            self.fds.append(fd)
            header, data_start = _safetensors_header(fd)
            self.layouts.append({key: (data_start + entry["data_offsets"][0], entry["dtype"])
                                 for key, entry in header.items() if key != "__metadata__"})
            for entry in json.loads(header["__metadata__"]["index"]):
                self.segments.setdefault(entry["name"], []).extend((i, seg) for seg in _flat_segments(entry))
                self.shapes[entry["name"]] = tuple(entry["shape"])

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def __del__(self) -> None:
        self.close()

    def names(self) -> list[str]:
        return list(self.segments)

    def covers(self, name: str, offset: int, numel: int) -> bool:
        """Whether the files read hold every element of [offset, offset + numel) of `name`."""
        spans = sorted((seg["offset"], seg["offset"] + seg["length"]) for _, seg in self.segments.get(name, []))
        reached = offset
        for start, end in spans:
            if start <= reached < end:
                reached = end
        return reached >= offset + numel

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
            self._read(i, kind, start, out[lo - offset : hi - offset])
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

    def _read(self, file: int, kind: str, start: int, out: torch.Tensor) -> None:
        """Elements [start, start + len(out)) of tensor `kind` (fp32) of file `file`, into `out`:
        directly where it is contiguous fp32 host memory, else through one host buffer."""
        base, dtype = self.layouts[file][kind]
        if dtype != "F32":
            raise CheckpointError(f"{self.path / self.files[file]}: {kind} is {dtype}, not F32; was it written by harness?")
        direct = out.device.type == "cpu" and out.dtype == torch.float32 and out.is_contiguous()
        buffer = out if direct else torch.empty(out.numel(), dtype=torch.float32)
        view = memoryview(buffer.detach().numpy()).cast("B")
        done = 0
        while done < len(view):
            read = os.preadv(self.fds[file], [view[done:]], base + start * 4 + done)
            if read == 0:
                raise CheckpointError(f"{self.path / self.files[file]} ends early: the file is truncated")
            done += read
        if not direct:
            out.copy_(buffer)

    def rng_state(self, rank: int, world_size: int, key: str) -> Optional[torch.Tensor]:
        from safetensors import safe_open

        target = rank_file_name(rank, world_size)
        if target not in self.files:
            return None
        with safe_open(str(self.path / target), framework="pt") as handle:
            return handle.get_tensor(key) if key in handle.keys() else None


def _flat_segments(entry: dict) -> list[dict]:
    """An index entry as flat segments: elements [offset, offset + length) of the parameter, found
    from element `at` of the rank's flat tensors. Format 2 places a piece by runs
    (harness.parallel.base.Run), format 1 by one offset."""
    if "runs" not in entry:
        return [{"offset": entry["offset"], "length": entry["length"], "at": entry["at"]}]
    segments, at = [], entry["at"]
    for offset, length, count, stride in entry["runs"]:
        for i in range(count):
            segments.append({"offset": offset + i * stride, "length": length, "at": at})
            at += length
    return segments


def read_safetensors_range(path: Path, name: str, dtype: torch.dtype, start: int, count: int) -> torch.Tensor:
    """Elements [start, start + count) of one tensor of a safetensors file (flattened), read with
    positioned reads (no memory map)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        header, data_start = _safetensors_header(fd)
        begin, end = header[name]["data_offsets"]
        out = torch.empty(count, dtype=dtype)
        view = memoryview(out.view(torch.uint8).numpy())
        first = data_start + begin + start * out.element_size()
        if first + len(view) > data_start + end:
            raise CheckpointError(f"{path}: {name} holds {end - begin} bytes, fewer than asked for")
        done = 0
        while done < len(view):
            read = os.preadv(fd, [view[done:]], first + done)
            if read == 0:
                raise CheckpointError(f"{path} ends early: the file is truncated")
            done += read
        return out
    finally:
        os.close(fd)


def _safetensors_header(fd: int) -> tuple[dict, int]:
    """A safetensors file's JSON header and the byte offset where its data starts."""
    (length,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    return json.loads(os.pread(fd, length, 8)), 8 + length


def yaml_config(path: Path) -> dict:
    """The config a checkpoint was written with, as a dict."""
    import yaml

    return yaml.safe_load((path / "config.yaml").read_text())


def check_compatible(path: Path, manifest: dict, cfg: Config, global_batch: int) -> None:
    """Refuse resumes that cannot continue the same run."""
    saved_cfg = yaml_config(path)
    now = cfg.to_dict()
    for key in DATA_KEYS:
        before, after = _config_value(saved_cfg, key), _config_value(now, key)
        if before is None and after in ([], "auto", None):
            continue  # a key newer than the checkpoint, at its default: the same data as before
        if before != after:
            raise CheckpointError(
                f"the checkpoint was written with {key}={before!r} and this run has {after!r}: the data position "
                "cannot carry over; restore the setting, set resume.weights_only=true to start a new run "
                "from these weights, or run.fresh=true to move the earlier run aside and start over"
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
    path: Path, backend: ParallelBackend, cfg: Config, info: RankInfo, device: torch.device, global_batch: int,
    lora_base: Optional[dict] = None, weights_only: bool = False,
) -> Optional[TrainerState]:
    """Load `path`'s tensors and RNG streams into the live backend state. Returns the trainer
    state to continue from, or None with `weights_only` (a new run that starts from these
    weights). With LoRA (`lora_base`: the base this run's adapters sit on) the checkpoint must
    hold adapters trained on the same base. The one caller is harness.train.run_state, which
    restores the rest of the run from the returned state."""
    manifest = read_manifest(path)
    if lora_base is not None:
        from harness.model.lora import check_same_base

        check_same_base(manifest.get("lora_base"), lora_base, path.name)
    elif manifest.get("lora_base"):
        raise CheckpointError(f"{path.name} holds LoRA adapters, not a whole model; resume it with its lora: section "
                              f"(lora.r={_config_value(yaml_config(path), 'lora.r')}), or export it merged "
                              "(harness export --merge) and start from that folder")
    if not weights_only:
        check_compatible(path, manifest, cfg, global_batch)
    kinds = ("param",) if weights_only else STATE_KINDS
    with torch.no_grad():
        pieces = backend.state_pieces()
        model_names = {piece.name for piece in pieces}
        reader = _reader_for(path, manifest, pieces, info)
        for piece in pieces:
            saved_shape = reader.shapes.get(piece.name)
            if saved_shape is not None and saved_shape != piece.shape:
                raise CheckpointError(
                    f"{path.name}: {piece.name} has shape {list(saved_shape)} in the checkpoint and "
                    f"{list(piece.shape)} in this model; the model config differs"
                )
            for kind in kinds:
                for offset, view in piece.flat_views(kind):
                    staging = torch.empty(view.numel(), dtype=torch.float32)
                    reader.read_into(piece.name, offset, kind, staging)
                    view.copy_(staging.to(view.device))
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


def _reader_for(path: Path, manifest: dict, pieces: list, info: RankInfo) -> ShardReader:
    """Resuming on the layout that wrote the checkpoint (same world size and backend), a rank's
    pieces are what it wrote itself: it opens its own file only, not every rank's (W ranks opening
    W files each is a metadata storm at scale). Any other layout reads whichever files hold the
    elements it needs."""
    own = rank_file_name(info.rank, info.world_size)
    if manifest.get("world_size") == info.world_size:
        reader = ShardReader(path, manifest, only=[own])
        if reader.files and all(reader.covers(p.name, offset, view.numel())
                                for p in pieces for offset, view in p.flat_views()):
            return reader
    return ShardReader(path, manifest)


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


