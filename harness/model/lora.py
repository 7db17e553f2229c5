"""Low-rank adapters (peft's LoRA) on a frozen base model, as model code: which layers get them,
adding them to a skeleton, their initial values, and the identity of the base they belong to.

peft's own layers do the math (`inject_adapter_in_model`, which keeps the transformers model
class and its parameter names: a target `q_proj.weight` becomes `q_proj.base_layer.weight` beside
`q_proj.lora_A.default.weight` and `q_proj.lora_B.default.weight`). Nothing here knows about
ranks: a backend shards the adapters like any other trainable parameter and keeps the frozen base
in the compute dtype (no fp32 master, gradient or optimizer state).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import warnings
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from harness.config import LoraConfig
from harness.errors import HarnessError, first_line
from harness.model.blocks import transformer_blocks
from harness.model.build import materialize_on
from harness.model.weights import InitialWeights, UnitReader

ADAPTER = "default"
"""peft's adapter name; exports drop it from the keys, as peft's save_pretrained does."""

PROJECTIONS = frozenset({
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",  # Llama, Mistral, Qwen, Gemma
    "qkv_proj", "gate_up_proj", "out_proj", "fc1", "fc2", "dense",  # Phi, OPT, fused variants
    "c_attn", "c_proj", "c_fc",  # GPT-2 (Conv1D)
    "query_key_value", "dense_h_to_4h", "dense_4h_to_h", "Wqkv",  # GPT-NeoX, Falcon, MPT
})
"""Leaf names of the attention and MLP projections of the model families the harness trains."""


def default_targets(model: nn.Module) -> list[str]:
    """The projection names found inside the model's transformer blocks (linear or Conv1D leaves)."""
    found = set()
    for block in transformer_blocks(model):
        for name, module in block.named_modules():
            leaf = name.rpartition(".")[2]
            if leaf in PROJECTIONS and _is_projection(module):
                found.add(leaf)
    return sorted(found)


