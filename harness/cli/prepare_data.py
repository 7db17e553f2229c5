"""`harness prepare-data CONFIG [overrides]`: tokenize the config's corpus (every source of a
mixture, or the instruction examples of data.format=chat|prompt_completion) into the shared cache
before training, with a progress bar; training finds it there.
Run it once per filesystem (a login node, or one Slurm task): ranks that start while it runs
wait for it."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from harness.config import load_config
from harness.errors import HarnessError


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="harness prepare-data", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML config (its data.* settings are used)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.data.format in ("chat", "prompt_completion"):
            return _prepare_examples(cfg)
        from harness.data import load_corpus

        corpus = load_corpus(cfg.data)
    except HarnessError as exc:
        print(f"harness: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"data: {corpus.description}; {len(corpus.train):,} train / {len(corpus.val):,} val tokens")
    for line in corpus.folders:
        print(f"  {line}")
    return 0


def _prepare_examples(cfg) -> int:
    from harness.data.instruct import describe_dropped
    from harness.data.packing import instruction_rows

    train, _, examples = instruction_rows(cfg.data, cfg.train.seq_len, cfg.eval.sequences)
    index = examples.index
    print(f"data: {cfg.data.path} ({cfg.data.format}, trained on {cfg.data.train_on}): {index['examples']:,} examples "
          f"of {index['rows']:,} rows, {index['tokens']:,} tokens ({index['trained_tokens']:,} trained); "
          f"{describe_dropped(index)}; {train.describe()}")
    print(f"  {examples.folder}")
    return 0


if __name__ == "__main__":
    from harness.runtime.process import exit_process

    exit_process(main())
