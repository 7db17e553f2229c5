"""harness export of a LoRA checkpoint: --adapter writes a folder peft loads, --merge streams the
base with the adapters added; both give the logits of harness's own adapted model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.config import load_config
from tests.train.test_lora import TINY, launch, lora_overrides, write_base

pytestmark = pytest.mark.spawns

ROOT = Path(__file__).resolve().parents[2]
HARNESS = str(Path(sys.executable).parent / "harness")


# Every projection, and the head the base ties to its input embeddings: the merge unties them
# (the embeddings stay the base's, the head gets its adapters).
TARGETS = "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head]"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-export")
    base = write_base(root / "base", seed=11, tie_word_embeddings=True)
    run = launch(root / "run", base, "checkpoint.every=6", TARGETS)
    assert run.returncode == 0, run.stderr[-2000:]
    return base, root / "run" / "checkpoints" / "step-00000006"


def export(*args) -> subprocess.CompletedProcess:
    return subprocess.run([HARNESS, "export", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)


def harness_logits(checkpoint: Path, base: Path, tokens: torch.Tensor) -> torch.Tensor:
    """harness's own adapted model (its skeleton, the base's weights, the checkpoint's adapters)."""
    from harness.checkpoint import ShardReader, read_manifest
    from harness.model.build import materialize_on
    from harness.model.source import model_source
    from harness.model.weights import fill_flat_views

    cfg = load_config(TINY, lora_overrides(base, checkpoint.parent, TARGETS))
    source = model_source(cfg.model, 50257, cfg.train.seq_len, lora=cfg.lora)
    model = source.skeleton()
    materialize_on(model, torch.device("cpu"))
    fill_flat_views({n: [(0, p.detach().view(-1))] for n, p in model.named_parameters()}, source.initial_weights(0))
    reader = ShardReader(checkpoint, read_manifest(checkpoint))
    with torch.no_grad():
        for name in reader.names():
            model.get_parameter(name).copy_(reader.full_tensor(name))
        return model(tokens).logits


def test_adapter_and_merged_exports_give_harnesss_logits(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, checkpoint = trained
    tokens = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    want = harness_logits(checkpoint, base, tokens)
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        assert not torch.allclose(plain(tokens).logits, want, atol=1e-4)  # the adapters changed the model

    adapter = export(checkpoint, tmp_path / "adapter", "--adapter")
    assert adapter.returncode == 0, adapter.stderr[-2000:]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                           tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(tokens).logits, want, rtol=1e-5, atol=1e-5)

    merged = export(checkpoint, tmp_path / "merged", "--merge")
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert "read back and compared" in merged.stdout
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert not model.config.tie_word_embeddings
    torch.testing.assert_close(model.model.embed_tokens.weight, plain.model.embed_tokens.weight, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, want, rtol=1e-4, atol=1e-4)
    assert len(AutoTokenizer.from_pretrained(tmp_path / "merged")) == 50257  # the base's tokenizer came along

    half = export(checkpoint, tmp_path / "merged-bf16", "--merge", "--dtype", "bf16")
    assert half.returncode == 0, half.stderr[-2000:]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged-bf16").dtype == torch.bfloat16


def test_exports_that_do_not_fit_the_checkpoint_are_one_line(trained, tmp_path):
    base, checkpoint = trained
    whole = export(checkpoint, tmp_path / "whole")
    assert whole.returncode == 2
    assert whole.stderr.strip().splitlines() == [
        "harness: error: step-00000006 holds LoRA adapters, not a whole model: export them with --adapter (a peft "
        "adapter folder) or --merge (the base with the adapters added)"]
    full = subprocess.run(["launch/local.sh", "2", TINY, f"run.dir={tmp_path / 'full'}", "log.progress=off",
                           "eval.every=0", "train.steps=1", "checkpoint.every=1"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    for flag in ("--adapter", "--merge"):
        refused = export(tmp_path / "full" / "checkpoints" / "step-00000001", tmp_path / "out", flag)
        assert refused.returncode == 2
        assert refused.stderr.strip().splitlines() == [
            f"harness: error: step-00000001 is a full fine-tune's checkpoint (it holds no LoRA adapters): {flag} "
            "exports adapters; export the whole model without it"]
        assert not (tmp_path / "out").exists()
