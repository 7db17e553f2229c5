"""A checkpoint as a Hugging Face folder (`harness export`), streamed tensor by tensor.

The fp32 master weights are read from every rank's shard file of a harness checkpoint (any
backend, any world size, no GPU and no process group needed), one parameter at a time, converted
to the export dtype and written into safetensors shards (model-0000i-of-0000n.safetensors and
their index, as `save_pretrained` lays them out) whose headers are known before any weight is
read: the process holds one tensor at a time, never the model, so a 70B export needs a few GB of
memory, not 280. Beside the weights: config.json, generation_config.json and the tokenizer the run
trained with (its chat template included). The model's expected parameters (a skeleton on the meta
device) must be covered exactly, and the written files are read back and compared with the
checkpoint tensor by tensor, again one at a time: nothing is dropped silently.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import yaml

from harness.errors import HarnessError

DTYPES = ("fp32", "bf16", "fp16")
DEFAULT_SHARD_GB = 5.0
"""save_pretrained's default max_shard_size."""
_COMPARE_ELEMENTS = 1 << 22


def export(checkpoint: Path, out_dir: Path, dtype_name: str, verify: bool = True,
           shard_gb: float = DEFAULT_SHARD_GB) -> int:
    """Writes the folder; returns the number of parameter tensors exported."""
    from harness.checkpoint import ShardReader

    _refuse_custom_model(checkpoint)
    manifest = verified_manifest(checkpoint)
    if manifest.get("lora_base"):
        raise HarnessError(f"{checkpoint.name} holds LoRA adapters, not a whole model: export them with --adapter (a "
                           "peft adapter folder) or --merge (the base with the adapters added)")
    reader = ShardReader(checkpoint, manifest)
    config, names = _expected_parameters(checkpoint, reader)
    shapes = {name: reader.shapes[name] for name in names}
    write_model_folder(checkpoint, out_dir, config, shapes, reader.full_tensor, dtype_name, verify, shard_gb)
    return len(names)


def verified_manifest(checkpoint: Path) -> dict:
    """The manifest of a checkpoint whose files all match it."""
    from harness.checkpoint import read_manifest
    from harness.checkpoint import verify as verify_checkpoint

    problem = verify_checkpoint(checkpoint)
    if problem:
        raise HarnessError(f"cannot export {checkpoint}: {problem}")
    return read_manifest(checkpoint)


def write_model_folder(checkpoint: Path, out_dir: Path, config, shapes: dict, produce, dtype_name: str, verify: bool,
                       shard_gb: float) -> None:
    """A Hugging Face model folder whose tensors (`shapes`, in model order) come from
    `produce(name)` (fp32) one at a time, with the run's config, generation config and tokenizer;
    with `verify`, read back and compared with `produce` tensor by tensor."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    shards = _plan_shards(list(shapes.items()), dtype, shard_gb)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_weights(out_dir, shards, lambda name: produce(name).to(dtype))
    config.dtype = dtype
    config.use_cache = True  # training turned the cache off; generation wants it
    config.save_pretrained(out_dir)
    run_config = run_config_of(checkpoint)
    _write_generation_config(out_dir, config, run_config)
    write_tokenizer(out_dir, run_config)
    if verify:
        _compare(out_dir, shards, produce, dtype)


def run_config_of(checkpoint: Path) -> dict:
    return yaml.safe_load((checkpoint / "config.yaml").read_text())


def _expected_parameters(checkpoint: Path, reader) -> tuple[object, list[str]]:
    """The model's config and parameter names, from a skeleton on the meta device (no memory);
    the checkpoint must hold exactly those."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(checkpoint / "model_config.json")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    expected = {name: tuple(p.shape) for name, p in skeleton.named_parameters()}
    saved = set(reader.names())
    missing = sorted(set(expected) - saved)
    if missing:
        raise HarnessError(f"{checkpoint.name} has no weights for {', '.join(missing[:3])}; refusing a partial export")
    extra = sorted(saved - set(expected))
    if extra:
        raise HarnessError(f"{checkpoint.name} holds {', '.join(extra[:3])}, which this model config lacks")
    for name, shape in expected.items():
        if tuple(reader.shapes[name]) != shape:
            raise HarnessError(f"{checkpoint.name}: {name} is {tuple(reader.shapes[name])}, the model config says {shape}")
    return config, list(expected)


