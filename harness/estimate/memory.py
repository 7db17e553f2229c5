"""Per-rank memory: what `harness estimate` prints first.

Builds the model on the meta device (no weights, no memory), then predicts, for rank 0 (which
holds the largest shards), the bytes of:

  master       fp32 master weights, as the backend shards them (trainable parameters only: a
               LoRA run's frozen base is stored in the compute dtype and counts as working)
  gradients    what the backend keeps between backward and step
  optimizer    AdamW's two fp32 moments
  working      compute-dtype parameter copies: ZeRO-1/2 keep a full one, ZeRO-3 a partition;
               transient all-gathered units (FSDP2, ZeRO-3) are counted for one unit + prefetch
  activations  tensors saved for backward by one micro-batch, measured by running the forward
               on the meta device with saved-tensor hooks (so it follows the real model code)

for FSDP2 and ZeRO-1/2/3 side by side; the configured backend is marked. Master, gradients and
optimizer follow the backends' partitioning rules exactly (FSDP2: dim-0 chunks; ZeRO-1/2: each
parameter group padded to 2 x world size elements, then split; ZeRO-3: each parameter split into
ceil(numel / world size) pieces). Not counted: the CUDA context, allocator fragmentation,
communication buckets, logits kept by the loss beyond what autograd saves.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import TorchDispatchMode

from harness.config import Config, compute_precision
from harness.estimate.table import size, table
from harness.model.loss import unpacked_sequences
from harness.parallel import layout_name

BACKENDS = ("fsdp2", "zero1", "zero2", "zero3")
COMPONENTS = ("master", "gradients", "optimizer", "working", "activations")
# Where the total lives, and the setup peaks (see format_table's footnote).
PLACEMENT_ROWS = {"device": "on device", "host": "in host mem", "setup_host": "setup host",
                  "setup_host_full_build": "full-build host", "setup_device_full_build": "full-build dev"}
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class ParamInfo:
    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def decays(self) -> bool:
        return len(self.shape) >= 2


def fsdp2_local_numel(shape: tuple[int, ...], world_size: int, rank: int = 0) -> int:
    """torch.chunk semantics of Shard(0): chunks of ceil(dim0 / W) rows, the last ones shorter."""
    if not shape:
        return 1
    rows = -(-shape[0] // world_size)
    start = min(shape[0], rank * rows)
    return (min(shape[0], start + rows) - start) * math.prod(shape[1:])


def zero12_partition_numel(params: list[ParamInfo], world_size: int) -> int:
    """DeepSpeed ZeRO-1/2 flatten each param group, pad it to a multiple of 2 x W, split in W."""
    total = 0
    for group in (True, False):
        n = sum(p.numel for p in params if p.decays == group)
        if n:
            total += -(-n // (2 * world_size)) * 2
    return total


def zero3_partition_numel(params: list[ParamInfo], world_size: int) -> int:
    return sum(-(-p.numel // world_size) for p in params)


class _FlashAttention(torch.autograd.Function):
    """What a fused attention kernel (flash / memory-efficient SDPA, on GPU and CPU) keeps for
    backward: q, k, v, the output and one fp32 log-sum-exp per query, never the seq x seq
    probabilities. On the meta device SDPA would take its math path, which saves them."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = query.new_empty(*query.shape[:-1], value.shape[-1])
        logsumexp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, _, _ = ctx.saved_tensors
        return torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)


