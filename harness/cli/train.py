"""`python -m harness train CONFIG.yaml [key.sub=value ...]`: run ONE rank of a training job.

The rank comes from the launcher's environment (torchrun, deepspeed, accelerate, srun); without
one this process is a world of one. `--check` is `harness check` (one preflight, one depth: the
config, the data rows, the model and tokenizer, the resume folder, the memory estimate). The
launch scripts validate the config alone (`--config-only`, no torch import) before they start
any rank, so a typo costs a second, and say nothing when it is fine.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from harness.config import help_text, load_config, validate_for_world
from harness.errors import HarnessError, report_line
from harness.parallel.preflight import check_backend_file
from harness.runtime.process import env_rank

USAGE = "python -m harness train CONFIG.yaml [key.sub=value ...] [--check [--world-size N] [harness check's options]]"


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
    parser.add_argument("--check", action="store_true",
                        help="run `harness check` (the whole preflight: config, data rows, model, resume, memory) "
                             "and exit")
    parser.add_argument("--config-only", action="store_true", help=argparse.SUPPRESS)  # the launch scripts' own
    parser.add_argument("--from-accelerate-config", metavar="FILE",
                        help="map an `accelerate config` YAML (FSDP/DeepSpeed) onto the config")
    parser.add_argument("--world-size", type=int, default=None, help="with --check: the number of ranks to expect")
    for option in ("--nodes", "--gpu", "--device-gb", "--host-gb", "--signal-seconds"):
        parser.add_argument(option, default=None, help=f"with --check: as harness check {option}")
    # Some launchers append --local_rank=N; the rank comes from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser.parse_intermixed_args(argv)


def _check_options(args: argparse.Namespace) -> list[str]:
    """harness check's options, as given to harness train --check."""
    options = ["--world-size", str(args.world_size or 1)]
    for name in ("nodes", "gpu", "device_gb", "host_gb", "signal_seconds"):
        value = getattr(args, name)
        if value is not None:
            options += [f"--{name.replace('_', '-')}", str(value)]
    return options


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    rank = env_rank()
    overrides = list(args.overrides)
    if args.from_accelerate_config:
        overrides.append(f"parallel.accelerate_config={args.from_accelerate_config}")
    if args.check:
        from harness.cli.check import main as check

        return check([args.config, *overrides, *_check_options(args)])
    try:
        if args.world_size is not None and not args.config_only:
            raise HarnessError(f"--world-size {args.world_size} only goes with --check: a run's ranks come from its "
                               f"launcher (launch/local.sh {args.world_size} CONFIG, torchrun --nproc-per-node "
                               f"{args.world_size}, srun); drop --world-size, or add --check")
        cfg = load_config(args.config, overrides)
        if args.config_only:
            validate_for_world(cfg, args.world_size or 1)
            check_backend_file(cfg, args.world_size or 1)
            return 0
        return _run(cfg)
    except HarnessError as exc:
        line = report_line(exc, rank)
        if line is not None:
            print(line, file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a crash: its traceback follows, and the launcher names this rank
        from harness.runtime.dist import record_error_for_launcher

        record_error_for_launcher(exc)
        raise


def _run(cfg) -> int:
    """The run through the Python API; what the process reports and exits with."""
    from harness.runtime.process import quiet_imports_without_gpus

    quiet_imports_without_gpus()  # before transformers imports DeepSpeed
    from harness.observe.console import print0
    from harness.runtime.preemption import stopped_exit_code
    from harness.train.trainer import Trainer

    summary = Trainer(cfg).fit()
    rank = env_rank()
    if rank == 0:
        print(summary.table(), flush=True)
    if summary.stopped is not None:
        signal_name, step = summary.stopped
        print0(rank, f"stopped by {signal_name} after step {step}; checkpoint saved in {cfg.checkpoint.dir}; "
               "run the same command again to continue")
        return stopped_exit_code()
    return 0


if __name__ == "__main__":
    from harness.runtime.process import exit_process

    exit_process(main())
