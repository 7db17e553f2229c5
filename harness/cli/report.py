"""`harness report RUN_DIR [RUN_DIR ...] --out report.html|.png|.md`: what precision did to a run.

Compares runs of the same config in different precisions (or any runs): loss and eval-loss
curves overlaid, final/min loss deltas against the reference run (the fp32 one, unless
--reference names another), skipped steps, the loss-scale trajectory, tokens/s, peak memory, and
a plain verdict per run such as "bf16 within 0.5% of fp32 eval loss".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from harness.errors import HarnessError
from harness.observe.report import load_run, write_report


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="harness report", description=__doc__.split("\n\n")[1])
    parser.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl and config.yaml)")
    parser.add_argument("--out", required=True, help="report.html, report.png or report.md")
    parser.add_argument("--reference", help="the run to compare against (default: the fp32 run, else the first)")
    parser.add_argument("--tolerance", type=float, default=0.005, help="relative loss difference called 'within'")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        runs = [load_run(Path(p)) for p in args.runs]
        if args.reference:
            matches = [r for r in runs if r.path == Path(args.reference)]
            if not matches:
                raise HarnessError(f"--reference {args.reference} is not one of the runs given")
            ref = matches[0]
        else:
            ref = next((r for r in runs if r.precision == "fp32"), runs[0])
        verdicts = write_report(runs, ref, Path(args.out), args.tolerance)
    except HarnessError as exc:
        print(f"harness: error: {exc}", file=sys.stderr)
        return exc.exit_code
    for line in verdicts:
        print(line)
    print(f"report written to {args.out}")
    return 0


if __name__ == "__main__":
    from harness.runtime.process import exit_process

    exit_process(main())
