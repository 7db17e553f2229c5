"""What a training step makes the host wait for, and what it sends over the wire.

`debug.count_syncs=true` runs every step under `StepCounter`, a dispatch hook that sees each
aten and c10d op as it is issued (in forward, in backward's autograd threads, inside DeepSpeed):

- `host_syncs`: device->host reads, the points where the host waits for the device to drain:
  `_local_scalar_dense` (`.item()`, `bool(t)`, `float(t)`), blocking copies to the host, and
  ops whose output size depends on values (`nonzero`, `masked_select`, `unique`). On a CPU run
  there is no device to wait for; the same reads are counted (harness's own through `host_read`),
  so the count a CPU test asserts is the count a GPU run has.
- `collectives`: per torch.distributed op name (`all_reduce`, `reduce_scatter_tensor`,
  `all_gather_into_tensor`, ...) the number of calls and their bytes, counted as the size of the
  full buffer of each call: the gathered output of an all-gather, the input of a reduce-scatter,
  the tensor of an all-reduce or broadcast. This is the size that bandwidth models use.

Harness reads device values only through `host_read`, so every read it makes is counted here.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# c10d's dispatcher ops under the names users know from torch.distributed.
COLLECTIVE_NAMES = {
    "allreduce_": "all_reduce",
    "allreduce_coalesced_": "all_reduce_coalesced",
    "_allgather_base_": "all_gather_into_tensor",
    "allgather_": "all_gather",
    "allgather_coalesced_": "all_gather_coalesced",
    "allgather_into_tensor_coalesced_": "all_gather_into_tensor_coalesced",
    "_reduce_scatter_base_": "reduce_scatter_tensor",
    "reduce_scatter_": "reduce_scatter",
    "reduce_scatter_tensor_coalesced_": "reduce_scatter_tensor_coalesced",
    "broadcast_": "broadcast",
    "reduce_": "reduce",
    "gather_": "gather",
    "scatter_": "scatter",
    "alltoall_base_": "all_to_all_single",
    "alltoall_": "all_to_all",
    "barrier": "barrier",
    "monitored_barrier_": "monitored_barrier",
    "send": "send",
    "recv_": "recv",
    "recv_any_source_": "recv",
}

_VALUE_DEPENDENT_SHAPES = {"nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive"}

_active: Optional["StepCounter"] = None


def host_read(tensor: torch.Tensor) -> list:
    """The one way harness reads device values: a single transfer, counted by an active StepCounter."""
    if tensor.device.type == "cpu" and _active is not None:
        _active.host_syncs += 1  # a GPU run makes this same read as a device->host copy
    return tensor.detach().to("cpu").tolist()


def _tensors(value: Any) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _nbytes(value: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(value))


def _sorted(entry: dict) -> dict:
    out = {k: v for k, v in entry.items() if k != "groups"}
    if "groups" in entry:
        out["groups"] = {size: dict(entry["groups"][size]) for size in sorted(entry["groups"], key=int)}
    return out


def _group_size(args: tuple) -> Optional[int]:
    """The size of the process group a c10d op runs on (its ProcessGroup argument)."""
    import torch.distributed as dist

    for arg in args:
        if isinstance(arg, torch.ScriptObject) and arg._type().name() == "ProcessGroup":
            return dist.ProcessGroup.unbox(arg).size()
    return None


class StepCounter(TorchDispatchMode):
    """Counts host syncs and collectives while active (`with counter:`); `take()` returns and resets."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.host_syncs = 0
        self.collectives: dict[str, dict[str, int]] = defaultdict(lambda: {"count": 0, "bytes": 0})

    def __enter__(self):
        global _active
        _active = self
        return super().__enter__()

    def __exit__(self, *exc):
        global _active
        _active = None
        return super().__exit__(*exc)

    def take(self) -> dict:
        """This step's counts as metrics fields, and a fresh start for the next step."""
        fields = {"host_syncs": self.host_syncs, "collectives": {k: _sorted(v) for k, v in sorted(self.collectives.items())}}
        self.host_syncs = 0
        self.collectives.clear()
        return fields

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        namespace, _, name = func._schema.name.partition("::")
        if namespace == "c10d" and name in COLLECTIVE_NAMES:
            self._count_collective(COLLECTIVE_NAMES[name], args)
        elif namespace == "aten":
            self._count_sync(name, args, kwargs)
        return func(*args, **kwargs)

    def _count_collective(self, name: str, args: tuple) -> None:
        # The full buffer: the larger of the output and the input (a gather's output, a
        # reduce-scatter's input, the one tensor of an all-reduce).
        nbytes = max(_nbytes(args[0]) if args else 0, _nbytes(args[1]) if len(args) > 1 else 0)
        entry = self.collectives[name]
        entry["count"] += 1
        entry["bytes"] += nbytes
        # Which fabric it crosses depends on who takes part: split by process-group size (HSDP's
        # shard and replica groups, hpZ's intra-node group, the whole world).
        size = _group_size(args)
        if size is not None:
            by_size = entry.setdefault("groups", {}).setdefault(str(size), {"count": 0, "bytes": 0})
            by_size["count"] += 1
            by_size["bytes"] += nbytes

    def _count_sync(self, name: str, args: tuple, kwargs: dict) -> None:
        if name == "_local_scalar_dense":
            # On a CPU run every such read stands for the sync it is on a GPU.
            if args[0].device.type != "cpu" or self.device.type == "cpu":
                self.host_syncs += 1
        elif name == "_to_copy":
            target = kwargs.get("device")
            if args[0].device.type != "cpu" and target is not None and torch.device(target).type == "cpu":
                self.host_syncs += 0 if kwargs.get("non_blocking", False) else 1
        elif name == "copy_":
            destination, source = args[0], args[1]
            non_blocking = kwargs.get("non_blocking", len(args) > 2 and bool(args[2]))
            if destination.device.type == "cpu" and source.device.type != "cpu" and not non_blocking:
                self.host_syncs += 1
        elif name in _VALUE_DEPENDENT_SHAPES and args and args[0].device.type != "cpu":
            self.host_syncs += 1
