"""Model building through transformers' Auto classes, block discovery and the FLOP count."""

from __future__ import annotations

import pytest
import torch

from harness.config import ModelConfig
from harness.errors import HarnessError
from harness.model import build_model, flops_per_token, next_token_loss, transformer_blocks

GPT2 = dict(model_type="gpt2", n_layer=2, n_embd=16, n_head=2, n_positions=32)


def test_seeded_from_scratch_build_is_identical():
    a = build_model(ModelConfig(config=GPT2), vocab_size=100, seed=7)
    b = build_model(ModelConfig(config=GPT2), vocab_size=100, seed=7)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name
    assert all(p.dtype == torch.float32 for p in a.parameters())
    assert a.get_input_embeddings().num_embeddings == 100


def test_blocks_and_flops_count_tied_head_once():
    model = build_model(ModelConfig(config=GPT2), vocab_size=100, seed=0)
    blocks = transformer_blocks(model)
    assert [type(b).__name__ for b in blocks] == ["GPT2Block", "GPT2Block"]
    total = sum(p.numel() for p in model.parameters())
    position_table = 32 * 16
    expected = 6 * (total - position_table) + 12 * 2 * 16 * 8
    assert flops_per_token(model, seq_len=8) == expected


def test_untied_llama_excludes_the_input_table():
    cfg = dict(model_type="llama", num_hidden_layers=1, hidden_size=16, intermediate_size=32,
               num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    model = build_model(ModelConfig(config=cfg), vocab_size=50, seed=0)
    total = sum(p.numel() for p in model.parameters())
    assert flops_per_token(model, seq_len=4) == 6 * (total - 50 * 16) + 12 * 1 * 16 * 4


def test_loss_is_next_token_cross_entropy():
    model = build_model(ModelConfig(config=GPT2), vocab_size=100, seed=0).eval()  # no dropout
    batch = torch.randint(0, 100, (2, 9))
    logits = model(input_ids=batch[:, :-1]).logits
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 100), batch[:, 1:].reshape(-1))
    torch.testing.assert_close(next_token_loss(model, batch), want)


def test_errors():
    with pytest.raises(HarnessError, match="not a transformers model"):
        build_model(ModelConfig(config=dict(model_type="no-such-model")), vocab_size=10, seed=0)
    with pytest.raises(HarnessError, match="embedding has 10 rows"):
        build_model(ModelConfig(config=dict(GPT2, vocab_size=10)), vocab_size=100, seed=0)
    with pytest.raises(HarnessError, match="model.pretrained './nowhere' could not be loaded"):
        build_model(ModelConfig(pretrained="./nowhere"), vocab_size=10, seed=0)
