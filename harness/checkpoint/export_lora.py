"""A LoRA checkpoint's adapters as a peft adapter folder (`harness export --adapter`), or merged
into their base as a whole Hugging Face model (`harness export --merge`).

The checkpoint holds the adapters' fp32 masters and names its base (path and weights
fingerprint, harness.model.lora.base_identity). The merge streams the base one tensor at a time
(positioned reads of its safetensors, as a pretrained start reads them), adds (alpha / r) x B @ A
in fp32 where a layer has adapters, and writes the chosen dtype: memory is one tensor, not the
model, so two nodes' worth of 70B merges on a login node.
"""

from __future__ import annotations

import json
from pathlib import Path

from harness.checkpoint.export import (
    pretrained_folder,
    run_config_of,
    verified_manifest,
    write_model_folder,
    write_tokenizer,
)
from harness.errors import HarnessError

ADAPTER_FILE = "adapter_model.safetensors"


def lora_checkpoint(checkpoint: Path, flag: str) -> tuple[dict, dict]:
    """(manifest, run config) of a verified checkpoint that holds adapters."""
    manifest = verified_manifest(checkpoint)
    if not manifest.get("lora_base"):
        raise HarnessError(f"{checkpoint.name} is a full fine-tune's checkpoint (it holds no LoRA adapters): {flag} "
                           "exports adapters; export the whole model without it")
    return manifest, run_config_of(checkpoint)


def export_adapter(checkpoint: Path, out_dir: Path, dtype_name: str) -> int:
    """adapter_config.json + adapter_model.safetensors, as peft's save_pretrained writes them, and
    the tokenizer; `PeftModel.from_pretrained(base, out_dir)` loads it. Returns the tensor count."""
    import torch
    from safetensors.torch import save_file

    from harness.checkpoint import ShardReader
    from harness.config import LoraConfig
    from harness.model.lora import peft_config, peft_key

    manifest, run_config = lora_checkpoint(checkpoint, "--adapter")
    reader = ShardReader(checkpoint, manifest)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    tensors = {peft_key(name): reader.full_tensor(name).to(dtype).contiguous() for name in sorted(reader.names())}
    targets = sorted({name.rpartition(".lora_")[0].rpartition(".")[2] for name in reader.names()})
    config = peft_config(LoraConfig(**run_config["lora"]), targets)
    config.base_model_name_or_path = _base_reference(manifest, run_config)
    config.task_type = "CAUSAL_LM"
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    save_file(tensors, str(out_dir / ADAPTER_FILE), metadata={"format": "pt"})
    write_tokenizer(out_dir, run_config)
    return len(tensors)


def _base_reference(manifest: dict, run_config: dict) -> str:
    """The base as the run named it (a hub id, the user's folder, bundled:smollm2-135m), never the
    cache folder it was read from on the training machine, which another machine does not have."""
    return manifest["lora_base"]["pretrained"]


def export_merged(checkpoint: Path, out_dir: Path, dtype_name: str, verify: bool, shard_gb: float) -> int:
    """The base with every adapted weight replaced by W + (alpha / r) x B @ A, as a Hugging Face
    folder in `dtype_name`. The base must still be the one the adapters were trained on."""
    from transformers import AutoConfig

    from harness.checkpoint import ShardReader
    from harness.model.build import ModelSpec, build_skeleton
    from harness.model.lora import ADAPTER, base_identity, check_same_base
    from harness.model.weights import PretrainedWeights

    manifest, run_config = lora_checkpoint(checkpoint, "--merge")
    folder = pretrained_folder(run_config)
    if folder is None:
        raise HarnessError(f"the base {manifest['lora_base']['pretrained']!r} of {checkpoint.name} is not on this "
                           "machine; download it (or point model.pretrained in the checkpoint's config.yaml at it)")
    check_same_base(manifest["lora_base"], base_identity(manifest["lora_base"]["pretrained"], str(folder)),
                    checkpoint.name)
    adapters = ShardReader(checkpoint, manifest)
    config = AutoConfig.from_pretrained(checkpoint / "model_config.json")
    base = PretrainedWeights(ModelSpec(config, str(folder)))
    layers = {n.rpartition(".lora_")[0] for n in adapters.names()}
    skeleton = build_skeleton(ModelSpec(config, str(folder)))
    tied_to = _untie_adapted(config, skeleton, layers)
    if tied_to:  # the untied model: the adapted head has a weight of its own to write
        skeleton = build_skeleton(ModelSpec(config, str(folder)))
    scaling = run_config["lora"]["alpha"] / run_config["lora"]["r"]
    transposed = {f"{name}.weight" for name, m in skeleton.named_modules() if type(m).__name__ == "Conv1D"}
    shapes = {name: tuple(p.shape) for name, p in skeleton.named_parameters()}
    owners = {name.rpartition(".")[0] for name in shapes}
    if not layers <= owners:
        raise HarnessError(f"{checkpoint.name} has adapters for {sorted(layers - owners)[:2]}, which the base "
                           "model lacks; was it trained on another architecture?")

    def produce(name: str):
        weight = base.read(tied_to.get(name, name), 0, _numel(shapes[name])).view(shapes[name])
        layer = name.rpartition(".")[0]
        if layer in layers and name == f"{layer}.weight":
            a = adapters.full_tensor(f"{layer}.lora_A.{ADAPTER}.weight")
            b = adapters.full_tensor(f"{layer}.lora_B.{ADAPTER}.weight")
            delta = (b @ a) * scaling
            weight = weight + (delta.T if name in transposed else delta)
        return weight

    write_model_folder(checkpoint, out_dir, config, shapes, produce, dtype_name, verify, shard_gb)
    (out_dir / "harness_merge.json").write_text(json.dumps(
        {"base": manifest["lora_base"], "adapted_layers": len(layers), "scaling": scaling}, indent=2))
    return len(shapes)


def _untie_adapted(config, skeleton, layers: set[str]) -> dict[str, str]:
    """Where an adapted layer's weight is tied to another (a tied head with adapters: the input
    embeddings stay W, the head becomes W + delta), untie it in `config` (tie_word_embeddings=False:
    the merged model holds both) and return {the adapted weight: the base's name it reads}."""
    tied = {target: source for target, source in skeleton.get_expanded_tied_weights_keys(all_submodels=True).items()
            if target.rpartition(".")[0] in layers or source.rpartition(".")[0] in layers}
    if tied:  # the text model's flag, and a composite model's top-level one (the same object otherwise)
        config.get_text_config().tie_word_embeddings = False
        config.tie_word_embeddings = False
    return tied


def _numel(shape: tuple[int, ...]) -> int:
    import math

    return math.prod(shape)

