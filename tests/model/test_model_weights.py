"""Initial weights read in pieces: the seeded per-block init and a pretrained safetensors folder."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from harness.config import ModelConfig
from harness.errors import HarnessError
from harness.model import build_model, initial_weights, model_spec

LLAMA = dict(model_type="llama", num_hidden_layers=2, hidden_size=16, intermediate_size=32,
             num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
GPT2 = dict(model_type="gpt2", n_layer=2, n_embd=16, n_head=2, n_positions=32)


def read_all(source, name: str, numel: int, pieces: int) -> torch.Tensor:
    """The parameter assembled from `pieces` reads of uneven length, as shards would ask."""
    unit = next(u for u in source.units() if name in u)
    bounds = [numel * i // pieces for i in range(pieces + 1)]
    with source.open(unit) as reader:
        return torch.cat([reader.read(name, a, b - a) for a, b in zip(bounds, bounds[1:])])


@pytest.mark.parametrize("config", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_seeded_init_read_in_pieces_equals_the_whole_model(config):
    model = build_model(ModelConfig(config=config), vocab_size=100, seed=3)
    source = initial_weights(model_spec(ModelConfig(config=config), 100), seed=3)
    names = [n for unit in source.units() for n in unit]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    for name, param in model.named_parameters():
        for pieces in (1, 3, 7):
            assert torch.equal(read_all(source, name, param.numel(), pieces), param.detach().reshape(-1)), name


def test_seeded_init_uses_the_models_own_init_and_depends_only_on_seed_and_block():
    two = build_model(ModelConfig(config=GPT2), vocab_size=100, seed=0)
    three = build_model(ModelConfig(config=dict(GPT2, n_layer=3)), vocab_size=100, seed=0)
    other_seed = build_model(ModelConfig(config=GPT2), vocab_size=100, seed=1)
    # Block 0 does not depend on how many blocks follow; another seed changes it.
    assert torch.equal(two.transformer.h[0].mlp.c_fc.weight, three.transformer.h[0].mlp.c_fc.weight)
    assert not torch.equal(two.transformer.h[0].mlp.c_fc.weight, other_seed.transformer.h[0].mlp.c_fc.weight)
    # GPT-2's own scheme: residual projections at 0.02 / sqrt(2 * n_layer), norms at one, biases zero.
    assert two.transformer.h[1].attn.c_proj.weight.std().item() == pytest.approx(0.02 / 2, rel=0.15)
    assert two.transformer.h[1].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.15)
    assert torch.equal(two.transformer.ln_f.weight, torch.ones(16))
    assert torch.equal(two.transformer.h[0].attn.c_attn.bias, torch.zeros(48))
    assert two.lm_head.weight is two.transformer.wte.weight


def _save_folder(tmp_path, dtype=torch.float32, shards=1, name="llama"):
    """A Hugging Face folder of a from-scratch Llama, in `dtype`, optionally split into shards."""
    model = build_model(ModelConfig(config=LLAMA), vocab_size=100, seed=5)
    folder = tmp_path / f"{name}-{str(dtype).split('.')[-1]}-{shards}"
    folder.mkdir()
    model.config.save_pretrained(folder)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = sorted(state)
        weight_map = {}
        for i in range(shards):
            part = names[i::shards]
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: state[k] for k in part}, str(folder / file), metadata={"format": "pt"})
            weight_map.update({k: file for k in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder, state


@pytest.mark.parametrize("dtype, shards", [(torch.float32, 1), (torch.bfloat16, 3)])
def test_pretrained_folder_is_read_in_slices_and_upcast_exactly(tmp_path, dtype, shards):
    folder, state = _save_folder(tmp_path, dtype, shards)
    cfg = ModelConfig(pretrained=str(folder))
    source = initial_weights(model_spec(cfg, 100), seed=0)
    for name, tensor in state.items():
        got = read_all(source, name, tensor.numel(), pieces=5)
        assert got.dtype == torch.float32
        assert torch.equal(got, tensor.to(torch.float32).reshape(-1)), name
    model = build_model(cfg, vocab_size=100, seed=0)
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), state[name].to(torch.float32)), name


def test_bad_pretrained_folders_are_one_line_errors(tmp_path):
    folder, _ = _save_folder(tmp_path, torch.float32, shards=3)
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(HarnessError, match="shard model-00002-of-00003.safetensors named in model.safetensors.index.json is missing"):
        initial_weights(model_spec(ModelConfig(pretrained=str(folder)), 100), seed=0)

    folder, state = _save_folder(tmp_path, torch.float32, shards=1)
    state.pop("model.norm.weight")
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(HarnessError, match="has no tensor model.norm.weight"):
        initial_weights(model_spec(ModelConfig(pretrained=str(folder)), 100), seed=0)

    (folder / "model.safetensors").unlink()
    torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(HarnessError, match="holds pickled weights.*safe_serialization=True"):
        initial_weights(model_spec(ModelConfig(pretrained=str(folder)), 100), seed=0)

    folder, _ = _save_folder(tmp_path, torch.float32, name="resized")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 48
    (folder / "config.json").write_text(json.dumps(config))
    source = initial_weights(model_spec(ModelConfig(pretrained=str(folder)), 100), seed=0)
    with pytest.raises(HarnessError, match="mlp.gate_proj.weight has shape \\[32, 16\\], the model expects \\[48, 16\\]"):
        read_all(source, "model.layers.0.mlp.gate_proj.weight", 48 * 16, 1)


def test_damaged_safetensors_files_are_one_line_errors(tmp_path):
    folder, _ = _save_folder(tmp_path, torch.float32, name="truncated")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-64])  # the last tensor's bytes are cut short
    source = initial_weights(model_spec(ModelConfig(pretrained=str(folder)), 100), seed=0)
    entries = source._handle("model.safetensors").entries
    last = max(source.key_of, key=lambda name: entries[source.key_of[name]]["data_offsets"][1])
    numel = math.prod(source.shapes[last])
    with pytest.raises(HarnessError, match="model.safetensors ends inside .*the file is truncated, re-download it") as err:
        read_all(source, last, numel, 1)
    assert "\n" not in str(err.value)

    weights.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")  # a header that is not JSON
    with pytest.raises(HarnessError, match="cannot read model.safetensors .*re-download or re-save the folder"):
        initial_weights(model_spec(ModelConfig(pretrained=str(folder)), 100), seed=0)
