"""`harness prepare-data CONFIG [overrides] [--show N]`: tokenize the config's corpus (every source of
a mixture, or the instruction examples of data.format=chat|prompt_completion) into the shared cache
before training, with a progress bar; training finds it there.
Run it once per filesystem (a login node, or one Slurm task): ranks that start while it runs
wait for it. --show N prints the first N examples as the model sees them, the tokens that carry
loss between [[ and ]]."""

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
    parser.add_argument("--show", type=int, default=0, metavar="N",
                        help="print the first N examples (text: training sequences) as the model sees them, the "
                             "tokens that carry loss between [[ and ]]")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.data.format in ("chat", "prompt_completion"):
            return _prepare_examples(cfg, args.show)
        from harness.data import load_corpus

        corpus = load_corpus(cfg.data)
    except HarnessError as exc:
        print(f"harness: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"data: {corpus.description}; {len(corpus.train):,} train / {len(corpus.val):,} val tokens")
    for line in corpus.folders:
        print(f"  {line}")
    if args.show:
        from harness.data import load_tokenizer

        tokenizer = load_tokenizer(cfg.data.tokenizer)
        width = cfg.train.seq_len + 1  # a training sequence: its inputs and next-token targets, all trained
        for i in range(min(args.show, len(corpus.train) // width)):
            _show(f"sequence {i + 1} ({width} tokens, every one a target)",
                  marked_text(tokenizer, corpus.train[i * width:(i + 1) * width], None))
    return 0


def _prepare_examples(cfg, show: int) -> int:
    from harness.data.instruct import describe_dropped
    from harness.data.packing import instruction_rows

    train, _, examples = instruction_rows(cfg.data, cfg.train.seq_len, cfg.eval.sequences)
    index = examples.index
    print(f"data: {cfg.data.path} ({cfg.data.format}, trained on {cfg.data.train_on}): {index['examples']:,} examples "
          f"of {index['rows']:,} rows, {index['tokens']:,} tokens ({index['trained_tokens']:,} trained); "
          f"{describe_dropped(index)}; {train.describe()}")
    print(f"  {examples.folder}")
    if show:
        from harness.data import load_tokenizer

        tokenizer = load_tokenizer(cfg.data.tokenizer)
        starts, ends = examples.starts, examples.ends
        for i in range(min(show, len(examples))):
            ids, trained = examples.tokens[starts[i]:ends[i]], examples.trained[starts[i]:ends[i]]
            _show(f"example {i + 1} ({len(ids)} tokens, {int(trained[1:].sum())} carry loss)",
                  marked_text(tokenizer, ids, trained))
    return 0


def marked_text(tokenizer, ids, trained) -> str:
    """The tokens as text, each run of loss-carrying tokens between [[ and ]] (None: every token
    carries loss). A run is decoded whole, so its text is what the tokenizer makes of it."""
    import numpy as np

    flags = np.ones(len(ids), dtype=bool) if trained is None else np.array(trained, dtype=bool)
    if trained is not None:
        flags[0] = False  # an example's first token is never a target (nothing before it in its row)
    parts, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or flags[end] != flags[start]:
            text = tokenizer.decode([int(t) for t in ids[start:end]])
            parts.append(f"[[{text}]]" if flags[start] else text)
            start = end
    return "".join(parts)


def _show(heading: str, text: str) -> None:
    print(f"--- {heading}; loss on the tokens between [[ and ]]")
    print(text)


if __name__ == "__main__":
    from harness.runtime.process import exit_process

    exit_process(main())
