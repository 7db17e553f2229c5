"""Model families past GPT-2 and Llama, trained from scratch on 2 real gloo ranks on FSDP2 and
ZeRO-3: each finds its transformer blocks, trains, and computes the same losses on both backends.
Gemma 2 has no sdpa attention in transformers: the default falls back to eager with one note.
One spawn for all of them (each rank pays the imports once)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.distributed import run_on_ranks

pytestmark = pytest.mark.spawns

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
SHAPE = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, attention_dropout=0.0)
FAMILIES = {
    "gemma2": dict(SHAPE, model_type="gemma2", head_dim=8),
    "qwen2": dict(SHAPE, model_type="qwen2"),
    "mistral": dict(SHAPE, model_type="mistral"),
    "phi3": dict(SHAPE, model_type="phi3"),
    "gpt_neox": dict(SHAPE, model_type="gpt_neox", hidden_dropout=0.0),
    "qwen3_moe": dict(SHAPE, model_type="qwen3_moe", head_dim=8, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32),
}
CLASSES = {"gemma2": "Gemma2ForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
           "phi3": "Phi3ForCausalLM", "gpt_neox": "GPTNeoXForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
BACKENDS = {"fsdp2": ["parallel.backend=fsdp2"], "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"]}
STEPS = 3


def _train_families(run_root: str) -> dict:
    from harness.config import load_config
    from harness.model import model_spec, transformer_blocks
    from harness.runtime import dist as hdist
    from harness.train.build import build_loop

    info = hdist.rank_info_from_env()
    device = torch.device("cpu")
    hdist.init_process_group(info, "gloo", 300, device)
    out: dict = {}
    for family, model_config in FAMILIES.items():
        for backend, backend_args in BACKENDS.items():
            label = f"{family}-{backend}"
            cfg = load_config(TINY, [f"run.dir={run_root}/{label}", f"model.config={json.dumps(model_config)}",
                                     "precision=fp32", f"train.steps={STEPS}", "eval.every=0", "log.progress=off",
                                     *backend_args])
            trainer = build_loop(cfg, info, device)
            spec = model_spec(cfg.model, 50257, cfg.train.seq_len)
            trainer.fit()
            model = trainer.backend.module
            rows = [json.loads(line) for line in Path(run_root, label, "metrics.jsonl").read_text().splitlines()]
            out[label] = {
                "class": type(model).__name__.removeprefix("FSDP"),  # fully_shard's subclass
                "blocks": len(transformer_blocks(model)),
                "attention": model.config._attn_implementation,
                "notes": list(spec.notes),
                "losses": [row["loss"] for row in rows],
                "norms": [row["grad_norm"] for row in rows],
            }
    return out


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    return run_on_ranks(_train_families, 2, str(tmp_path_factory.mktemp("families")), timeout=900)[0]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_trains_on_fsdp2_and_zero3_with_the_same_losses(families, family):
    fsdp2, zero3 = families[f"{family}-fsdp2"], families[f"{family}-zero3"]
    assert fsdp2["class"] == zero3["class"] == CLASSES[family]
    assert fsdp2["blocks"] == zero3["blocks"] == FAMILIES[family]["num_hidden_layers"]
    assert len(fsdp2["losses"]) == STEPS and all(math.isfinite(x) for x in fsdp2["losses"] + fsdp2["norms"])
    assert fsdp2["losses"][-1] < fsdp2["losses"][0], fsdp2["losses"]  # it learns
    assert zero3["losses"] == pytest.approx(fsdp2["losses"], rel=1e-5)
    assert zero3["norms"] == pytest.approx(fsdp2["norms"], rel=1e-4)


def test_gemma2_falls_back_to_eager_attention_with_one_note(families):
    for backend in BACKENDS:
        run = families[f"gemma2-{backend}"]
        assert run["attention"] == "eager"
        assert run["notes"] == ["Gemma2ForCausalLM has no sdpa attention in transformers; "
                                "using model.attn_implementation=eager"]
    for family in FAMILIES:
        if family != "gemma2":
            assert families[f"{family}-fsdp2"]["attention"] == "sdpa" and not families[f"{family}-fsdp2"]["notes"]
