"""The transformer blocks: how they are found (`transformer_blocks`, the units every backend shards),
and the per-block transforms that trade memory and compile time for speed: activation checkpointing
and torch.compile, applied to each transformer block as torchtitan does (AC, then compile, then
sharding). Both keep the module tree and parameter names as they are (checkpoints, diagnostics and
sharding address parameters by name), so they wrap each block's `forward`, not the block itself.
Nothing here knows about ranks: the sharding hooks around a block stay outside what is wrapped.
"""

from __future__ import annotations

import functools
from typing import Callable, Union

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from harness.errors import HarnessError

# Op-level selective AC (torchtitan's "op" option): keep the outputs of the expensive ops
# (matmuls, attention) for backward and recompute the cheap ones (norms, activations, adds).
# torchtitan also recomputes every second matmul to save more; keeping all of them is the
# fastest setting that still drops the pointwise activations, which dominate memory.
SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _save_expensive_ops(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed(forward: Callable, context_fn: Callable | None) -> Callable:
    extra = {"context_fn": context_fn} if context_fn is not None else {}

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation: nothing to save, nothing to recompute
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)

    return run


def apply_activation_checkpointing(model: nn.Module, mode: str, selective: Union[str, int]) -> int:
    """Recompute block activations in backward. mode: none | full (every block, everything
    recomputed) | selective (`selective`="op": every block, matmul and attention outputs kept;
    an integer k: every k-th block fully). Returns how many blocks are checkpointed."""
    blocks = transformer_blocks(model)
    chosen = checkpointed_indices(len(blocks), mode, selective)
    op_level = mode == "selective" and selective == "op"
    context_fn = functools.partial(create_selective_checkpoint_contexts, _save_expensive_ops) if op_level else None
    for i in chosen:
        blocks[i].forward = _checkpointed(blocks[i].forward, context_fn)
    return len(chosen)


def checkpointed_indices(n_blocks: int, mode: str, selective: Union[str, int]) -> set[int]:
    """Which blocks activation checkpointing wraps: all (full, selective "op"), every k-th
    (selective k: blocks k-1, 2k-1, ...), or none."""
    if mode == "none":
        return set()
    if mode == "selective" and selective != "op":
        return {i for i in range(n_blocks) if i % int(selective) == int(selective) - 1}
    return set(range(n_blocks))


def compile_blocks(model: nn.Module) -> int:
    """torch.compile each transformer block's forward (activation checkpointing included; the
    blocks are alike, so they share compiled code). The module's hooks, where FSDP2 and ZeRO-3
    gather and free parameters, stay outside the compiled region, in eager mode. Returns the count."""
    blocks = transformer_blocks(model)
    for block in blocks:
        block.forward = torch.compile(block.forward)
    return len(blocks)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated layers, found by the class names transformers marks as not-to-be-split (also
    once FSDP2 has wrapped them: fully_shard swaps in a subclass, FSDP<name>)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if any(cls.__name__ in names for cls in type(m).__mro__)]
    if not blocks:
        raise HarnessError(f"cannot find the transformer blocks of {type(model).__name__} (no _no_split_modules)")
    return blocks
