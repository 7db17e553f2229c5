"""The `harness` command: `harness train ...` and friends."""

from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("harness.cli.train", "run one rank of a training job (python -m harness train: the same)"),
    "export": ("harness.cli.export", "write a Hugging Face folder from a checkpoint (any backend, any world size)"),
    "report": ("harness.cli.report", "compare runs (e.g. fp32/bf16/fp16): curves, deltas, verdict -> html/png/md"),
    "prepare-data": ("harness.cli.prepare_data", "tokenize a config's corpus into shard files in the shared cache, once"),
    "estimate": ("harness.cli.estimate", "predict per-rank memory, collectives and step time for a config on a cluster"),
    "check": ("harness.cli.check", "preflight a job before the queue: paths, tokenizer, data, memory, stop-signal lead"),
    "doctor": ("harness.cli.doctor", "versions, GPUs, network and (several ranks) collective bandwidth -> doctor.json"),
    "submit": ("harness.cli.submit", "render and sbatch a Slurm job (N nodes x G ranks), requeued on preemption"),
}


def _usage() -> str:
    lines = ["usage: harness COMMAND [args]", "", "commands:"]
    width = max(len(name) for name in COMMANDS)
    lines += [f"  {name:<{width}}  {doc}" for name, (_, doc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        sys.exit(0 if args else 2)
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"harness: error: unknown command {command!r}\n{_usage()}", file=sys.stderr)
        sys.exit(2)
    import importlib

    from harness.runtime.process import exit_process, quiet_imports_without_gpus

    quiet_imports_without_gpus()
    module = importlib.import_module(COMMANDS[command][0])
    entry: Callable[[Sequence[str]], int] = module.main
    exit_process(entry(rest))
