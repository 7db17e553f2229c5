"""harness.model.lora: which layers get adapters, the skeleton they are added to, the base's
identity, and what the estimator and the FLOP count make of a frozen base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from harness.config import LoraConfig, load_config
from harness.errors import HarnessError
from harness.model.build import flops_per_token
from harness.model.lora import (
    add_adapters,
    base_identity,
    check_same_base,
    default_targets,
    describe,
    tied_adapted_layers,
)

ROOT = Path(__file__).resolve().parents[2]
FIXTURE_70B = ROOT / "tests" / "fixtures" / "llama-3.1-70b-instruct"


def _meta(model_type: str, **shape) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **shape))


def test_the_default_targets_are_the_blocks_attention_and_mlp_projections():
    llama = _meta("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256)
    assert default_targets(llama) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    gpt2 = _meta("gpt2", n_layer=2, n_embd=64, n_head=4, vocab_size=256)
    assert default_targets(gpt2) == ["c_attn", "c_fc", "c_proj"]


def test_a_family_whose_projections_have_no_known_name_is_one_line():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = nn.Linear(8, 8)

    class Odd(nn.Module):
        _no_split_modules = ["Block"]

        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])

    with pytest.raises(HarnessError, match=r"^lora.r=4: no attention or MLP projection found by name in the blocks "
                                           r"of Odd; name its layers in lora.target_modules$"):
        add_adapters(Odd(), LoraConfig(r=4))
    model = Odd()
    assert add_adapters(model, LoraConfig(r=4, target_modules=["mix"])) == ["mix"]
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == [
        f"blocks.{i}.mix.lora_{ab}.default.weight" for i in (0, 1) for ab in "AB"]


def test_a_tied_heads_base_stays_tied_once_adapters_are_added(tmp_path):
    from harness.model.source import model_source

    cfg = load_config(ROOT / "configs" / "smollm2-135m-lora.yaml")
    source = model_source(cfg.model, 49152, 64, lora=cfg.lora)
    model = source.skeleton()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    named = {name for unit in source.initial_weights(0).units() for name in unit}
    assert "model.embed_tokens.weight" in named and "lm_head.weight" not in named
    assert named == {name for name, _ in model.named_parameters()}  # every parameter gets its initial value
    assert tied_adapted_layers(model) == []


def test_adapters_on_a_tied_head_keep_its_base_weight_tied_and_say_so():
    from harness.model.source import model_source

    cfg = load_config(ROOT / "configs" / "smollm2-135m-lora.yaml", ["lora.target_modules=[q_proj,lm_head]"])
    source = model_source(cfg.model, 49152, 64, lora=cfg.lora)
    model = source.skeleton()
    assert model.lm_head.base_layer.weight is model.model.embed_tokens.weight
    assert tied_adapted_layers(model) == ["lm_head"]
    named = {name for unit in source.initial_weights(0).units() for name in unit}
    assert named == {name for name, _ in model.named_parameters()}
    line = describe(model, list(source.lora_targets), cfg.lora, "bf16", lambda p: p.numel())
    assert line.endswith("; lm_head is tied to the input embeddings: its adapters change lm_head only (a merged "
                         "export unties them)")


@pytest.mark.parametrize("target, kind", [("embed_tokens", "Embedding"), ("input_layernorm", "LlamaRMSNorm")])
def test_targets_that_are_not_linear_layers_are_one_line(target, kind):
    llama = _meta("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256)
    with pytest.raises(HarnessError, match=rf"^lora.target_modules matches model\.\S*{target} \({kind}\): adapters go "
                                           r"on linear layers \(e.g. q_proj, v_proj, down_proj, lm_head\); name those$"):
        add_adapters(llama, LoraConfig(r=4, target_modules=["q_proj", target]))


def test_the_base_identity_tells_two_bases_of_one_architecture_apart(tmp_path):
    from tests.train.test_lora import write_base

    one, same, other = write_base(tmp_path / "a", 1), write_base(tmp_path / "b", 1), write_base(tmp_path / "c", 2)
    assert base_identity("x", str(one))["fingerprint"] == base_identity("y", str(same))["fingerprint"]
    assert base_identity("x", str(one))["fingerprint"] != base_identity("x", str(other))["fingerprint"]
    check_same_base(base_identity("x", str(one)), base_identity("y", str(same)), "step-1")
    with pytest.raises(HarnessError, match=r"step-1's adapters were trained on 'x' \(weights [0-9a-f]{32}\), but "
                                           r"model.pretrained is 'x' \(weights [0-9a-f]{32}\)"):
        check_same_base(base_identity("x", str(one)), base_identity("x", str(other)), "step-1")
    with pytest.raises(HarnessError, match="step-1 holds no adapters"):
        check_same_base(None, base_identity("x", str(one)), "step-1")


def test_a_frozen_weight_costs_four_flops_per_parameter_not_six():
    llama = _meta("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False)
    full = flops_per_token(llama, 32)
    weights = sum(p.numel() for n, p in llama.named_parameters() if "embed_tokens" not in n)
    add_adapters(llama, LoraConfig(r=4))
    adapters = sum(p.numel() for p in llama.parameters() if p.requires_grad)
    assert flops_per_token(llama, 32) == pytest.approx(full - 2 * weights + 6 * adapters)


def test_the_estimate_keeps_fp32_state_for_the_adapters_only():
    from harness.estimate.memory import estimate, meta_model

    overrides = [f"model.pretrained={FIXTURE_70B}"]
    lora = load_config(ROOT / "configs" / "llama3-70b-lora.yaml", overrides)
    full = load_config(ROOT / "configs" / "llama3-70b-lora.yaml", overrides + ["lora.r=0"])
    with_adapters, whole = estimate(lora, 8, meta_model(lora)), estimate(full, 8, meta_model(full))
    assert with_adapters["trainable"] == 207_093_760  # r=16 on 7 projections x 80 blocks
    state = [sum(r["backends"]["fsdp2"][k] for k in ("master", "gradients", "optimizer")) for r in (with_adapters, whole)]
    assert state[0] <= 0.05 * state[1]
    # The frozen base is this rank's bf16 shard: 2 bytes a weight, an eighth of the model.
    frozen = 2 * (with_adapters["parameters"] - with_adapters["trainable"]) / 8
    assert with_adapters["backends"]["fsdp2"]["working"] - whole["backends"]["fsdp2"]["working"] == pytest.approx(
        frozen, rel=0.01)
