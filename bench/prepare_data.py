"""`harness prepare-data` against the tokenizer alone, and its memory on a corpus and its double.

    .venv/bin/python bench/prepare_data.py [--megabytes 300] [--num-proc 2] [--workdir runs/bench-prepare]

Builds a corpus of `--megabytes` from copies of the bundled plays (then one twice as large), and
measures side by side, with the same number of processes:
  tokenizer   the tokenizer's own batched throughput: the documents already in memory, split
              evenly over `--num-proc` processes, each calling the Rust tokenizer's encode_batch
  prepare     `harness prepare-data` end to end: reading, tokenizing, writing shards, hashing
Prints tokens/s of both, their ratio (target >= 0.8), and the peak RSS of prepare-data with its
workers on both corpora (target <= 1.5 GiB, flat as the corpus doubles).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.data.test_data_prepare import _peak_tree_rss, generated_corpus  # noqa: E402


def _tokenize_share(args: tuple[list[str], str]) -> int:
    files, tokenizer_path = args
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from transformers import AutoTokenizer

    # The Rust tokenizer itself (what transformers' fast tokenizer calls), batch by batch: the
    # fastest this tokenizer goes on one core.
    backend = AutoTokenizer.from_pretrained(tokenizer_path).backend_tokenizer
    texts = [Path(f).read_text(encoding="utf-8") for f in files]
    started = time.perf_counter()
    total = 0
    for i in range(0, len(texts), 16):
        total += sum(len(e.ids) for e in backend.encode_batch(texts[i:i + 16], add_special_tokens=False))
    return total, time.perf_counter() - started


def tokenizer_alone(corpus: Path, num_proc: int) -> tuple[int, float]:
    """Tokens and seconds of the slowest process (the texts are read before the clock starts)."""
    from harness import assets

    files = sorted(str(f) for f in corpus.glob("*.txt"))
    path = str(assets.resolve_tokenizer("bundled:gpt2"))
    shares = [(files[i::num_proc], path) for i in range(num_proc)]
    with multiprocessing.get_context("spawn").Pool(num_proc) as pool:
        results = pool.map(_tokenize_share, shares)
    return sum(tokens for tokens, _ in results), max(seconds for _, seconds in results)


def prepare(corpus: Path, cache: Path, num_proc: int) -> tuple[int, float, float]:
    shutil.rmtree(cache, ignore_errors=True)
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "harness"), "prepare-data", "configs/tiny.yaml", f"data.path={corpus}",
         f"data.cache_dir={cache}", f"data.num_proc={num_proc}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    peak, out, err = _peak_tree_rss(process)
    if process.returncode != 0:
        raise SystemExit(f"prepare-data failed:\n{err[-3000:]}")
    index = json.loads(next(cache.glob("*/index.json")).read_text())
    return index["tokens"], index["prepared"]["seconds"], peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=300)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--workdir", default="runs/bench-prepare")
    args = parser.parse_args()
    work = ROOT / args.workdir
    rows = []
    for scale in (1, 2):
        megabytes = args.megabytes * scale
        corpus = work / f"corpus-{megabytes}mb"
        if not corpus.exists():
            generated_corpus(corpus, megabytes)
        tokens, seconds, peak = prepare(corpus, work / "cache", args.num_proc)
        alone_tokens, alone_seconds = tokenizer_alone(corpus, args.num_proc) if scale == 1 else (None, None)
        rows.append((megabytes, tokens, seconds, peak, alone_tokens, alone_seconds))
    print("| corpus | tokens | prepare-data tokens/s | tokenizer alone tokens/s | prepare / alone | "
          "prepare-data peak RSS (with workers) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for megabytes, tokens, seconds, peak, alone_tokens, alone_seconds in rows:
        alone = f"{alone_tokens / alone_seconds:,.0f}" if alone_tokens else "-"
        ratio = f"{(tokens / seconds) / (alone_tokens / alone_seconds):.2f}" if alone_tokens else "-"
        print(f"| {megabytes:,} MB | {tokens:,} | {tokens / seconds:,.0f} | {alone} | {ratio} | {peak:.2f} GiB |")
    print(f"num_proc={args.num_proc}; the tokenizer-alone clock starts after its texts are in memory; "
          "prepare-data's covers reading, tokenizing, writing and hashing.")


if __name__ == "__main__":
    main()
