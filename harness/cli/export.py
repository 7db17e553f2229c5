"""`harness export CHECKPOINT OUT_DIR [--dtype bf16|fp16|fp32] [--adapter | --merge]` (also `python -m harness.cli.export`).

Streams the fp32 master weights from every rank's shard file of a harness checkpoint (any
backend, any world size, no GPU and no process group needed) into a Hugging Face folder, one
tensor at a time (memory: the largest tensor, not the model): safetensors shards and their index,
config.json, generation_config.json and the tokenizer (with its chat template) the run trained
with. Every parameter of the model must be covered by the checkpoint, and the written files are
read back and compared with it tensor by tensor before the command reports success. A LoRA run's
checkpoint exports with --adapter (a peft adapter folder) or --merge (the base with the adapters
added, streamed the same way).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from harness.checkpoint.export import DEFAULT_SHARD_GB, DTYPES, export
from harness.errors import HarnessError


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="harness export", description=__doc__.split("\n\n")[1])
    parser.add_argument("checkpoint", help="a step-<N> checkpoint folder")
    parser.add_argument("out_dir", help="where to write the Hugging Face folder")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="dtype of the exported weights")
    parser.add_argument("--shard-gb", type=float, default=DEFAULT_SHARD_GB,
                        help="largest safetensors file, in GiB (save_pretrained's default: 5)")
    parser.add_argument("--no-verify", action="store_true", help="skip reading the export back to compare")
    lora = parser.add_mutually_exclusive_group()
    lora.add_argument("--adapter", action="store_true",
                      help="a LoRA checkpoint's adapters as a peft folder (PeftModel.from_pretrained(base, OUT_DIR))")
    lora.add_argument("--merge", action="store_true",
                      help="a LoRA checkpoint merged into its base: a whole Hugging Face model folder")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        checkpoint = Path(args.checkpoint)
        if not checkpoint.is_dir():
            raise HarnessError(f"{checkpoint} is not a folder; pass a step-<N> checkpoint folder")
        if args.shard_gb <= 0:
            raise HarnessError(f"--shard-gb must be > 0 (got {args.shard_gb})")
        _import_what_export_uses()
        started = _reset_peak_memory()
        count = _export(checkpoint, Path(args.out_dir), args)
    except HarnessError as exc:
        print(f"harness: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    checked = "" if args.no_verify or args.adapter else ", read back and compared"
    peak = _peak_memory_growth_gb(started)
    grown = "" if peak is None else (f"; peak memory {peak:.2f} GB above the process's start "
                                     f"({_status_kb('VmHWM') / 2**20:.2f} GB in all)")
    print(f"exported {count} parameter tensors ({args.dtype}) to {args.out_dir}{checked}{grown}", flush=True)
    return 0


def _export(checkpoint: Path, out_dir: Path, args: argparse.Namespace) -> int:
    from harness.checkpoint.export_lora import export_adapter, export_merged

    if args.adapter:
        return export_adapter(checkpoint, out_dir, args.dtype)
    if args.merge:
        return export_merged(checkpoint, out_dir, args.dtype, verify=not args.no_verify, shard_gb=args.shard_gb)
    return export(checkpoint, out_dir, args.dtype, verify=not args.no_verify, shard_gb=args.shard_gb)


def _import_what_export_uses() -> None:
    """The libraries' own memory is not the export's: load them before the peak is reset."""
    import safetensors  # noqa: F401
    import torch  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401


def _reset_peak_memory() -> Optional[int]:
    """Linux: reset this process's resident high-water mark (VmHWM) after the imports, and return
    the resident size now, so the export's own peak can be told apart from the interpreter's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kb("VmRSS")
    except OSError:
        return None


def _peak_memory_growth_gb(started_kb: Optional[int]) -> Optional[float]:
    if started_kb is None:
        return None
    return max(0, _status_kb("VmHWM") - started_kb) / 2**20


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


if __name__ == "__main__":
    from harness.runtime.process import exit_process

    exit_process(main())
