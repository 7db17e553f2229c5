"""Step time of every backend, measured side by side in one run (so only ratios matter).

    .venv/bin/python -m torch.distributed.run --standalone --nproc-per-node 2 bench/backend_step_time.py \
        [--config configs/demo.yaml] [--precision fp32] [--steps 8] [--rounds 3] [--offload] [--override KEY=VALUE ...]

Builds FSDP2 and ZeRO-1/2/3 trainers over the same config, then times `--steps` optimizer steps
of each in turn, `--rounds` times (interleaved, so machine noise hits all backends alike), and
prints the median step time and the ratio to FSDP2. With --offload, each backend also runs with
parallel.offload (optimizer; ZeRO-3 also params) and the ratio to the same backend without it is
printed. Rank 0 prints.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

BACKENDS = {
    "fsdp2": ["parallel.backend=fsdp2"],
    "zero1": ["parallel.backend=deepspeed", "parallel.zero_stage=1"],
    "zero2": ["parallel.backend=deepspeed", "parallel.zero_stage=2"],
    "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"],
    # DeepSpeed's own ZeRO-3 units (a hook pair per module with parameters) next to harness's default.
    "zero3-module": ["parallel.backend=deepspeed", "parallel.zero_stage=3", "parallel.zero3_unit=module"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--offload", action="store_true", help="also time each backend with parallel.offload")
    parser.add_argument("--override", action="append", default=[], help="a config override for every backend")
    args = parser.parse_args()
    variants = dict(BACKENDS)
    if args.offload:
        variants.update({f"{name}+offload": extra + ["parallel.offload=optimizer"] for name, extra in BACKENDS.items()})
        variants["zero3+params"] = BACKENDS["zero3"] + ["parallel.offload=params"]

    from harness.config import load_config
    from harness.runtime import dist as hdist
    from harness.train.build import build_loop

    info, device = hdist.start(timeout_s=600)
    total = args.steps * args.rounds + 1
    trainers = {}
    for name, extra in variants.items():
        cfg = load_config(
            args.config,
            [f"run.dir=runs/bench-{name}", f"precision={args.precision}", f"train.steps={total}", "eval.every=0",
             "log.progress=off", *args.override, *extra],
        )
        trainers[name] = build_loop(cfg, info, device)
        trainers[name].run_step(1)  # warm-up: first-step allocations and lazy init
    times: dict[str, list[float]] = {name: [] for name in trainers}
    step = 2
    for _ in range(args.rounds):
        for name, trainer in trainers.items():
            for offset in range(args.steps):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                trainer.run_step(step + offset)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - started)
        step += args.steps
    if info.is_main:
        base = statistics.median(times["fsdp2"])
        print(f"config {args.config}, precision {args.precision}, world {info.world_size}, "
              f"tokens/step {trainers['fsdp2'].tokens_per_step}, {args.rounds} x {args.steps} steps each, device {device}")
        print(f"{'backend':<15} {'median s/step':>14} {'ratio vs fsdp2':>15} {'vs no offload':>14}")
        for name, values in times.items():
            median = statistics.median(values)
            own = statistics.median(times[name.split("+")[0]])
            versus = f"{median / own:>14.2f}" if "+" in name else ""
            print(f"{name:<15} {median:>14.4f} {median / base:>15.2f} {versus}")
            if "+" in name:
                print(f"{'':<15} {trainers[name].backend.name}")
    hdist.shutdown()


if __name__ == "__main__":
    main()
    from harness.runtime.process import exit_process

    exit_process(0)
