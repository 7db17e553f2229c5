"""What checkpointing costs the training loop: no saves vs synchronous vs asynchronous saves,
measured side by side in one run (so only the ratios matter).

    .venv/bin/python -m torch.distributed.run --standalone --nproc-per-node 2 bench/checkpoint_save.py \
        [--config configs/smollm2-135m.yaml] [--precision fp32] [--steps 6] [--every 2] [--rounds 2]

One trainer; each round runs `--steps` optimizer steps three times: without checkpoints, saving
every `--every` steps synchronously, and saving every `--every` steps with checkpoint.async_save
(the loop drives the checkpointer exactly as harness.train.loop.Loop.fit does). Saves fall mid-round, never on a
round's last step, as in a long run where the next save comes long after. A round ends by waiting
for any save still in flight. Rank 0 prints the median wall time of each mode, the time
checkpointing added to it, and how long the loop was blocked per save (copy, commit, waits).
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/smollm2-135m.yaml")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", default="runs/bench-checkpoint")
    args = parser.parse_args()
    if args.steps <= args.every:
        parser.error("--steps must exceed --every: saves happen mid-round, never at a round's last step")

    from harness.checkpoint import Checkpointer
    from harness.config import load_config
    from harness.runtime import dist as hdist
    from harness.train.build import build_loop

    info, device = hdist.start(timeout_s=600)
    total = 3 * args.steps * args.rounds + 1
    cfg = load_config(args.config, [f"run.dir={args.dir}", f"precision={args.precision}", f"train.steps={total}",
                                    "eval.every=0", "log.progress=off", "checkpoint.keep_last=1"])
    trainer = build_loop(cfg, info, device)
    trainer.run_step(1)  # warm-up: first-step allocations and lazy init

    def checkpointer(async_save: bool) -> Checkpointer:
        mode_cfg = copy.deepcopy(cfg)
        mode_cfg.checkpoint.async_save = async_save
        mode_cfg.checkpoint.dir = f"{args.dir}/{'async' if async_save else 'sync'}"
        return Checkpointer(mode_cfg, trainer.checkpointer.model_config_json, info, device)

    modes = {"none": None, "sync": checkpointer(False), "async": checkpointer(True)}
    wall: dict[str, list[float]] = {name: [] for name in modes}
    blocked: dict[str, list[float]] = {name: [] for name in modes}
    step = 2
    for _ in range(args.rounds):
        for name, saver in modes.items():
            if saver is not None:
                trainer.checkpointer = saver  # the previous mode's saves are all committed
            started = time.perf_counter()
            for offset in range(args.steps):
                agreed = trainer.run_step(step).agreement
                if saver is None:
                    step += 1
                    continue
                save_started = time.perf_counter()
                saver.commit_if_written(agreed.saves_written)
                if (offset + 1) % args.every == 0 and offset + 1 < args.steps:
                    trainer.save_checkpoint(step, blocking=False)
                blocked[name].append(time.perf_counter() - save_started)
                step += 1
            if saver is not None:
                finish_started = time.perf_counter()
                saver.finish()
                blocked[name].append(time.perf_counter() - finish_started)
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall[name].append(time.perf_counter() - started)
    if info.is_main:
        saves = (args.steps - 1) // args.every
        base = statistics.median(wall["none"])
        print(f"config {args.config}, precision {args.precision}, world {info.world_size}, device {device}, "
              f"{args.rounds} rounds x {args.steps} steps, a save every {args.every} steps ({saves} per round)")
        print(f"{'mode':<6} {'median wall s':>14} {'added by saves s':>17} {'blocked per save s':>19}")
        for name in modes:
            median = statistics.median(wall[name])
            per_save = sum(blocked[name]) / (args.rounds * saves) if modes[name] is not None else 0.0
            print(f"{name:<6} {median:>14.2f} {median - base:>17.2f} {per_save:>19.2f}")
        sync_cost = statistics.median(wall["sync"]) - base
        async_cost = statistics.median(wall["async"]) - base
        if sync_cost > 0:
            print(f"async / sync time added by checkpointing: {async_cost / sync_cost:.2f}")
        shutil.rmtree(Path(args.dir), ignore_errors=True)
    hdist.shutdown()


if __name__ == "__main__":
    main()
    from harness.runtime.process import exit_process

    exit_process(0)