def _is_projection(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def peft_config(cfg: LoraConfig, targets: list[str]):
    """peft's LoraConfig for the section (also what an adapter export writes)."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, bias="none")


def add_adapters(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Add adapters to `model` in place (inside whatever context built it: their parameters go
    where the base's did) and freeze everything else; returns the target names used."""
    from peft import inject_adapter_in_model

    targets = list(cfg.target_modules) or default_targets(model)
    if not targets:
        raise HarnessError(f"lora.r={cfg.r}: no attention or MLP projection found by name in the blocks of "
                           f"{type(model).__name__}; name its layers in lora.target_modules")
    _check_targets_are_linear(model, targets)
    try:
        with warnings.catch_warnings():  # under ZeRO-3 peft's init meets empty partitions: DeepSpeed's, harmless
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
            # A tied head with adapters: describe() says what that means here, and the merge unties.
            warnings.filterwarnings("ignore", message="Model has `tie_word_embeddings=True` and a tied layer")
            inject_adapter_in_model(peft_config(cfg, targets), model, adapter_name=ADAPTER)
    except ValueError as exc:
        if "not found" not in str(exc) and "match" not in str(exc):
            raise
        raise HarnessError(f"lora.target_modules={targets} match no module of {type(model).__name__} "
                           f"({first_line(exc)[:120]}); name linear layers of its blocks, e.g. q_proj, v_proj") from None
    if not any(p.requires_grad for p in model.parameters()):
        raise HarnessError(f"lora.target_modules={targets}: no adapter was added to {type(model).__name__}")
    return targets


def tie_again(model: nn.Module) -> None:
    """Tie the model's tied pairs (a tied head) again after adapters were added inside a
    construction context, which made the head a parameter of its own. transformers names the base's
    parameters (lm_head.weight -> model.embed_tokens.weight); where peft wrapped a tied layer
    (lora.target_modules=[lm_head]), the weight it ties is that layer's base_layer's now."""
    layers = {name for name, module in model.named_modules() if _is_lora_layer(module)}
    for target, source in model.get_expanded_tied_weights_keys(all_submodels=True).items():
        owner, _, leaf = _adapted_name(target, layers).rpartition(".")
        setattr(model.get_submodule(owner), leaf, model.get_parameter(_adapted_name(source, layers)))


def _check_targets_are_linear(model: nn.Module, targets: list[str]) -> None:
    """Adapters go on linear layers (nn.Linear, GPT-2's Conv1D): peft's embedding and convolution
    adapters have other parameters than lora_A/lora_B, which nothing here initialises or exports."""
    for name, module in model.named_modules():
        if any(name == t or name.endswith(f".{t}") for t in targets) and not _is_projection(module):
            raise HarnessError(f"lora.target_modules matches {name} ({type(module).__name__}): adapters go on linear "
                               "layers (e.g. q_proj, v_proj, down_proj, lm_head); name those")


def tied_adapted_layers(model: nn.Module) -> list[str]:
    """Layers with adapters whose base weight the model ties to another parameter (a tied head)."""
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    return sorted(name.partition(".base_layer.")[0] for names in names_of.values() if len(names) > 1
                  for name in names if ".base_layer." in name)


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def base_name(name: str) -> str:
    """The base model's name of a parameter of the adapted model (`x.base_layer.weight` -> `x.weight`)."""
    return name.replace(".base_layer.", ".")


def peft_key(name: str) -> str:
    """An adapter parameter's key in a peft adapter file (PeftModel's prefix, no adapter name)."""
    return "base_model.model." + name.replace(f".{ADAPTER}.", ".")


def describe(model: nn.Module, targets: list[str], cfg: LoraConfig, dtype_name: str, full_numel) -> str:
    trainable = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(full_numel(p) for p in model.parameters())
    tied = "".join(f"; {layer} is tied to the input embeddings: its adapters change {layer} only (a merged export "
                   "unties them)" for layer in tied_adapted_layers(model))
    return (f"lora: r={cfg.r}, alpha={cfg.alpha:g} on {', '.join(targets)}: {trainable:,} trainable parameters "
            f"({100 * trainable / total:.2f}% of {total:,}); the base is frozen in {dtype_name}{tied}")


class AdapterInitialWeights:
    """The base's initial weights (pretrained) under the adapted model's names, and peft's own
    init of the adapters (A: kaiming-uniform, B: zero), seeded by (seed, layer name) so every
    world size and backend starts from the same bits."""

    def __init__(self, base: InitialWeights, adapted_skeleton: nn.Module, seed: int) -> None:
        self.base = base
        self.seed = seed
        self.layers = {name: module for name, module in adapted_skeleton.named_modules() if _is_lora_layer(module)}

    def units(self) -> list[list[str]]:
        adapted = [[_adapted_name(n, self.layers) for n in unit] for unit in self.base.units()]
        adapters = [[f"{layer}.lora_{ab}.{ADAPTER}.weight" for ab in "AB"] for layer in self.layers]
        return adapted + adapters

    @contextlib.contextmanager
    def open(self, unit: list[str]) -> Iterator[UnitReader]:
        if is_adapter(unit[0]):
            yield _FreshAdapters(self._init_layer(unit[0].rpartition(".lora_")[0]))
            return
        with self.base.open([base_name(n) for n in unit]) as reader:
            yield _Renamed(reader)

    def _init_layer(self, layer_name: str) -> dict[str, torch.Tensor]:
        layer = self.layers[layer_name]
        fresh = copy.deepcopy(nn.ModuleDict({"lora_A": layer.lora_A, "lora_B": layer.lora_B}))
        materialize_on(fresh, torch.device("cpu"), dtype=torch.float32)
        holder = copy.copy(layer)  # peft's init reads lora_A/lora_B off the layer: point them at the copies
        holder.lora_A, holder.lora_B = fresh["lora_A"], fresh["lora_B"]
        digest = hashlib.sha256(f"{self.seed}/lora/{layer_name}".encode()).hexdigest()[:15]
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(int(digest, 16))
            holder.reset_lora_parameters(ADAPTER, True)
        return {f"{layer_name}.lora_{ab}.{ADAPTER}.weight": fresh[f"lora_{ab}"][ADAPTER].weight for ab in "AB"}


def _is_lora_layer(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def _adapted_name(name: str, layers: dict) -> str:
    owner, _, leaf = name.rpartition(".")
    return f"{owner}.base_layer.{leaf}" if owner in layers else name


class _Renamed:
    def __init__(self, reader: UnitReader) -> None:
        self.reader = reader

    def read(self, name: str, offset: int, numel: int) -> torch.Tensor:
        return self.reader.read(base_name(name), offset, numel)


class _FreshAdapters:
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def read(self, name: str, offset: int, numel: int) -> torch.Tensor:
        return self.tensors[name].detach().reshape(-1).narrow(0, offset, numel)


def freeze_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Store every frozen parameter in `dtype` (on the meta device, before sharding): it gets no
    fp32 master, so its storage is the compute copy itself. Tied parameters stay tied."""
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for leaf, param in list(module._parameters.items()):
            if param is None or param.requires_grad or param.dtype == dtype:
                continue
            if id(param) not in replaced:
                replaced[id(param)] = nn.Parameter(param.detach().to(dtype), requires_grad=False)
            module._parameters[leaf] = replaced[id(param)]


# --------------------------------------------------------------------------------------------
# The base a checkpoint's adapters belong to

_SAMPLE_BYTES = 1 << 16


def base_identity(pretrained: str, folder: str) -> dict:
    """What names a base model: the reference it was given by, and a fingerprint of its weights:
    sha256 over the weight map, every safetensors header (names, shapes, dtypes, offsets) and
    64 KiB of data from the start, middle and end of each file. Reading the whole of a 70B base
    would take minutes; two bases with the same architecture differ in those samples."""
    root = Path(folder)
    digest = hashlib.sha256()
    index = root / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    for name in files:
        path = root / name
        size = path.stat().st_size
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            digest.update(name.encode() + f.read(header_len))
            data = size - 8 - header_len
            for start in sorted({0, max(0, data // 2 - _SAMPLE_BYTES // 2), max(0, data - _SAMPLE_BYTES)}):
                f.seek(8 + header_len + start)
                digest.update(f.read(_SAMPLE_BYTES))
    return {"pretrained": pretrained, "fingerprint": digest.hexdigest()[:32]}


def check_same_base(saved: Optional[dict], now: dict, checkpoint: str) -> None:
    """Refuse adapters trained on another base."""
    if not saved:
        raise HarnessError(f"{checkpoint} holds no adapters (a full fine-tune's checkpoint): resume it with lora.r=0; "
                           "to train adapters on it, export it (harness export) and set model.pretrained to that folder")
    if saved.get("fingerprint") != now["fingerprint"]:
        raise HarnessError(
            f"{checkpoint}'s adapters were trained on {saved.get('pretrained')!r} (weights {saved.get('fingerprint')}), "
            f"but model.pretrained is {now['pretrained']!r} (weights {now['fingerprint']}): resume against the same "
            "base model, or start a new run (run.fresh=true moves the earlier one aside)")
