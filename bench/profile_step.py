"""Where a harness step's device time goes: a few optimizer steps under torch.profiler, kernels
summed by kind (matmul, attention, element-wise/fused, reductions, copies, optimizer, collectives)
and the busy fraction of the step (kernel time over wall time).

    python bench/profile_step.py configs/llama-1b.yaml [override ...] [--steps 3] [--top 25]
    # CPU smoke (operator times, no kernels):
    python bench/profile_step.py configs/tiny.yaml train.seq_len=32 train.micro_batch_size=2

Prints a Markdown table by kind and the top kernels by self device time. One process, one device.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Kernel name fragments -> kind, first match wins (cuBLAS/CUTLASS names, flash/cuDNN attention,
# Triton kernels from inductor, aten's vectorized element-wise and reduction kernels).
KINDS = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("matmul", ("gemm", "cutlass", "sm90_xmma", "xmma", "nvjet", "cublas", "wgmma", "::mm", "::addmm", "::bmm")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("collective/copy", ("nccl", "memcpy", "memset", "copy_", "cat", "split_with_sizes", "chunk_cat")),
    ("cross-entropy", ("log_softmax", "nll_loss", "softmax")),
    ("fused (triton)", ("triton",)),
    ("reduction", ("reduce", "norm")),
    ("element-wise", ("elementwise", "vectorized", "unrolled")),
)


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, fragments in KINDS:
        if any(f in lowered for f in fragments):
            return kind
    return "other"


def _device_time_us(event) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, attr, None)
        if value is not None:
            return float(value)
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    from harness.config import load_config
    from harness.observe.step_counter import host_read
    from harness.runtime import dist as hdist
    from harness.runtime.process import exit_process
    from harness.train.build import build_loop
    from harness.train.rows import pack_pending

    info, device = hdist.start(timeout_s=900)
    cfg = load_config(args.config, ["run.dir=runs/bench-profile", f"train.steps={args.steps + 3}", "eval.every=0",
                                    "log.progress=off", "checkpoint.every=0", *args.overrides])
    trainer = build_loop(cfg, info, device)
    for step in (1, 2):  # compilation, first allocations
        trainer.run_step(step)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        started = time.perf_counter()
        pending = [trainer.train_step(step) for step in range(3, 3 + args.steps)]
        host_read(pack_pending(pending))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall_us = (time.perf_counter() - started) * 1e6
    if info.is_main:
        report(prof, wall_us, args.steps, args.top, device.type == "cuda")
    if trainer.prefetched is not None:
        trainer.prefetched.close()
    hdist.shutdown()
    exit_process(0)


def report(prof, wall_us: float, steps: int, top: int, on_gpu: bool) -> None:
    from torch.autograd import DeviceType

    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        device_us = _device_time_us(event)
        if on_gpu and getattr(event, "device_type", None) != DeviceType.CUDA:
            continue
        if not on_gpu:
            device_us = float(getattr(event, "self_cpu_time_total", 0.0))
            if event.key.startswith(("ProfilerStep", "aten::to", "aten::empty")) or device_us <= 0:
                continue
        by_kind[kind_of(event.key)] += device_us
        by_name[event.key] += device_us
    busy = sum(by_kind.values())
    print(f"{steps} steps, wall {wall_us / 1e3 / steps:.1f} ms/step, "
          f"{'kernel' if on_gpu else 'operator self'} time {busy / 1e3 / steps:.1f} ms/step "
          f"({busy / wall_us:.1%} of wall{' on one stream' if on_gpu else ''})")
    print("\n| kind | ms/step | share of kernel time |\n|---|---|---|")
    for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {us / 1e3 / steps:.1f} | {us / busy:.1%} |")
    print("\n| top kernel | kind | ms/step |\n|---|---|---|")
    for name, us in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]:
        print(f"| {name[:90]} | {kind_of(name)} | {us / 1e3 / steps:.2f} |")


if __name__ == "__main__":
    main()
