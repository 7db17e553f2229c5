"""A plain single-process torch training loop: the reference every backend is compared with."""

from __future__ import annotations

import torch


def reference_fp32(config: str, overrides: list[str], world_size: int = 2) -> tuple[list[float], list[float]]:
    """Losses and pre-clip grad norms of a plain loop over the same model, global batches (as a
    run on `world_size` ranks would see them) and hyper-parameters. No sharding, no harness loop."""
    from harness.config import load_config
    from harness.data import BatchShape, PackedSequences, TrainBatches, load_corpus
    from harness.model import build_model, next_token_loss
    from harness.optim import lr_at, param_groups

    cfg = load_config(config, overrides)
    t = cfg.train
    corpus = load_corpus(cfg.data)
    model = build_model(cfg.model, corpus.vocab_size, t.seed)
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
