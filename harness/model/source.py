"""Where a run's model comes from: the config (a transformers model, from scratch or pretrained) or
a callable the user hands to `harness.Trainer(model=...)`. Both give the same four things, so the
rest of the harness (sharding, sharded init, checkpoints) treats them alike:

- `skeleton(context)`: the module tree with no weights written, its parameters created inside a
  backend's context (the meta device, or ZeRO-3 partitions);
- `initial_weights(seed)`: the values, read in pieces (harness.model.weights);
- `hidden_size`: the width DeepSpeed sizes its buckets by;
- `describe(model)`: what a checkpoint records as the model (model_config.json).

Nothing here knows about ranks.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional, Protocol

from torch import nn

from harness.config import LoraConfig, ModelConfig
from harness.errors import HarnessError
from harness.model.blocks import apply_activation_checkpointing, transformer_blocks
from harness.model.build import ModelSpec, build_skeleton, model_spec, on_meta_device
from harness.model.lora import AdapterInitialWeights, add_adapters, tie_again
from harness.model.weights import InitialWeights, SeededInit, initial_weights

CUSTOM_MODEL_KEY = "harness_custom_model"
"""model_config.json of a checkpoint whose model came from a callable: {CUSTOM_MODEL_KEY: "module.Class"}."""


class ModelSource(Protocol):
    notes: tuple[str, ...]
    hidden_size: int

    def skeleton(self, context: Optional[ContextManager] = None) -> nn.Module: ...

    def initial_weights(self, seed: int) -> InitialWeights: ...

    def describe(self, model: nn.Module) -> str: ...


@dataclass
class TransformersModel:
    """model.pretrained / model.config: any transformers causal LM, with LoRA adapters when
    lora.r > 0 (added inside the same context as the base, so they are sharded alike)."""

    spec: ModelSpec
    lora: LoraConfig = field(default_factory=LoraConfig)
    lora_targets: tuple[str, ...] = ()
    """The modules that got adapters (set by the first skeleton())."""

    @property
    def notes(self) -> tuple[str, ...]:
        return self.spec.notes

    @property
    def hidden_size(self) -> int:
        return self.spec.hf_config.hidden_size

    def skeleton(self, context: Optional[ContextManager] = None) -> nn.Module:
        if not self.lora.enabled:
            return build_skeleton(self.spec, context)
        with context if context is not None else on_meta_device():
            model = build_skeleton(self.spec, contextlib.nullcontext())
            self.lora_targets = tuple(add_adapters(model, self.lora))
        tie_again(model)  # where build_skeleton ties a model without adapters
        return model

    def initial_weights(self, seed: int) -> InitialWeights:
        base = initial_weights(self.spec, seed)
        return AdapterInitialWeights(base, self.skeleton(), seed) if self.lora.enabled else base

    def describe(self, model: nn.Module) -> str:
        return model.config.to_json_string()


BlocksOf = Callable[[nn.Module], list[nn.Module]]


class CallableModel:
    """`build()` returns a plain nn.Module (it is called inside the backend's context, so its
    parameters are created on the meta device or partitioned, never whole). Its blocks, the units
    FSDP2 shards and ZeRO-3 gathers, are `blocks(model)`, or the classes the model names in
    `_no_split_modules` (as transformers models do)."""

    def __init__(self, build: Callable[[], nn.Module], blocks: Optional[BlocksOf], cfg: ModelConfig) -> None:
        self.build = build
        self.blocks = blocks
        self.cfg = cfg
        self.notes: tuple[str, ...] = ()
        probe = self.skeleton()
        self.hidden_size = _width(probe)
        self.name = f"{type(probe).__module__}.{type(probe).__qualname__}"

    def skeleton(self, context: Optional[ContextManager] = None) -> nn.Module:
        with context if context is not None else on_meta_device():
            model = self.build()
        if not isinstance(model, nn.Module):
            raise HarnessError(f"harness.Trainer(model=...) must return an nn.Module, got {type(model).__name__}")
        _name_blocks(model, self.blocks)
        apply_activation_checkpointing(model, self.cfg.checkpointing_mode(), self.cfg.selective_ac)
        return model

    def initial_weights(self, seed: int) -> InitialWeights:
        return SeededInit(self.skeleton, seed)

    def describe(self, model: nn.Module) -> str:
        return json.dumps({CUSTOM_MODEL_KEY: self.name})


def model_source(cfg: ModelConfig, vocab_size: int, seq_len: int,
                 build: Optional[Callable[[], nn.Module]] = None, blocks: Optional[BlocksOf] = None,
                 special_tokens: Optional[dict] = None, lora: Optional[LoraConfig] = None) -> ModelSource:
    """The user's callable if given, else the config's transformers model (from scratch: with the
    tokenizer's `special_tokens` ids; with `lora`'s adapters)."""
    lora = lora or LoraConfig()
    if build is not None:
        if lora.enabled:
            raise HarnessError(f"lora.r={lora.r} adds peft adapters to the config's model.pretrained, not to a model "
                               "given to harness.Trainer(model=...); apply peft to your model yourself, or use lora.r=0")
        return CallableModel(build, blocks, cfg)
    return TransformersModel(model_spec(cfg, vocab_size, seq_len, special_tokens), lora)


def _name_blocks(model: nn.Module, blocks: Optional[BlocksOf]) -> None:
    """Record the block classes where every part of the harness looks for them
    (`_no_split_modules`), and check they pick exactly the modules `blocks` named."""
    if blocks is None:
        if not getattr(model, "_no_split_modules", None):
            raise HarnessError(
                f"harness.Trainer(model=...): cannot tell the transformer blocks of {type(model).__name__}; pass "
                "blocks=lambda model: list(model.layers) (the units that are sharded) or set _no_split_modules on it"
            )
        return
    chosen = list(blocks(model))
    if not chosen or not all(isinstance(b, nn.Module) for b in chosen):
        raise HarnessError(f"harness.Trainer(blocks=...) must return the model's block modules, got {chosen!r:.80}")
    model._no_split_modules = sorted({type(b).__name__ for b in chosen})
    found = transformer_blocks(model)
    if [id(b) for b in found] != [id(b) for b in chosen]:
        raise HarnessError(
            f"harness.Trainer(blocks=...) names {len(chosen)} modules, but {len(found)} modules of their classes "
            f"({', '.join(model._no_split_modules)}) exist: a block's class must be used only for blocks, in order"
        )


def _width(model: nn.Module) -> int:
    """The model's hidden size: its config's, else its widest embedding's."""
    config = getattr(model, "config", None)
    width = getattr(config, "hidden_size", None)
    if isinstance(width, int):
        return width
    dims = [m.embedding_dim for m in model.modules() if isinstance(m, nn.Embedding)]
    linear = [m.in_features for m in model.modules() if isinstance(m, nn.Linear)]
    return max(dims or linear or [1])

