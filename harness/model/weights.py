"""Where a model's initial weights come from, read in pieces: `read(name, offset, numel)` gives
elements [offset, offset + numel) of a parameter's flattened fp32 value. A sharded rank asks only
for the elements it owns, so it never holds more than its shards plus one *unit* in flight.

- `SeededInit`: the model's own init (`_init_weights`), run on a full fp32 copy of one unit at a
  time (a transformer block, or everything outside the blocks) with the RNG seeded from the run's
  seed and the unit's name. Why this and not an offset-based RNG or rank 0 + broadcast: the
  values are a pure function of (seed, model), so every world size and backend starts from the same
  bits; the init is the model's own, distributions and special cases included (GPT-2's scaled
  residual projections, zeroed padding rows); and it needs no collective. The price is that every
  rank computes each unit in full: for a 70B model that is ~1 GB of fp32 per block at a time, and
  init arithmetic that is cheap next to one training step.
- `PretrainedWeights`: a local Hugging Face folder of safetensors (one file or a sharded index),
  read with positioned reads (not memory mapped: see SafetensorsFile); a read touches only the
  rows that hold the requested elements, and bf16/fp16 values are upcast once, to fp32.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import struct
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional, Protocol

import torch
from torch import nn

from harness.config import ModelConfig
from harness.errors import HarnessError, first_line
from harness.model.blocks import transformer_blocks
from harness.model.build import ModelSpec, build_skeleton, materialize_on, model_spec


class UnitReader(Protocol):
    def read(self, name: str, offset: int, numel: int) -> torch.Tensor:
        """Elements [offset, offset + numel) of parameter `name`, flattened, fp32, on the CPU."""


class InitialWeights(Protocol):
    def units(self) -> list[list[str]]:
        """Parameter names (as in named_parameters) in groups that are best read together."""

    def open(self, unit: list[str]) -> contextlib.AbstractContextManager[UnitReader]:
        """Make one unit readable; what it holds is released on exit."""


def fill_flat_views(targets: dict[str, list[tuple[int, torch.Tensor]]], source: InitialWeights) -> None:
    """Write `source` into 1-D views: parameter name -> [(offset in the flattened parameter,
    view)], one unit at a time, each view from exactly the elements it stands for. A parameter
    that no unit of `source` names would keep uninitialised memory: refused."""
    units = source.units()
    named = {name for unit in units for name in unit}
    unnamed = sorted(name for name, views in targets.items() if views and name not in named)
    if unnamed:
        raise HarnessError(f"the initial weights give no value for {unnamed[0]} ({len(unnamed)} parameters); "
                           "report this as a bug")
    with torch.no_grad():
        for unit in units:
            owned = [name for name in unit if targets.get(name)]
            if not owned:
                continue
            with source.open(unit) as reader:
                for name in owned:
                    for offset, view in targets[name]:
                        if view.numel():
                            view.copy_(reader.read(name, offset, view.numel()).to(view.device))


def initial_weights(spec: ModelSpec, seed: int) -> InitialWeights:
    if spec.pretrained_dir is not None:
        return PretrainedWeights(spec)
    return SeededInit(lambda: build_skeleton(spec), seed)


# --------------------------------------------------------------------------------------------
# Seeded init, one unit at a time


class _FullTensors:
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def read(self, name: str, offset: int, numel: int) -> torch.Tensor:
        return self.tensors[name].detach().reshape(-1).narrow(0, offset, numel)


def _unit_seed(seed: int, unit_name: str) -> int:
    return int(hashlib.sha256(f"{seed}/{unit_name}".encode()).hexdigest()[:15], 16)


class SeededInit:
    """The model's own init of each unit, seeded by (seed, unit name): a transformers model's
    `_init_weights`, or, for any other nn.Module, each submodule's `reset_parameters()` (torch's
    own layers all have one)."""

    REST = "<outside the blocks>"

    def __init__(self, skeleton: Callable[[], nn.Module], seed: int) -> None:
        self.seed = seed
        self.skeleton = skeleton()  # its own meta copy: a backend may rewrite the other
        module_names = {id(m): name for name, m in self.skeleton.named_modules()}
        self.blocks = {module_names[id(b)]: b for b in transformer_blocks(self.skeleton)}
        self._units: dict[str, list[str]] = {}
        in_blocks = set()
        for prefix, block in self.blocks.items():
            names = [f"{prefix}.{n}" for n, _ in block.named_parameters()]
            self._units[prefix] = names
            in_blocks.update(names)
        self._units[self.REST] = [n for n, _ in self.skeleton.named_parameters() if n not in in_blocks]
        self._unit_of = {tuple(names): unit for unit, names in self._units.items()}

    def units(self) -> list[list[str]]:
        return [names for names in self._units.values() if names]

    @contextlib.contextmanager
    def open(self, unit: list[str]) -> Iterator[UnitReader]:
        unit_name = self._unit_of[tuple(unit)]
        if unit_name == self.REST:
            # A copy of the whole model in which every block is a placeholder: only the
            # embeddings, final norm and head get storage.
            placeholders = {id(block): nn.Identity() for block in self.blocks.values()}
            copy_ = copy.deepcopy(self.skeleton, memo=placeholders)
            prefix, owner = "", copy_ if self._init_owner("") is not None else None
        else:
            copy_ = copy.deepcopy(self.blocks[unit_name])
            prefix, owner = unit_name + ".", self._init_owner(unit_name)
        materialize_on(copy_, torch.device("cpu"))
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(_unit_seed(self.seed, unit_name))
            _init_post_order(copy_, owner)
        yield _FullTensors({prefix + n: p for n, p in copy_.named_parameters()})

    def _init_owner(self, block_name: str) -> Optional[nn.Module]:
        """The PreTrainedModel whose _init_weights applies inside a block: its nearest ancestor
        (None for a model that is not from transformers)."""
        from transformers import PreTrainedModel

        if not isinstance(self.skeleton, PreTrainedModel):
            return None
        owner = self.skeleton
        parts = block_name.split(".")
        for i in range(1, len(parts)):
            module = self.skeleton.get_submodule(".".join(parts[:i]))
            if isinstance(module, PreTrainedModel):
                owner = module
        return owner


def _init_post_order(module: nn.Module, owner: Optional[nn.Module]) -> None:
    """Children first, then the module, each with its nearest PreTrainedModel's _init_weights:
    the order transformers' own `initialize_weights` uses (a parent may re-initialise a child's
    weight, as GPT-2 does for its residual projections). Without a PreTrainedModel (`owner` None),
    each module's own `reset_parameters()`, in the same order."""
    from transformers import PreTrainedModel

    if owner is None and not isinstance(module, PreTrainedModel):
        for child in module.children():
            _init_post_order(child, None)
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
        return
    for child in module.children():
        _init_post_order(child, child if isinstance(child, PreTrainedModel) else owner)
    for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if hasattr(tensor, "_is_hf_initialized"):
            del tensor._is_hf_initialized  # the skeleton's build may have marked them done
    owner._init_weights(module)


