"""The `lora:` section: low-rank adapters (peft's LoRA) on a frozen pretrained base.

With lora.r > 0 only the adapters train: they alone have fp32 master weights, gradients and AdamW
state, while the base weights stay in the compute dtype, sharded (FSDP2) or partitioned (ZeRO-3),
and frozen. A checkpoint then holds the adapters and names the base they belong to."""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.config.layouts import Layout
from harness.errors import ConfigError


@dataclass
class LoraConfig:
    r: int = 0
    """Rank of the adapters; 0: no adapters (a full fine-tune)."""
    alpha: float = 16.0
    """Scaling numerator: each adapter adds (alpha / r) x B @ A to its layer's weight."""
    dropout: float = 0.0
    """Dropout on the adapters' input during training."""
    target_modules: list[str] = field(default_factory=list)
    """Module names (peft's suffix match: "q_proj" matches every block's q_proj) that get adapters. Empty: the attention and MLP projections of every transformer block, found by name (Llama, Mistral, Qwen, Gemma, GPT-2, ... families)."""

    @property
    def enabled(self) -> bool:
        return self.r > 0


def validate_lora(lora: LoraConfig, pretrained: str | None, precision: str, layout: Layout) -> None:
    """layout: what the sharding layout can do; the frozen base is sharded only where it partitions
    parameters between uses (ZeRO-1/2 would hold a whole copy of it on every rank)."""
    if lora.r < 0:
        raise ConfigError(f"lora.r must be >= 0 (0: no adapters; got {lora.r})")
    if not lora.enabled:
        return
    if not 0.0 <= lora.dropout < 1.0:
        raise ConfigError(f"lora.dropout must be in [0, 1) (got {lora.dropout})")
    if lora.alpha <= 0:
        raise ConfigError(f"lora.alpha must be > 0 (got {lora.alpha})")
    if not pretrained:
        raise ConfigError(f"lora.r={lora.r} trains adapters on a pretrained base: set model.pretrained (a local "
                          "Hugging Face folder, a hub id or bundled:smollm2-135m), or lora.r=0 for training from scratch")
    if not layout.partitions_parameters:
        stage = layout.name.removeprefix("zero")
        raise ConfigError(f"lora.r={lora.r} with ZeRO-{stage} would keep a whole base model on every rank; use "
                          "parallel.zero_stage=3 or parallel.backend=fsdp2, which shard the frozen base")
    if precision == "fp8":
        raise ConfigError(f"lora.r={lora.r} with precision=fp8 is not supported (torchao would convert the frozen base "
                          "layers peft wraps); use precision=bf16")
