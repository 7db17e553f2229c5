"""A transformer written in plain torch (no transformers), trained by the harness on 2 ranks.

    torchrun --standalone --nproc-per-node 2 examples/plain_torch_transformer.py [key.sub=value ...]

The harness brings what it brings to any model: FSDP2 or ZeRO sharding of each block
(`blocks=`), fp32 master weights, the one loss-scale and clipping decision, checkpoints, metrics,
the watchdog. The model is built on the meta device (or as ZeRO-3 partitions): the harness calls
`build` inside its own context and writes each rank's pieces of the initial weights, one block at
a time, from each layer's own `reset_parameters()`. The data is the config's corpus (bundled
Shakespeare, GPT-2 tokens); the loss is the built-in next-token cross entropy, which takes the
logits this model's forward returns.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import harness

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
VOCAB = 50304  # GPT-2's 50,257 tokens (the config's tokenizer), rounded up to a multiple of 64


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=-1)
        q, k, v = (t.view(rows, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(rows, length, width))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = VOCAB, width: int = 64, layers: int = 2, heads: int = 4, positions: int = 1024):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(positions, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.size(1), device=input_ids.device)
        x = self.tokens(input_ids) + self.positions(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def main(overrides: list[str]) -> harness.RunSummary:
    cfg = harness.load_config(CONFIG, overrides=["run.name=plain-torch-transformer", *overrides])
    trainer = harness.Trainer(cfg, model=TinyGPT, blocks=lambda model: list(model.blocks))
    return trainer.fit()


if __name__ == "__main__":
    summary = main(sys.argv[1:])
    if os.environ.get("RANK", "0") == "0":
        print(f"final loss {summary.final_loss:.4f} (first {summary.first_loss:.4f})", flush=True)
    # Stopped by a signal (a checkpoint was saved): 75 under Slurm, so the job script requeues.
    # exit_process skips gloo's teardown, which can abort at exit (pytorch #190489).
    harness.exit_process(harness.stopped_exit_code() if summary.stopped else 0)