# --------------------------------------------------------------------------------------------
# A pretrained Hugging Face folder


class PretrainedWeights:
    """Parameters read from a folder's safetensors, only the rows asked for."""

    def __init__(self, spec: ModelSpec) -> None:
        self.folder = Path(spec.pretrained_dir)
        skeleton = build_skeleton(spec)
        self.shapes = {n: tuple(p.shape) for n, p in skeleton.named_parameters()}
        # A tied parameter may be saved under any of its names (safetensors keeps one of them).
        aliases: dict[int, list[str]] = {}
        for n, p in skeleton.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(n)
        names_of = {names[0]: names for names in aliases.values()}
        prefix = getattr(skeleton, "base_model_prefix", "")
        self._handles: dict[str, SafetensorsFile] = {}
        self.file_of = self._weight_map()
        self.key_of = {name: self._key_for(names_of.get(name, [name]), prefix) for name in self.shapes}

    def units(self) -> list[list[str]]:
        return [[name] for name in self.shapes]

    @contextlib.contextmanager
    def open(self, unit: list[str]) -> Iterator[UnitReader]:
        yield self

    def read(self, name: str, offset: int, numel: int) -> torch.Tensor:
        key = self.key_of[name]
        file = self._handle(self.file_of[key])
        shape = file.shape(key)
        if shape != self.shapes[name]:
            raise HarnessError(f"model.pretrained {str(self.folder)!r}: {key} has shape {list(shape)}, the model "
                               f"expects {list(self.shapes[name])}; the folder's config.json does not match its weights")
        row = math.prod(shape[1:]) if shape else 1
        first, last = offset // row, -(-(offset + numel) // row)
        rows = file.read_elements(key, first * row, (last - first) * row)
        return rows.narrow(0, offset - first * row, numel).to(torch.float32)

    def _handle(self, file: str) -> "SafetensorsFile":
        if file not in self._handles:
            self._handles[file] = SafetensorsFile(self.folder / file, self.folder)
        return self._handles[file]

    def _weight_map(self) -> dict[str, str]:
        """tensor name -> file, from model.safetensors.index.json or the single file."""
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError):
                raise HarnessError(f"model.pretrained {str(self.folder)!r}: model.safetensors.index.json has no "
                                   "weight_map; re-download or re-save the folder") from None
            missing = sorted({f for f in weight_map.values() if not (self.folder / f).is_file()})
            if missing:
                raise HarnessError(f"model.pretrained {str(self.folder)!r}: shard {missing[0]} named in "
                                   f"model.safetensors.index.json is missing ({len(missing)} of "
                                   f"{len(set(weight_map.values()))} shards); re-download the folder")
            return weight_map
        single = self.folder / "model.safetensors"
        if single.is_file():
            return {key: single.name for key in self._handle(single.name).keys()}
        if any(self.folder.glob("*.bin")) or any(self.folder.glob("*.pth")):
            raise HarnessError(f"model.pretrained {str(self.folder)!r} holds pickled weights, which cannot be read "
                               "in slices; convert it once with save_pretrained(..., safe_serialization=True)")
        raise HarnessError(f"model.pretrained {str(self.folder)!r} has no model.safetensors or "
                           "model.safetensors.index.json; point it at a Hugging Face model folder")

    def _key_for(self, names: list[str], base_prefix: str) -> str:
        # Checkpoints of a base model omit the task model's prefix ("model."), older ones add it.
        candidates = []
        for name in names:
            candidates.append(name)
            if base_prefix and name.startswith(base_prefix + "."):
                candidates.append(name[len(base_prefix) + 1:])
            elif base_prefix:
                candidates.append(f"{base_prefix}.{name}")
        for key in candidates:
            if key in self.file_of:
                return key
        raise HarnessError(f"model.pretrained {str(self.folder)!r} has no tensor {names[0]} (of {len(self.file_of)} in "
                           "the folder): shards missing, or weights of another architecture")


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class SafetensorsFile:
    """Reads element ranges of the tensors in one .safetensors file with positioned reads.

    Not memory mapped on purpose: every page a rank touches through a mapping counts in its
    resident set (and in a Slurm job's cgroup) for as long as the mapping lives, which doubled
    a rank's setup peak on a 300M model. A read lands the bytes once, in the tensor that keeps
    them. Format: u64 little-endian header size, a JSON header (dtype, shape, data_offsets per
    tensor), then the data, little-endian.
    """

    def __init__(self, path: Path, folder: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            self.data_start = 8 + size
            self.entries = {k: v for k, v in header.items() if k != "__metadata__"}
            self._fd = os.open(path, os.O_RDONLY)
        except (OSError, ValueError, struct.error) as exc:
            raise HarnessError(f"model.pretrained {str(folder)!r}: cannot read {path.name} ({first_line(exc)}); "
                               "re-download or re-save the folder") from None
        self.folder = folder

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def read_elements(self, key: str, start: int, count: int) -> torch.Tensor:
        entry = self.entries[key]
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise HarnessError(f"model.pretrained {str(self.folder)!r}: {key} is stored as {entry['dtype']}, not a "
                               "floating-point weight harness can train; convert the folder to fp32/bf16/fp16")
        itemsize = torch.empty((), dtype=dtype).element_size()
        begin = self.data_start + entry["data_offsets"][0] + start * itemsize
        buffer = bytearray(count * itemsize)
        view, done = memoryview(buffer), 0
        while done < len(buffer):  # pread may return less than asked (large reads, signals)
            got = os.preadv(self._fd, [view[done:]], begin + done)
            if got == 0:
                raise HarnessError(f"model.pretrained {str(self.folder)!r}: {self.path.name} ends inside {key}; "
                                   "the file is truncated, re-download it")
            done += got
        if sys.byteorder != "little":
            raise HarnessError("reading safetensors needs a little-endian machine")
        return torch.frombuffer(buffer, dtype=dtype) if count else torch.empty(0, dtype=dtype)

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)


def build_model(cfg: ModelConfig, vocab_size: int, seed: int) -> nn.Module:
    """The whole model, fp32 on the CPU, with exactly the initial weights a sharded run starts
    from (the seeded per-block init, or the pretrained folder's values)."""
    spec = model_spec(cfg, vocab_size)
    model = build_skeleton(spec)
    materialize_on(model, torch.device("cpu"))
    fill_flat_views({name: [(0, p.detach().view(-1))] for name, p in model.named_parameters()},
                    initial_weights(spec, seed))
    return model
