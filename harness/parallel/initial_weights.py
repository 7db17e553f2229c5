"""Write a model's initial weights (harness.model.weights) into the fp32 master pieces this rank
owns, whatever the backend: FSDP2 dim-0 shards, ZeRO-3 partitions, ZeRO-1/2 flat slices. The
same `StatePiece` views checkpoints are read through, so a fresh run, a pretrained start and a
resume all land in the masters the same way, and the compute-dtype copies are derived from them
(never the other way round, which would round fp32 weights through bf16).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from harness.errors import HarnessError
from harness.model.weights import InitialWeights, fill_flat_views
from harness.parallel.base import ParallelBackend


def write_initial_weights(backend: ParallelBackend, source: InitialWeights, full_numels: dict[str, int],
                          frozen_only: bool = False) -> None:
    """Fill every master piece of this rank from `source`, one unit at a time, then check across
    ranks that each parameter's elements were written exactly once in total. `frozen_only`: the
    frozen parameters alone (LoRA's base, which a resume reads from the base, not the checkpoint)."""
    by_name: dict[str, list] = {}
    trainable = [] if frozen_only else backend.state_pieces(with_optimizer_state=False)
    for piece in trainable + backend.frozen_pieces():
        by_name.setdefault(piece.name, []).append(piece)
    fill_flat_views({name: [view for piece in pieces for view in piece.flat_views()]
                     for name, pieces in by_name.items()}, source)
    if frozen_only:
        full_numels = {name: numel for name, numel in full_numels.items() if name in _all_names(by_name)}
    _check_coverage(by_name, full_numels, backend)
    backend.after_state_load()


def _all_names(by_name: dict[str, list]) -> set[str]:
    names: list = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(names, sorted(by_name))
    else:
        names = [sorted(by_name)]
    return {name for ranks in names for name in ranks}


def _check_coverage(by_name: dict[str, list], full_numels: dict[str, int], backend: ParallelBackend) -> None:
    names = sorted(full_numels)
    written = torch.zeros(len(names), dtype=torch.float64, device=backend.device)
    for i, name in enumerate(names):  # a copy (an HSDP replica's piece) is not counted: each element counts once
        written[i] = sum(piece.numel for piece in by_name.get(name, []) if piece.counted)
    if dist.is_initialized():
        dist.all_reduce(written)
    wrong = [(name, int(count)) for name, count in zip(names, written.tolist()) if count != full_numels[name]]
    if wrong:
        name, count = wrong[0]
        raise HarnessError(f"{backend.name}: the ranks' master pieces cover {count:,} of the {full_numels[name]:,} "
                           f"elements of {name} ({len(wrong)} parameters affected); report this as a bug")
