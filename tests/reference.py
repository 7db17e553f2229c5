"""A plain single-process torch training loop: the reference every backend is compared with."""

from __future__ import annotations

import torch


def reference_fp32(config: str, overrides: list[str], world_size: int = 2, model=None) -> tuple[list[float], list[float]]:
    """Losses and pre-clip grad norms of a plain loop over the same model (or `model`, e.g. a
    peft model; its trainable parameters train), global batches (as a run on `world_size` ranks
    would see them) and hyper-parameters. No sharding, no harness loop."""
    from harness.config import load_config
    from harness.data import BatchShape, PackedSequences, TrainBatches, load_corpus
    from harness.model import build_model, next_token_loss
    from harness.numerics.optim import lr_at, param_groups

    cfg = load_config(config, overrides)
    t = cfg.train
    corpus = load_corpus(cfg.data)
    model = model if model is not None else build_model(cfg.model, corpus.vocab_size, t.seed)
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)
    sequences = PackedSequences(corpus.train, t.seq_len)
    order = TrainBatches(sequences, t.seed, BatchShape(t.micro_batch_size, t.grad_accum, world_size), rank=0)
    losses, norms = [], []
    for step in range(1, t.steps + 1):
        batch = sequences.batch(order.global_indices(step))
        loss = next_token_loss(model, batch)
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip).item())
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, t)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, norms


def previous_tokens(data_cfg):
    """The token stream as harness produced it before prepared shards (datasets' text builder
    with sample_by=document, one datasets.map over the whole corpus, every document's tokens then
    EOS, empty documents dropped): what every earlier curve and checkpoint was trained on."""
    import datasets
    import numpy as np

    from harness.data import load_tokenizer
    from harness.data.sources import find_source

    source = find_source(data_cfg)
    assert source.builder == "text", "the reference covers text corpora"
    dataset = datasets.load_dataset("text", data_files=list(source.files), split="train", sample_by="document")
    tokenizer = load_tokenizer(data_cfg.tokenizer)
    tokenizer.model_max_length = 1 << 60
    encoded = dataset.map(lambda batch: {"ids": tokenizer(list(batch["text"]), add_special_tokens=False)["input_ids"]},
                          batched=True, remove_columns=dataset.column_names)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pieces = [np.asarray(ids + eos) for ids in encoded["ids"] if ids]
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    return np.concatenate(pieces).astype(dtype)
