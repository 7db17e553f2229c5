"""Any Hugging Face causal LM, described the way a user would: AutoConfig / AutoModelForCausalLM.

A model is built in two stages so that no rank ever holds more than it must:
- a *skeleton*: the module tree with its parameters on the meta device (no memory) and its
  buffers real (rotary tables and the like are computed in __init__ and never saved);
- its *initial weights* (harness.model.weights), written into whatever pieces of each parameter a
  rank owns once a backend has sharded the skeleton.

`harness.model.weights.build_model` does both for a whole model on the CPU: the single-process
reference, benchmarks and `harness estimate`. Nothing here knows about ranks or sharding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional, Union

import torch
from torch import nn

from harness import assets
from harness.config import ModelConfig
from harness.errors import HarnessError, first_line
from harness.model.blocks import apply_activation_checkpointing


@dataclass(frozen=True)
class ModelSpec:
    """What to build: a transformers config, and the local folder its weights come from (if any)."""

    hf_config: Any
    pretrained_dir: Optional[str]
    activation_checkpointing: str = "none"
    """none | full | selective (harness.model.blocks)."""
    selective_ac: Union[str, int] = "op"
    notes: tuple[str, ...] = ()
    """One-line remarks for the user (an attention kernel the model lacks, replaced)."""


def model_spec(cfg: ModelConfig, vocab_size: int, seq_len: Optional[int] = None,
               special_tokens: Optional[dict[str, Optional[int]]] = None, locate_weights: bool = True) -> ModelSpec:
    """Resolve model.pretrained / model.config into a transformers config (no weights are read),
    checked against the tokenizer's vocabulary and the training sequence length. From scratch,
    the tokenizer's bos/eos/pad ids (`special_tokens`) become the model's, unless model.config
    sets them: an exported model then names its own tokenizer's tokens. locate_weights=False (an
    estimate): the architecture only, nothing fetched beyond config.json."""
    from transformers import AutoConfig

    if cfg.pretrained:
        path = assets.resolve_model(cfg.pretrained)
        if assets.looks_like_a_path(path) and not Path(path).expanduser().is_dir():
            raise HarnessError(f"model.pretrained {cfg.pretrained!r} does not exist; point it at a local Hugging Face "
                               "folder (config.json and safetensors), a hub id, or bundled:smollm2-135m")
        local = Path(path).expanduser().is_dir()
        try:
            hf_config = AutoConfig.from_pretrained(path, local_files_only=not local and not assets.hub_reachable(),
                                                   **cfg.config)
        except (OSError, ValueError) as exc:
            if not local and not assets.hub_reachable():
                raise HarnessError(assets.unreachable_hub_fix(cfg.pretrained)) from None
            raise HarnessError(
                f"model.pretrained {cfg.pretrained!r} could not be loaded ({first_line(exc)}); "
                "use a local Hugging Face folder or bundled:smollm2-135m"
            ) from None
        pretrained_dir = assets.local_model_dir(path) if locate_weights else None
    else:
        kwargs = dict(cfg.config)
        model_type = kwargs.pop("model_type")
        kwargs.setdefault("vocab_size", padded_vocab(vocab_size, cfg.vocab_multiple_of))
        for key, token_id in (special_tokens or {}).items():
            kwargs.setdefault(key, token_id)
        try:
            hf_config = AutoConfig.for_model(model_type, **kwargs)
        except ValueError as exc:
            raise HarnessError(f"model.config.model_type={model_type!r} is not a transformers model: {exc}") from None
        pretrained_dir = None
    attention, notes = attention_kernel(cfg.attn_implementation, hf_config)
    hf_config._attn_implementation = attention
    hf_config.use_cache = False
    positions = getattr(hf_config, "max_position_embeddings", None)
    if seq_len is not None and isinstance(positions, int) and seq_len > positions:
        fix = ("raise model.config.max_position_embeddings" if not cfg.pretrained
               else "extend the model's context first (model.config.rope_scaling)")
        raise HarnessError(f"train.seq_len={seq_len} is beyond the model's {positions} positions "
                           f"(max_position_embeddings); lower train.seq_len, or {fix}")
    rows = getattr(hf_config, "vocab_size", None)
    if rows is not None and rows < vocab_size:
        raise HarnessError(
            f"the tokenizer has {vocab_size} tokens but the model's embedding has {rows} rows; "
            "set model.config.vocab_size or use the model's own tokenizer (data.tokenizer)"
        )
    return ModelSpec(hf_config, pretrained_dir, cfg.checkpointing_mode(), cfg.selective_ac, notes)


def special_token_ids(tokenizer: Any) -> dict[str, Optional[int]]:
    """A tokenizer's bos/eos/pad ids, as a model config names them."""
    return {f"{kind}_token_id": getattr(tokenizer, f"{kind}_token_id", None) for kind in ("bos", "eos", "pad")}


def check_tokenizer_fits(hf_config: Any, tokenizer: Any, tokenizer_ref: str, model_ref: str) -> None:
    """A pretrained model trains on its own token ids: refuse a tokenizer whose vocabulary does not
    fit the model's embedding, or that lacks the model's special tokens (its bos/eos/pad ids are
    not special tokens of the tokenizer: another tokenizer's ids)."""
    rows = getattr(hf_config, "vocab_size", None)
    own = "leave data.tokenizer unset to use the model's own tokenizer"
    if rows is not None and len(tokenizer) > rows:
        raise HarnessError(f"data.tokenizer {tokenizer_ref!r} has {len(tokenizer):,} tokens but model.pretrained "
                           f"{model_ref!r} embeds {rows:,}: they do not belong together; {own}")
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ids = getattr(hf_config, field, None)
        for token_id in ids if isinstance(ids, (list, tuple)) else [ids]:
            if isinstance(token_id, int) and token_id not in special:
                raise HarnessError(
                    f"model.pretrained {model_ref!r} has {field}={token_id}, which is not a special token of "
                    f"data.tokenizer {tokenizer_ref!r} ({len(tokenizer):,} tokens): the tokenizer is not the model's; {own}")


