"""Any Hugging Face causal LM, built the way a user would: AutoConfig / AutoModelForCausalLM.

Nothing here knows about ranks or sharding; parallel/ wraps what this returns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness import assets
from harness.config import ModelConfig
from harness.errors import HarnessError


def build_model(cfg: ModelConfig, vocab_size: int, seed: int) -> nn.Module:
    """fp32 weights on the CPU; identical on every rank because the init is seeded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    if cfg.pretrained:
        path = assets.resolve_model(cfg.pretrained)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, attn_implementation=cfg.attn_implementation, **cfg.config
            )
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise HarnessError(
                f"model.pretrained {cfg.pretrained!r} could not be loaded ({first}); "
                "use a local Hugging Face folder or bundled:smollm2-135m"
            ) from None
    else:
        kwargs = dict(cfg.config)
        model_type = kwargs.pop("model_type")
        kwargs.setdefault("vocab_size", vocab_size)
        try:
            hf_config = AutoConfig.for_model(model_type, **kwargs)
        except ValueError as exc:
            raise HarnessError(f"model.config.model_type={model_type!r} is not a transformers model: {exc}") from None
        hf_config._attn_implementation = cfg.attn_implementation
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)

    rows = model.get_input_embeddings().num_embeddings
    if rows < vocab_size:
        raise HarnessError(
            f"the tokenizer has {vocab_size} tokens but the model's embedding has {rows} rows; "
            "set model.config.vocab_size or use the model's own tokenizer (data.tokenizer)"
        )
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated layers, found by the class names transformers marks as not-to-be-split."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise HarnessError(f"cannot find the transformer blocks of {type(model).__name__} (no _no_split_modules)")
    return blocks


def next_token_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over the batch, computed in fp32 whatever the compute dtype."""
    logits = model(input_ids=batch[:, :-1]).logits
    targets = batch[:, 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def per_sequence_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of each sequence (fp32), for weighted evaluation."""
    logits = model(input_ids=batch[:, :-1]).logits
    targets = batch[:, 1:]
    losses = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    return losses.view(targets.shape).mean(dim=1)


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls of N weights (forward 2N, backward 4N) plus
    12 * layers * hidden * seq_len for attention scores and values (PaLM appendix B).

    N leaves out lookup tables (input and position embeddings) since a lookup does no math; a
    tied output head is counted, as it is a real matmul.
    """
    config = model.config
    total = sum(p.numel() for p in model.parameters())
    output = model.get_output_embeddings()
    output_weight = output.weight if output is not None else None
    lookups = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding) and m.weight is not output_weight
    )
    n = total - lookups
    layers = getattr(config, "num_hidden_layers", 0)
    hidden = getattr(config, "hidden_size", 0)
    return 6.0 * n + 12.0 * layers * hidden * seq_len
