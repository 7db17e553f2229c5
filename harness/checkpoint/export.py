"""A checkpoint as a Hugging Face folder (`harness export`).

Assembles the fp32 master weights from every rank's shard file of a harness checkpoint (any
backend, any world size, no GPU and no process group needed) into a Hugging Face folder:
config.json, model.safetensors and the tokenizer files. Every parameter of the model must be
fully covered by the checkpoint, and the folder is loaded back with AutoModelForCausalLM and
compared tensor by tensor before the command reports success: nothing is dropped silently.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from harness.errors import HarnessError

DTYPES = ("fp32", "bf16", "fp16")


def export(checkpoint: Path, out_dir: Path, dtype_name: str, verify: bool = True) -> int:
    """Writes the folder; returns the number of parameter tensors exported."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from harness.checkpoint import ShardReader, read_manifest
    from harness.checkpoint import verify as verify_checkpoint
    from harness.data import load_tokenizer

    _refuse_custom_model(checkpoint)
    problem = verify_checkpoint(checkpoint)
    if problem:
        raise HarnessError(f"cannot export {checkpoint}: {problem}")
    manifest = read_manifest(checkpoint)
    reader = ShardReader(checkpoint, manifest)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]

    config = AutoConfig.from_pretrained(checkpoint / "model_config.json")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    named = dict(model.named_parameters())
    saved = set(reader.names())
    missing = sorted(set(named) - saved)
    if missing:
        raise HarnessError(f"{checkpoint.name} has no weights for {', '.join(missing[:3])}; refusing a partial export")
    extra = sorted(saved - set(named))
    if extra:
        raise HarnessError(f"{checkpoint.name} holds {', '.join(extra[:3])}, which this model config lacks")
    with torch.no_grad():
        for name, param in named.items():
            param.copy_(reader.full_tensor(name))
    model = model.to(dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    run_config = yaml.safe_load((checkpoint / "config.yaml").read_text())
    load_tokenizer(run_config["data"]["tokenizer"]).save_pretrained(out_dir)
    if verify:
        _compare(out_dir, named, dtype)
    return len(named)


def _compare(out_dir: Path, expected: dict, dtype) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    loaded = dict(AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype).named_parameters())
    for name, want in expected.items():
        got = loaded.get(name)
        if got is None or got.shape != want.shape or not torch.equal(got, want):
            raise HarnessError(f"export check failed: {name} in {out_dir} differs from the checkpoint; report this bug")


def _refuse_custom_model(checkpoint: Path) -> None:
    """A model from harness.Trainer(model=...) has no transformers config to export to."""
    import json

    from harness.model.source import CUSTOM_MODEL_KEY

    described = checkpoint / "model_config.json"
    model = json.loads(described.read_text()).get(CUSTOM_MODEL_KEY) if described.is_file() else None
    if model is not None:
        raise HarnessError(f"{checkpoint.name} holds {model}, a model given to harness.Trainer(model=...), not a "
                           "transformers model: export writes Hugging Face folders; read its fp32 weights with "
                           "harness.checkpoint.ShardReader instead")