@contextlib.contextmanager
def _fused_attention(model: nn.Module, on_output: Callable[[torch.Tensor], None]):
    """SDPA as a fused kernel runs it; `on_output` sees each attention output (selective AC
    keeps it, as it keeps the fused kernels' outputs in SAVED_OPS)."""
    if getattr(model.config, "_attn_implementation", "sdpa") == "eager":
        yield  # eager attention really keeps the probabilities
        return
    original = F.scaled_dot_product_attention

    def fused(query, key, value, *args, **kwargs):
        out = _FlashAttention.apply(query, key, value)
        on_output(out)
        return out

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def activation_bytes(model: nn.Module, batch: torch.Tensor, checkpointing: str = "none",
                     selective: Union[str, int] = "op") -> int:
    """Bytes kept for backward by one forward + loss (parameters excluded), under activation
    checkpointing `checkpointing` (none | full | selective, as harness.model.blocks applies it).

    One plain forward attributes what autograd saves to each block (or to the rest of the model),
    with each block's input and the outputs of the ops selective AC keeps. A checkpointed block
    keeps its input (and, selective "op", those outputs) and briefly holds its whole activation
    set again while it is recomputed in backward: the largest such block is added once."""
    from harness.model import transformer_blocks
    from harness.model.blocks import SAVED_OPS, checkpointed_indices

    param_ids = {id(p) for p in model.parameters()}
    blocks = transformer_blocks(model)
    saved, inputs, kept = [0] * len(blocks), [0] * len(blocks), [0] * len(blocks)
    outside = [0]
    current: list[Optional[int]] = [None]

    def nbytes(tensor: torch.Tensor) -> int:
        return tensor.numel() * tensor.element_size()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor._base if tensor._base is not None else tensor
        if id(tensor) not in param_ids and id(base) not in param_ids:
            if current[0] is None:
                outside[0] += nbytes(tensor)
            else:
                saved[current[0]] += nbytes(tensor)
        return tensor

    class KeptOutputs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if current[0] is not None and func in SAVED_OPS:
                kept[current[0]] += sum(nbytes(t) for t in (out if isinstance(out, tuple) else (out,))
                                        if isinstance(t, torch.Tensor))
            return out

    def attention_output(out: torch.Tensor) -> None:
        if current[0] is not None:
            kept[current[0]] += nbytes(out)

    def enter(index: int):
        def hook(module, args, kwargs):
            current[0] = index
            hidden = args[0] if args else kwargs.get("hidden_states")
            inputs[index] = nbytes(hidden)
        return hook

    def leave(module, args, output):
        current[0] = None

    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(enter(i), with_kwargs=True))
        handles.append(block.register_forward_hook(leave))
    try:
        with saved_tensors_hooks(pack, lambda tensor: tensor), unpacked_sequences(), KeptOutputs(), \
                _fused_attention(model, attention_output):
            logits = model(input_ids=batch[:, :-1]).logits
            F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
    finally:
        for handle in handles:
            handle.remove()

    chosen = checkpointed_indices(len(blocks), checkpointing, selective)
    keep_outputs = checkpointing == "selective" and selective == "op"
    total = outside[0]
    for i in range(len(blocks)):
        total += (inputs[i] + (kept[i] if keep_outputs else 0)) if i in chosen else saved[i]
    return total + max((saved[i] for i in chosen), default=0)


def _meta_model(cfg: Config, compute_dtype: torch.dtype) -> nn.Module:
    """The model as training builds it (harness.model.build.model_spec: its checks too, such as
    train.seq_len against the model's positions), on the meta device."""
    from transformers import AutoModelForCausalLM

    from harness.data import load_tokenizer
    from harness.model.build import model_spec, special_token_ids

    if cfg.model.pretrained:
        spec = model_spec(cfg.model, 0, cfg.train.seq_len, locate_weights=False)
    else:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        spec = model_spec(cfg.model, len(tokenizer), cfg.train.seq_len, special_token_ids(tokenizer))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(spec.hf_config, dtype=compute_dtype)
        if cfg.lora.enabled:
            from harness.model.lora import add_adapters

            add_adapters(model, cfg.lora)
            model.to(compute_dtype)  # peft makes its layers fp32; training gathers them in the compute dtype
    return model.train()


def meta_model(cfg: Config) -> nn.Module:
    """The configured model on the meta device, in its compute dtype."""
    return _meta_model(cfg, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        compute_precision(cfg.precision)])


