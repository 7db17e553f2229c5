"""The hand-written single-device loop harness is measured against: the same transformers model
built from a harness config, fp32 weights, autocast to the compute dtype, AdamW (fused on CUDA),
no sharding, no loss scale, no checks. Random tokens: throughput does not depend on the text.

    python bench/plain_loop.py configs/llama-1b.yaml [--steps 10] [--precision bf16] [--out row.json]

Prints (and with --out writes) one JSON row: tokens/s and step time of `--steps` steps issued back
to back after a warm-up step (read once at the end, as harness runs between logged steps), MFU
against the device's dense peak, and peak device memory. bench/switches.py runs it as `plain`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.config import load_config  # noqa: E402
from harness.model import build_model, flops_per_token  # noqa: E402
from harness.numerics.precision import precision_policy  # noqa: E402
from harness.observe.metrics import device_peak_tflops, peak_memory_gb  # noqa: E402

GPT2_VOCAB = 50257


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(cfg, device: torch.device, steps: int, precision: str | None = None) -> dict:
    """Build the model on `device` and time `steps` steps issued back to back after one warm-up
    step, read once at the end. Returns the row (median-free: one timed stretch)."""
    policy = precision_policy(precision or cfg.precision)
    model = build_model(cfg.model, GPT2_VOCAB, cfg.train.seed).to(device)
    vocab = model.get_input_embeddings().num_embeddings
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2),
                                  weight_decay=cfg.train.weight_decay, fused=True)
    shape = (cfg.train.micro_batch_size, cfg.train.seq_len + 1)
    autocast = (torch.autocast(device.type, dtype=policy.compute_dtype) if policy.is_mixed
                else contextlib.nullcontext())

    def step() -> torch.Tensor:
        for _ in range(cfg.train.grad_accum):
            batch = torch.randint(0, vocab, shape, device=device)
            with autocast:
                logits = model(input_ids=batch[:, :-1]).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
            (loss / cfg.train.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    step()
    synchronize(device)
    started = time.perf_counter()
    losses = [step() for _ in range(steps)]
    final_loss = torch.stack(losses)[-1].item()
    synchronize(device)
    step_time = (time.perf_counter() - started) / steps
    tokens_per_s = cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.train.seq_len / step_time
    peak = device_peak_tflops(device, policy, cfg.log.peak_tflops)
    return {
        "run": f"plain-{policy.name}",
        "precision": policy.name,
        "params": sum(p.numel() for p in model.parameters()),
        "step_time_s": step_time,
        "tokens_per_s": tokens_per_s,
        "mfu": flops_per_token(model, cfg.train.seq_len) * tokens_per_s / (peak * 1e12) if peak else None,
        "mem_gb": peak_memory_gb(device) if device.type == "cuda" else None,
        "loss": final_loss,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    row = measure(load_config(args.config), device, args.steps, args.precision)
    print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