def _plan_shards(tensors: list[tuple[str, tuple[int, ...]]], dtype, shard_gb: float) -> list[list[tuple]]:
    """Tensors, in model order, cut into files of at most shard_gb (a tensor larger than that gets
    a file of its own), as save_pretrained does."""
    import math

    import torch

    limit = shard_gb * 2**30
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[tuple]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, dtype, tuple(shape)))
        size += nbytes
    return shards


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _write_weights(out_dir: Path, shards: list[list[tuple]], produce) -> None:
    from harness.checkpoint.staging import write_safetensors_streamed

    for stale in list(out_dir.glob("model*.safetensors")) + list(out_dir.glob("model.safetensors.index.json")):
        stale.unlink()  # a previous export's shards would be loaded beside these
    files = _shard_names(len(shards))
    weight_map, total = {}, 0
    for file, layout in zip(files, shards):
        size, _ = write_safetensors_streamed(out_dir / file, layout, produce, {"format": "pt"})
        weight_map.update({name: file for name, _, _ in layout})
        total += size
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _compare(out_dir: Path, shards: list[list[tuple]], produce, dtype) -> None:
    """Each written tensor, read back in pieces with positioned reads (a memory map would leave the
    whole file resident), equals what `produce` gives, converted: one tensor held at a time."""
    import math

    import torch

    from harness.checkpoint.load import read_safetensors_range

    for file, layout in zip(_shard_names(len(shards)), shards):
        for name, _, shape in layout:
            numel = math.prod(shape)
            flat = produce(name).reshape(-1)
            for start in range(0, numel, _COMPARE_ELEMENTS):
                count = min(_COMPARE_ELEMENTS, numel - start)
                want = flat.narrow(0, start, count)
                if not torch.equal(read_safetensors_range(out_dir / file, name, dtype, start, count), want.to(dtype)):
                    raise HarnessError(f"export check failed: {name} in {out_dir / file} differs from the checkpoint; "
                                       "report this bug")


def _write_generation_config(out_dir: Path, config, run_config: dict) -> None:
    """The pretrained model's own generation_config.json (its end-of-turn tokens, sampling
    defaults), else one derived from the model config."""
    source = pretrained_folder(run_config)
    if source is not None and (source / "generation_config.json").is_file():
        shutil.copyfile(source / "generation_config.json", out_dir / "generation_config.json")
        return
    from transformers import GenerationConfig

    GenerationConfig.from_model_config(config).save_pretrained(out_dir)


def pretrained_folder(run_config: dict) -> Optional[Path]:
    pretrained = (run_config.get("model") or {}).get("pretrained")
    if not pretrained:
        return None
    from harness import assets

    try:
        return Path(assets.local_model_dir(assets.resolve_model(pretrained)))
    except HarnessError:
        return None  # a hub id this machine cannot reach: the derived generation config will do


def write_tokenizer(out_dir: Path, run_config: dict) -> None:
    """The tokenizer the run trained with, and the chat template its data was rendered with."""
    from harness.data import load_tokenizer

    data = run_config.get("data") or {}
    tokenizer = load_tokenizer(data.get("tokenizer") or (run_config.get("model") or {}).get("pretrained") or "")
    template = data.get("chat_template")
    if template:
        path = Path(template).expanduser()
        if not path.is_file():
            raise HarnessError(f"the run's data.chat_template {template!r} is gone; put it back to export the template "
                               "the model was trained with")
        tokenizer.chat_template = path.read_text()
    tokenizer.save_pretrained(out_dir)


def _refuse_custom_model(checkpoint: Path) -> None:
    """A model from harness.Trainer(model=...) has no transformers config to export to."""
    from harness.model.source import CUSTOM_MODEL_KEY

    described = checkpoint / "model_config.json"
    model = json.loads(described.read_text()).get(CUSTOM_MODEL_KEY) if described.is_file() else None
    if model is not None:
        raise HarnessError(f"{checkpoint.name} holds {model}, a model given to harness.Trainer(model=...), not a "
                           "transformers model: export writes Hugging Face folders; read its fp32 weights with "
                           "harness.checkpoint.ShardReader instead")
