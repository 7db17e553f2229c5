"""The hand-written single-device loop harness is measured against: the same transformers model
built from a harness config, fp32 weights, autocast to the compute dtype, AdamW (fused on CUDA),
no sharding, no loss scale, no checks. Random tokens: throughput does not depend on the text.

    python bench/plain_loop.py configs/llama-1b.yaml [--steps 10] [--precision bf16] [--out row.json]

Prints (and with --out writes) one JSON row: median tokens/s and step time over the steps after
the first two, MFU against the device's dense peak, and peak device memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.config import load_config  # noqa: E402
from harness.metrics import device_peak_tflops, peak_memory_gb  # noqa: E402
from harness.model import build_model, flops_per_token  # noqa: E402
from harness.precision import precision_policy  # noqa: E402

GPT2_VOCAB = 50257


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    cfg = load_config(args.config)
    policy = precision_policy(args.precision or cfg.precision)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg.model, GPT2_VOCAB, cfg.train.seed).to(device)
    vocab = model.get_input_embeddings().num_embeddings
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2),
                                  weight_decay=cfg.train.weight_decay, fused=device.type == "cuda")
    shape = (cfg.train.micro_batch_size, cfg.train.seq_len + 1)
    generator = torch.Generator().manual_seed(0)
    autocast = (torch.autocast(device.type, dtype=policy.compute_dtype) if policy.is_mixed
                else contextlib.nullcontext())
    times = []
    for _ in range(args.steps):
        batches = [torch.randint(0, vocab, shape, generator=generator).to(device) for _ in range(cfg.train.grad_accum)]
        synchronize(device)
        started = time.perf_counter()
        for batch in batches:
            with autocast:
                logits = model(input_ids=batch[:, :-1]).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
            (loss / cfg.train.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - started)
    step_time = statistics.median(times[2:] if len(times) > 3 else times)
    tokens_per_s = cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.train.seq_len / step_time
    peak = device_peak_tflops(device, policy, cfg.log.peak_tflops)
    row = {
        "run": f"plain-{policy.name}",
        "precision": policy.name,
        "params": sum(p.numel() for p in model.parameters()),
        "step_time_s": step_time,
        "tokens_per_s": tokens_per_s,
        "mfu": flops_per_token(model, cfg.train.seq_len) * tokens_per_s / (peak * 1e12) if peak else None,
        "mem_gb": peak_memory_gb(device),
        "final_loss": loss.item(),
    }
    print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
