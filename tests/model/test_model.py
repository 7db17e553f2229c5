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
    assert a.get_input_embeddings().num_embeddings == 128  # 100 tokens, rows padded to a multiple of 64


def test_from_scratch_rows_are_padded_to_the_multiple_and_explicit_sizes_kept():
    def rows(vocab_size, **model):
        return build_model(ModelConfig(**model), vocab_size=vocab_size, seed=0).get_output_embeddings().weight.shape[0]

    assert rows(50257, config=GPT2) == 50304  # nanoGPT's padded GPT-2 vocabulary
    assert rows(128, config=GPT2) == 128
    assert rows(100, config=GPT2, vocab_multiple_of=1) == 100
    assert rows(100, config=GPT2, vocab_multiple_of=128) == 128
    assert rows(100, config=dict(GPT2, vocab_size=101)) == 101  # the user's own size wins


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
    assert flops_per_token(model, seq_len=4) == 6 * (total - 64 * 16) + 12 * 1 * 16 * 4  # 50 rows padded to 64


def test_loss_is_next_token_cross_entropy():
    model = build_model(ModelConfig(config=GPT2), vocab_size=100, seed=0).eval()  # no dropout
    batch = torch.randint(0, 100, (2, 9))
    logits = model(input_ids=batch[:, :-1]).logits
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    torch.testing.assert_close(next_token_loss(model, batch), want)


def test_errors():
    with pytest.raises(HarnessError, match="not a transformers model"):
        build_model(ModelConfig(config=dict(model_type="no-such-model")), vocab_size=10, seed=0)
    with pytest.raises(HarnessError, match="embedding has 10 rows"):
        build_model(ModelConfig(config=dict(GPT2, vocab_size=10)), vocab_size=100, seed=0)
    with pytest.raises(HarnessError, match="model.pretrained './nowhere' does not exist; point it at a local"):
        build_model(ModelConfig(pretrained="./nowhere"), vocab_size=10, seed=0)


@pytest.mark.parametrize("config", [GPT2, dict(model_type="llama", num_hidden_layers=1, hidden_size=16,
                                               intermediate_size=32, num_attention_heads=2, num_key_value_heads=2,
                                               tie_word_embeddings=False)], ids=["gpt2-tied", "llama"])
def test_chunked_loss_equals_the_plain_loss_and_gradients(config):
    from harness.model.loss import enable_chunked_loss, per_sequence_loss

    batch = torch.randint(0, 100, (3, 11))
    plain = build_model(ModelConfig(config=config), vocab_size=100, seed=0).eval()
    chunked = build_model(ModelConfig(config=config), vocab_size=100, seed=0).eval()
    enable_chunked_loss(chunked)
    want = next_token_loss(plain, batch)
    got = next_token_loss(chunked, batch, chunk_tokens=7)  # 30 tokens: chunks of 7, 7, 7, 7, 2
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    want.backward()
    got.backward()
    for (name, a), b in zip(chunked.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(per_sequence_loss(chunked, batch, 7), per_sequence_loss(plain, batch), rtol=1e-6, atol=0)
        # Without targets the head is the plain head again (generation, export).
        torch.testing.assert_close(chunked(input_ids=batch).logits, plain(input_ids=batch).logits)


def test_chunked_loss_refuses_models_that_change_logits_after_the_head():
    from harness.model.loss import enable_chunked_loss

    gemma2 = dict(model_type="gemma2", num_hidden_layers=1, hidden_size=16, intermediate_size=32, head_dim=8,
                  num_attention_heads=2, num_key_value_heads=1, final_logit_softcapping=30.0)
    model = build_model(ModelConfig(config=gemma2, attn_implementation="eager"), vocab_size=100, seed=0)
    with pytest.raises(HarnessError, match="final_logit_softcapping=30.0.*train.loss_chunk_tokens=0"):
        enable_chunked_loss(model)


def test_a_tokenizer_that_is_not_the_pretrained_models_is_refused_naming_both():
    from harness.data.corpus import load_tokenizer
    from harness.model.build import check_tokenizer_fits, model_spec

    smol = model_spec(ModelConfig(pretrained="bundled:smollm2-135m"), 0).hf_config
    check_tokenizer_fits(smol, load_tokenizer("bundled:smollm2-135m"), "bundled:smollm2-135m", "bundled:smollm2-135m")
    with pytest.raises(HarnessError, match="data.tokenizer 'bundled:gpt2' has 50,257 tokens but model.pretrained "
                                           "'bundled:smollm2-135m' embeds 49,152"):
        check_tokenizer_fits(smol, load_tokenizer("bundled:gpt2"), "bundled:gpt2", "bundled:smollm2-135m")
    # A vocabulary that fits, but another tokenizer's ids: Llama 3's end of text is no GPT-2 token.
    llama3 = type(smol)(vocab_size=128256, bos_token_id=128000, eos_token_id=[128001, 128009])
    with pytest.raises(HarnessError, match="has bos_token_id=128000, which is not a special token of data.tokenizer "
                                           "'bundled:gpt2'"):
        check_tokenizer_fits(llama3, load_tokenizer("bundled:gpt2"), "bundled:gpt2", "/models/llama3")


def test_from_scratch_models_name_their_tokenizers_special_tokens():
    from harness.data.corpus import load_tokenizer
    from harness.model.build import model_spec, special_token_ids

    config = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2}
    spec = model_spec(ModelConfig(config=config), 50257, special_tokens=special_token_ids(load_tokenizer("bundled:gpt2")))
    assert spec.hf_config.bos_token_id == spec.hf_config.eos_token_id == 50256
    own = model_spec(ModelConfig(config={**config, "eos_token_id": 7}), 50257, special_tokens={"eos_token_id": 50256})
    assert own.hf_config.eos_token_id == 7
