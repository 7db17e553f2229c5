"""Your own dataset and your own loss, on the harness's model, sharding and checkpoints (2 ranks).

    torchrun --standalone --nproc-per-node 2 examples/custom_data_and_loss.py [key.sub=value ...]

The task: copy a random string of symbols. Every item is a dict with `input_ids` and `labels`
(labels aligned with the inputs, -100 where no loss is taken, as transformers has it): the first
half is the string, the second half its copy, and only the copy is trained on. The data is
generated here from a seed, so it is the project's own to ship. The harness batches and orders the
map-style dataset itself (a permutation per epoch seeded by train.seed), so `resume=auto` continues
exactly. The loss is label-smoothed cross entropy, returned as (sum over tokens, token count): the
harness divides, as its built-in loss does. A callback prints each evaluation.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import harness

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
SYMBOLS = range(200, 216)  # 16 GPT-2 token ids (the config's model and tokenizer), used as an alphabet
HALF = 16


class CopyTask:
    """Item i: a seeded random string and its copy; map-style (len and [i]), so the harness shuffles it."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        string = torch.tensor(SYMBOLS)[torch.randint(len(SYMBOLS), (HALF,), generator=generator)]
        input_ids = torch.cat([string, string])
        labels = input_ids.clone()
        labels[:HALF] = -100  # the string itself is context; the copy carries the loss
        return {"input_ids": input_ids, "labels": labels}


def smoothed_copy_loss(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of per-token losses, number of tokens) over the labelled positions."""
    logits = model(batch["input_ids"]).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100,
                             label_smoothing=0.1, reduction="sum")
    return losses, (targets != -100).sum()


class PrintEval(harness.Callback):
    def on_eval(self, step: int, eval_loss: float) -> None:
        if os.environ.get("RANK", "0") == "0":
            print(f"copy task: eval loss {eval_loss:.4f} after step {step}", flush=True)


def main(overrides: list[str]) -> harness.RunSummary:
    cfg = harness.load_config(CONFIG, overrides=["run.name=custom-data-and-loss", "train.seq_len=32", *overrides])
    trainer = harness.Trainer(cfg, data=CopyTask(4096, seed=1), eval_data=CopyTask(64, seed=2),
                              loss=smoothed_copy_loss, callbacks=[PrintEval()])
    return trainer.fit()


if __name__ == "__main__":
    summary = main(sys.argv[1:])
    if os.environ.get("RANK", "0") == "0":
        print(f"final loss {summary.final_loss:.4f} (first {summary.first_loss:.4f})", flush=True)
    # Stopped by a signal (a checkpoint was saved): 75 under Slurm, so the job script requeues.
    # exit_process skips gloo's teardown, which can abort at exit (pytorch #190489).
    harness.exit_process(harness.stopped_exit_code() if summary.stopped else 0)