def estimate(cfg: Config, world_size: int, model: Optional[nn.Module] = None) -> dict:
    """{"model": ..., "backends": {backend: {component: bytes, "total": bytes}}, "configured": name}."""
    from harness.model import transformer_blocks

    compute = compute_precision(cfg.precision)
    c = _BYTES[compute]
    model = model if model is not None else meta_model(cfg)
    params = [ParamInfo(name, tuple(p.shape)) for name, p in model.named_parameters()]
    n_total = sum(p.numel for p in params)
    # Only trainable parameters have fp32 masters, gradients and AdamW state; frozen ones (LoRA's
    # base) are stored, sharded or partitioned, in the compute dtype.
    train = [ParamInfo(name, tuple(p.shape)) for name, p in model.named_parameters() if p.requires_grad]
    frozen = [p for p in params if p not in train]
    n_train = sum(p.numel for p in train)
    batch = torch.zeros(cfg.train.micro_batch_size, cfg.train.seq_len + 1, dtype=torch.long, device="meta")
    activations = activation_bytes(model, batch, cfg.model.checkpointing_mode(), cfg.model.selective_ac)

    block_numels = [sum(p.numel() for p in b.parameters()) for b in transformer_blocks(model)]
    largest_block = max(block_numels, default=0)
    root_numel = n_total - sum(block_numels)

    # HSDP shards over a group of world_size / replicate ranks; hpZ keeps a secondary copy of
    # the compute-dtype parameters sharded over the same group.
    shard_group = world_size // cfg.parallel.replicate
    fsdp_local = sum(fsdp2_local_numel(p.shape, shard_group) for p in train)
    fsdp_frozen = c * sum(fsdp2_local_numel(p.shape, shard_group) for p in frozen)
    hpz_secondary = c * zero3_partition_numel(params, shard_group) if cfg.parallel.replicate > 1 else 0
    z12 = zero12_partition_numel(train, world_size)
    z3 = zero3_partition_numel(train, world_size)
    z3_frozen = c * zero3_partition_numel(frozen, world_size)
    # Gathered for compute: the root unit stays gathered, one block plus one prefetched block.
    gathered = c * (root_numel + 2 * largest_block)
    # fp32 gradient accumulation everywhere (as FSDP2 does); ZeRO-1 keeps the compute-dtype
    # gradients of the whole model beside the fp32 ones when compute is bf16/fp16.
    lp_grads = c * n_train if compute != "fp32" else 0
    states = {
        "fsdp2": dict(master=4 * fsdp_local, gradients=4 * fsdp_local, optimizer=8 * fsdp_local,
                      working=fsdp_frozen + (gathered if world_size > 1 or compute != "fp32" else 0)),
        "zero1": dict(master=4 * z12, gradients=4 * n_train + lp_grads, optimizer=8 * z12, working=c * n_total),
        "zero2": dict(master=4 * z12, gradients=4 * z12, optimizer=8 * z12, working=c * n_total),
        "zero3": dict(master=4 * z3, gradients=4 * z3, optimizer=8 * z3,
                      working=c * z3 + z3_frozen + hpz_secondary + gathered),
    }
    # What parallel.offload moves to host memory: the fp32 masters, their fp32 gradients and AdamW
    # state; with params, ZeRO-3's compute-dtype partition too. FSDP2 offloads its sharded
    # parameters, gradients and optimizer state together whatever the setting; ZeRO-1/2 cannot
    # offload parameters, and ZeRO-1 keeps its compute-dtype gradients on the device. Without
    # sharded init DeepSpeed moves the whole compute-dtype module to the device at once.
    plans = {
        "fsdp2": dict(none=0, optimizer=16 * fsdp_local, params=16 * fsdp_local, full_build_device=0),
        "zero1": dict(none=0, optimizer=12 * z12 + 4 * n_train, params=12 * z12 + 4 * n_train, full_build_device=c * n_total),
        "zero2": dict(none=0, optimizer=16 * z12, params=16 * z12, full_build_device=c * n_total),
        "zero3": dict(none=0, optimizer=16 * z3, params=16 * z3 + c * z3 + z3_frozen, full_build_device=c * n_total),
    }
    backends = {}
    for name, numbers in states.items():
        numbers["activations"] = activations
        numbers["total"] = sum(numbers[k] for k in COMPONENTS)
        host = plans[name][cfg.parallel.offload]
        numbers["host"] = host
        numbers["device"] = numbers["total"] - host
        # Setup: one init unit (a block, or embeddings + head) in fp32 beside this rank's
        # host-resident state; without sharded init every rank first holds the whole fp32 model,
        # and DeepSpeed without zero.Init moves the whole compute-dtype module to the device.
        numbers["setup_host"] = host + 4 * max(largest_block, root_numel)
        numbers["setup_host_full_build"] = host + 4 * n_total
        numbers["setup_device_full_build"] = max(numbers["device"], plans[name]["full_build_device"])
        backends[name] = numbers
    configured = layout_name(cfg.parallel)
    return {
        "model": type(model).__name__,
        "parameters": n_total,
        "trainable": n_train,
        "precision": compute,
        "world_size": world_size,
        "replicate": cfg.parallel.replicate,
        "micro_batch": [cfg.train.micro_batch_size, cfg.train.seq_len],
        "backends": backends,
        "configured": configured,
        "offload": cfg.parallel.offload,
    }


