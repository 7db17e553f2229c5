"""`harness estimate`'s step-time model against measured step times, on the machine at hand.

    .venv/bin/python -m torch.distributed.run --standalone --nproc-per-node 2 bench/step_model.py \
        [--config configs/bench-cpu.yaml] [--steps 6] [--override KEY=VALUE ...] [--case NAME:OVERRIDES ...]

Each rank first measures what the model takes as given on a GPU (where they are data-sheet
numbers): its compute rate, from the hand-written single-device loop of bench/plain_loop.py
(every rank at once, so they share the machine as the ranks of a job do), and the collective
bandwidth of the process group (all-gather and all-reduce of 16 MiB). Then it times harness
steps for each case (FSDP2, HSDP, ZeRO-3 ...) and prints, side by side, the measured step time
and the model's prediction from those two rates: compute, communication, exposed, step.
`no overlap` is compute + all communication (the model assumes collectives overlap compute, which a
CPU whose cores compute every rank's math cannot fully give).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_CASES = {
    "fsdp2": [],
    "fsdp2 reduce every micro-batch": ["parallel.reduce_every_micro_batch=true"],
    "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"],
}
BUFFER_BYTES = 16 * 2**20


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        dist.barrier()
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bus_gbps(op: str, world: int, device: torch.device) -> float:
    """Measured bus bandwidth (nccl-tests' busbw) of `op` on a 16 MiB buffer, in Gbit/s."""
    numel = BUFFER_BYTES // 4
    if op == "all_gather_into_tensor":
        out = torch.empty(numel, device=device)
        shard = torch.ones(numel // world, device=device)
        seconds = _median_time(lambda: dist.all_gather_into_tensor(out, shard), 5)
        factor = 1.0
    else:
        tensor = torch.ones(numel, device=device)
        seconds = _median_time(lambda: dist.all_reduce(tensor), 5)
        factor = 2.0
    return factor * BUFFER_BYTES * (world - 1) / world / seconds * 8 / 1e9


def compute_rate(cfg, device: torch.device, steps: int) -> float:
    """Training FLOP/s of this rank's share of a step (its micro-batches), single-device."""
    from bench.plain_loop import measure
    from harness.model import build_model, flops_per_token

    row = measure(cfg, device, steps)
    model = build_model(cfg.model, 50257, cfg.train.seed)
    tokens = cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.train.seq_len
    return flops_per_token(model, cfg.train.seq_len) * tokens / row["step_time_s"]


def harness_step_time(cfg, info, device: torch.device, steps: int) -> float:
    from harness.train.build import build_loop

    trainer = build_loop(cfg, info, device)
    trainer.run_step(1)
    times = []
    for step in range(2, steps + 2):
        dist.barrier()
        started = time.perf_counter()
        trainer.run_step(step)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def predict(cfg, world: int, flops_per_s: float, gbps: float):
    from harness.estimate.memory import estimate, meta_model
    from harness.estimate.step import predict_step
    from harness.estimate.step_time import Cluster, Gpu

    peak = flops_per_s / 1e12
    # The measured rate already includes the optimizer step and every overhead of the loop.
    device = Gpu("this machine's rank", {"fp32": peak, "bf16": peak, "fp16": peak}, 1e6, 1e12, gbps, gbps)
    cluster = Cluster(world, 1, device, gbps, gbps, 1.0, 1e6)
    model = meta_model(cfg)
    return predict_step(cfg, cluster, model, estimate(cfg, world, model))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/bench-cpu.yaml")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--override", action="append", default=[])
    parser.add_argument("--case", action="append", default=[], help="NAME:KEY=VALUE,KEY=VALUE (replaces the defaults)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core per rank, as launch/local.sh gives a 2-core machine's ranks

    from harness.config import load_config
    from harness.runtime.dist import start

    info, device = start("auto", 300)
    cases = DEFAULT_CASES
    if args.case:
        cases = {spec.split(":", 1)[0]: [o for o in spec.split(":", 1)[1].split(",") if o] for spec in args.case}
    base = [*args.override, "log.progress=off", "eval.every=0", "checkpoint.every=0", "run.dir=runs/bench-step-model"]
    cfg = load_config(args.config, base)
    rate = compute_rate(cfg, device, args.steps)
    rates = [None] * info.world_size
    dist.all_gather_object(rates, rate)
    rate = min(rates)  # the slowest rank sets the step
    gbps = bus_gbps("all_gather_into_tensor", info.world_size, device)
    if info.rank == 0:
        print(f"measured: {rate / 1e9:,.2f} GFLOP/s per rank (hand-written loop, all ranks at once); "
              f"all-gather bus bandwidth {gbps:,.2f} Gbit/s over {info.world_size} ranks", flush=True)
        print("| case | measured s/step | predicted s/step | predicted / measured | compute | comm | exposed | no overlap |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, overrides in cases.items():
        case_cfg = load_config(args.config, [*base, *overrides])
        measured = harness_step_time(case_cfg, info, device, args.steps)
        if info.rank == 0:
            p = predict(case_cfg, info.world_size, rate, gbps)
            print(f"| {name} | {measured:.3f} | {p.step_s:.3f} | {p.step_s / measured:.2f} | {p.compute_s:.3f} "
                  f"| {p.comm_s:.3f} | {p.exposed_s:.3f} | {p.compute_s + p.comm_s:.3f} |", flush=True)
    from harness.runtime.dist import shutdown

    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
