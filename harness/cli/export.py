"""`harness export CHECKPOINT OUT_DIR [--dtype bf16|fp16|fp32]` (also `python -m harness.cli.export`).

Assembles the fp32 master weights from every rank's shard file of a harness checkpoint (any
backend, any world size, no GPU and no process group needed) into a Hugging Face folder:
config.json, model.safetensors and the tokenizer files. Every parameter of the model must be
fully covered by the checkpoint, and the folder is loaded back with AutoModelForCausalLM and
compared tensor by tensor before the command reports success: nothing is dropped silently.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from harness.checkpoint.export import DTYPES, export
from harness.errors import HarnessError


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="harness export", description=__doc__.split("\n\n")[1])
    parser.add_argument("checkpoint", help="a step-<N> checkpoint folder")
    parser.add_argument("out_dir", help="where to write the Hugging Face folder")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="dtype of the exported weights")
    parser.add_argument("--no-verify", action="store_true", help="skip loading the export back to compare")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        checkpoint = Path(args.checkpoint)
        if not checkpoint.is_dir():
            raise HarnessError(f"{checkpoint} is not a folder; pass a step-<N> checkpoint folder")
        count = export(checkpoint, Path(args.out_dir), args.dtype, verify=not args.no_verify)
    except HarnessError as exc:
        print(f"harness: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    checked = "" if args.no_verify else ", loaded back and compared"
    print(f"exported {count} parameter tensors ({args.dtype}) to {args.out_dir}{checked}", flush=True)
    return 0


if __name__ == "__main__":
    from harness.runtime.process import exit_process

    exit_process(main())