def generation_eos(pretrained: Optional[str]) -> Any:
    """The end-of-generation token ids of a pretrained model's generation_config.json (None: none)."""
    if not pretrained:
        return None
    import json

    folder = Path(assets.local_model_dir(assets.resolve_model(pretrained)))
    path = folder / "generation_config.json"
    return json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None


def attention_kernel(requested: str, hf_config: Any) -> tuple[str, tuple[str, ...]]:
    """The attention kernel to build with. The default, sdpa, falls back to eager (with a note)
    on architectures transformers has no sdpa path for (gemma2, ...); a flash-attn kernel that is
    not installed is a one-line error naming the key."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(hf_config), None)
    name = cls.__name__ if cls is not None else type(hf_config).__name__
    if requested == "sdpa" and cls is not None and getattr(cls, "_supports_sdpa", True) is False:
        return "eager", (f"{name} has no sdpa attention in transformers; using model.attn_implementation=eager",)
    if requested.startswith("flash_attention"):
        from transformers.utils import import_utils

        check = getattr(import_utils, f"is_{requested.replace('attention', 'attn')}_available", None)
        if check is not None and not check():
            raise HarnessError(f"model.attn_implementation={requested} needs the flash-attn package and a GPU it "
                               "supports, which this machine lacks; use sdpa (the default) or eager")
    return requested, ()


def padded_vocab(tokens: int, multiple: int) -> int:
    """Embedding rows for a from-scratch model: the tokenizer's size rounded up to `multiple`.
    cuBLAS picks its fast tensor-core kernels only for dimensions aligned to 8 elements or more;
    GPT-2's 50,257 rows ran the output matmuls in align-1 kernels at a fraction of the speed."""
    return -(-tokens // multiple) * multiple


def on_meta_device() -> ContextManager:
    """Parameters created inside go to the meta device; buffers stay real (they are small, and
    models compute them in __init__ rather than load them)."""
    from accelerate import init_empty_weights

    return init_empty_weights(include_buffers=False)


def build_skeleton(spec: ModelSpec, context: Optional[ContextManager] = None) -> nn.Module:
    """The model's module tree with no initial weights written. Parameters are created inside
    `context` (default: on the meta device); a sharding backend may pass its own (ZeRO-3 creates
    them partitioned). Initialisation code is skipped: harness.model.weights writes the values."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with context if context is not None else on_meta_device(), no_init_weights():
        try:
            model = AutoModelForCausalLM.from_config(spec.hf_config, dtype=torch.float32)
        except (ValueError, ImportError) as exc:
            if "attention" not in str(exc).lower() and "attn" not in str(exc).lower():
                raise
            raise HarnessError(f"model.attn_implementation={spec.hf_config._attn_implementation} cannot be used "
                               f"here ({first_line(exc)[:160]}); use sdpa or eager") from None
    model.tie_weights()  # no_init_weights skips init_weights, which is also where heads get tied
    model.config.use_cache = False
    apply_activation_checkpointing(model, spec.activation_checkpointing, spec.selective_ac)
    return model


def materialize_on(
    model: nn.Module, device: torch.device, dtype: Optional[torch.dtype] = None, buffer_device: Optional[torch.device] = None
) -> None:
    """Allocate (uninitialised) storage for every meta parameter on `device`, in place, keeping
    the real buffers (on `buffer_device`, default `device`): `nn.Module.to_empty` alone would
    wipe them too. Offloaded parameters live in host memory while buffers stay on the GPU."""
    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    # Moving off the meta device makes a new Parameter per module, which unties tied weights
    # (an LM head sharing the embedding): remember who shares what and re-point them after.
    shared: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for leaf, param in module._parameters.items():
            if param is not None:
                shared.setdefault(id(param), []).append((module, leaf))
    if dtype is not None:
        model.to(dtype)  # free on meta; buffers are restored in their own dtype below
    model.to_empty(device=device)
    for (owner, leaf), *aliases in shared.values():
        for module, alias in aliases:
            module._parameters[alias] = owner._parameters[leaf]
    for name, value in buffers.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        module._buffers[leaf] = value.to(buffer_device or device)


def flops_per_token(model: nn.Module, seq_len: int, numel: Callable[[torch.Tensor], int] = torch.numel) -> float:
    """Training FLOPs per token: 6N for the matmuls of N weights (forward 2N, backward 4N) plus
    12 * layers * hidden * seq_len for attention scores and values (PaLM appendix B).

    N leaves out lookup tables (input and position embeddings) since a lookup does no math; a
    tied output head is counted, as it is a real matmul. A frozen weight counts 4 (no weight
    gradient). Works on skeletons (meta parameters); `numel`: a parameter's full element count
    (a sharding backend's full_numel, for parameters built partitioned).
    """
    config = getattr(model, "config", None)  # a model that is not from transformers may have none
    # A frozen weight (LoRA's base) costs forward 2N and the input gradient 2N, no weight gradient.
    total = sum(numel(p) * (1.0 if p.requires_grad else 2 / 3) for p in model.parameters())
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    output_weight = output.weight if output is not None else None
    lookups = sum(
        numel(m.weight) * (1.0 if m.weight.requires_grad else 2 / 3)
        for m in model.modules() if isinstance(m, nn.Embedding) and m.weight is not output_weight
    )
    n = total - lookups
    layers = getattr(config, "num_hidden_layers", 0)
    hidden = getattr(config, "hidden_size", 0)
    return 6.0 * n + 12.0 * layers * hidden * seq_len
