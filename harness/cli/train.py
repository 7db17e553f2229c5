"""`python -m harness.train CONFIG.yaml [key.sub=value ...]`: run ONE rank of a training job.

The rank comes from the launcher's environment (torchrun, deepspeed, accelerate, srun); without
one this process is a world of one. `--check` validates the config and exits, importing no torch,
which is what the launch scripts do before they start any rank.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Optional, Sequence

from harness.config import help_text, load_config, validate_for_world
from harness.errors import HarnessError

USAGE = "python -m harness.train CONFIG.yaml [key.sub=value ...] [--check [--world-size N]]"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="harness train",
        usage=USAGE,
        description="Train a causal LM. Config keys (override any with key.sub=value; values are YAML):",
        epilog=help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="YAML config file, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=20")
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    parser.add_argument("--from-accelerate-config", metavar="FILE",
                        help="map an `accelerate config` YAML (FSDP/DeepSpeed) onto the config")
    parser.add_argument("--world-size", type=int, default=None, help="with --check: the number of ranks to expect")
    # Some launchers append --local_rank=N; the rank comes from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser.parse_intermixed_args(argv)


def _env_rank() -> int:
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    rank = _env_rank()
    overrides = list(args.overrides)
    if args.from_accelerate_config:
        overrides.append(f"parallel.accelerate_config={args.from_accelerate_config}")
    try:
        cfg = load_config(args.config, overrides)
        if args.check:
            validate_for_world(cfg, args.world_size or 1)
            print(f"config ok: {args.config} -> run.dir={cfg.run.dir}")
            return 0
        return _run(cfg)
    except HarnessError as exc:
        if rank == 0 or exc.rank_local:
            prefix = f"[rank {rank}] " if exc.rank_local else ""
            print(f"{prefix}harness: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def _run(cfg) -> int:
    from harness.observe.console import print0
    from harness.runtime import dist
    from harness.runtime.environment import quiet_deepspeed_without_gpus
    from harness.runtime.host_memory import setup_allocations_returned_to_os
    from harness.runtime.preemption import StopRequest, stopped_exit_code
    from harness.runtime.watchdog import backstop_timeout_s

    quiet_deepspeed_without_gpus()
    from harness.train.build import build_loop

    stop = StopRequest().install()  # before anything slow: a signal during start-up counts too
    info = dist.rank_info_from_env()
    validate_for_world(cfg, info.world_size)
    backend = dist.pick_dist_backend(cfg.parallel.dist_backend)
    device = dist.device_for(info, backend)
    # torch's own collective timeout is the backstop; the watchdog speaks first (harness.runtime.watchdog).
    dist.init_process_group(info, backend, backstop_timeout_s(cfg.parallel.timeout_s), device)
    with setup_allocations_returned_to_os():
        trainer = build_loop(cfg, info, device)
    trainer.stop = stop
    trainer.watchdog = _start_watchdog(cfg, info)
    try:
        summary = trainer.fit()
    except Exception as exc:
        if trainer.watchdog is None or not dist.lost_a_rank(exc):
            raise
        return _lost_rank(info, trainer.watchdog, exc)
    finally:
        if trainer.watchdog is not None:
            trainer.watchdog.stop()
    if info.is_main:
        print(summary.table(), flush=True)
    dist.shutdown()
    if summary.stopped is not None:
        signal_name, step = summary.stopped
        print0(info.rank, f"stopped by {signal_name} after step {step}; checkpoint saved in {cfg.checkpoint.dir}; "
               "run again with resume=auto to continue")
        return stopped_exit_code()
    return 0


def _start_watchdog(cfg, info):
    """Multi-rank jobs only: a single process has no one to wait for."""
    if info.world_size == 1:
        return None
    from harness.runtime.watchdog import Watchdog, interval_for, store_factory

    connect = store_factory(info.master_addr, info.master_port, timeout_s=max(2.0, 2 * interval_for(cfg.parallel.timeout_s)))
    return Watchdog(info.rank, info.world_size, cfg.parallel.timeout_s, cfg.run.dir, connect).start()


def _lost_rank(info, watchdog, exc) -> int:
    """A collective failed because another rank is gone (its connection closed): one line, the
    exit code the launcher knows, and no traceback. The launcher names the rank that died."""
    from harness.errors import first_line
    from harness.runtime.watchdog import EXIT_HUNG

    reason = re.sub(r"^\[[^\]]*\]\s*", "", first_line(exc))[:120]  # gloo prefixes its source location
    print(f"[rank {info.rank}] harness: lost contact with another rank in {watchdog.where()} ({reason}); stopping",
          file=sys.stderr, flush=True)
    return EXIT_HUNG


if __name__ == "__main__":
    from harness.cli.main import exit_process

    exit_process(main())