LEGEND = (
    ("master", "fp32 master weights: this rank's shard"),
    ("gradients", "what the backend keeps between backward and the optimizer step"),
    ("optimizer", "AdamW's two fp32 moments"),
    ("working", "compute-dtype parameter copies: ZeRO-1/2 a full one, ZeRO-3 a partition, plus the gathered "
                "layers in flight (FSDP2, ZeRO-3); with LoRA also the frozen base's shard"),
    ("activations", "what one micro-batch saves for backward"),
    ("on device", "the total's part on the GPU; in host mem: its part offloaded (parallel.offload)"),
    ("setup host", "host memory per rank before step 1, with sharded init (one block in flight)"),
    ("full-build host", "the same if every rank built the whole fp32 model first (no sharded init)"),
    ("full-build dev", "device bytes when DeepSpeed moves the whole module to the GPU (no zero.Init)"),
    ("host per node", "the larger of in host mem and setup host, times the node's ranks"),
)


def format_table(result: dict, ranks_per_node: int = 1, device_gib: Optional[float] = None,
                 gpu_name: str = "GPU", host_gib: Optional[float] = None) -> str:
    """The memory table, its legend, and whether each backend fits the GPU."""
    mb, seq = result["micro_batch"]
    lines = [
        f"{result['model']}, {result['parameters']:,} parameters"
        + (f" ({result['trainable']:,} trainable: LoRA, the base frozen in {result['precision']})"
           if result.get("trainable", result["parameters"]) < result["parameters"] else "")
        + f"; {result['precision']} compute; "
        f"world size {result['world_size']}"
        + (f" ({result['replicate']} replicas; fsdp2 is HSDP, zero3 is hpZ)" if result.get("replicate", 1) > 1 else "")
        + f"; micro-batch {mb} x {seq} tokens; offload: {result['offload']}",
        "memory of rank 0 (it holds the largest shards); * = the configured backend",
        "",
    ]
    backends = result["backends"]
    header = [""] + [b + ("*" if b == result["configured"] else "") for b in BACKENDS]
    rows = [[PLACEMENT_ROWS.get(c, c)] + [size(backends[b][c]) for b in BACKENDS]
            for c in (*COMPONENTS, "total", *PLACEMENT_ROWS)]
    rows.append([f"host per node ({ranks_per_node})"] + [size(host_per_node(backends[b], ranks_per_node)) for b in BACKENDS])
    limit_gib = result.get("device_gb") or device_gib
    if limit_gib:
        limit = limit_gib * 2**30
        for key, label in (("device", "fits"), ("setup_device_full_build", "fits, full build")):
            rows.append([f"{label} ({limit_gib:,.1f} GiB)"] + ["yes" if backends[b][key] <= limit else "NO" for b in BACKENDS])
    if host_gib:
        rows.append([f"fits host ({host_gib:,.0f} GiB)"] + [
            "yes" if host_per_node(backends[b], ranks_per_node) <= host_gib * 2**30 else "NO" for b in BACKENDS])
    lines += table(header, rows)
    lines.append("")
    width = max(len(name) for name, _ in LEGEND)
    lines += [f"  {name:<{width}}  {text}" for name, text in LEGEND]
    if limit_gib:
        lines.append(f"  {'fits':<{width}}  on device <= {limit_gib:,.1f} GiB per {gpu_name} (activations of one "
                     "micro-batch included; the CUDA context and fragmentation are not)")
    return "\n".join(lines)


def host_per_node(numbers: dict, ranks_per_node: int) -> float:
    return ranks_per_node * max(numbers["host"], numbers.get("setup_host", 0))
