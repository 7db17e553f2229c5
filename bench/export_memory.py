"""`harness export`'s peak memory against the size of the model it exports.

Trains configs/llama-300m.yaml one step on 2 CPU ranks (checkpoint on), then exports the
checkpoint as fp32 and as bf16 (one safetensors file, and 1 GiB shards), each in its own process,
and prints the export's peak resident memory above the process's start (VmHWM, reset after the
imports) over the fp32 model's size. Target (issue 27): <= 0.5, i.e. the export holds one tensor,
not the model.

    python bench/export_memory.py [--quick]

--quick: the 2-layer tiny model instead (seconds; the numbers then say little, the table is the
same).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _train(config: str, run_dir: Path) -> Path:
    cmd = ["launch/local.sh", "2", config, f"run.dir={run_dir}", "train.steps=1", "eval.every=0", "log.progress=off",
           "precision=fp32"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        sys.exit(f"training failed:\n{result.stderr[-3000:]}")
    return run_dir / "checkpoints" / "step-00000001"


def _export(checkpoint: Path, out: Path, *flags: str) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "harness", "export", str(checkpoint), str(out), *flags]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        sys.exit(f"export failed:\n{result.stderr[-3000:]}")
    match = re.search(r"peak memory ([0-9.]+) GB above the process's start \(([0-9.]+) GB in all\)", result.stdout)
    if match is None:
        sys.exit(f"export printed no peak memory (not Linux?):\n{result.stdout}")
    return float(match.group(1)), float(match.group(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model: seconds")
    args = parser.parse_args()
    config = "configs/tiny.yaml" if args.quick else "configs/llama-300m.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = _train(config, Path(tmp) / "run")
        from harness.checkpoint import ShardReader, read_manifest

        reader = ShardReader(checkpoint, read_manifest(checkpoint))
        fp32_gb = sum(4 * _numel(shape) for shape in reader.shapes.values()) / 2**30
        largest_gb = max(4 * _numel(shape) for shape in reader.shapes.values()) / 2**30
        reader.close()
        print(f"### harness export peak memory ({config}: fp32 model {fp32_gb:.2f} GiB, largest tensor "
              f"{largest_gb:.3f} GiB)\n")
        print("| export | peak above start, GiB | / fp32 model | / largest tensor | whole process (imports too), GiB |")
        print("|---|---|---|---|---|")
        for label, flags in (("fp32, one file", ["--dtype", "fp32"]), ("bf16, one file", ["--dtype", "bf16"]),
                             ("fp32, 1 GiB shards", ["--dtype", "fp32", "--shard-gb", "1"])):
            peak, whole = _export(checkpoint, Path(tmp) / label.replace(" ", "").replace(",", "-"), *flags)
            print(f"| {label} | {peak:.3f} | {peak / fp32_gb:.2f} | {peak / largest_gb:.1f} | {whole:.2f} |")


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


if __name__ == "__main__":
    main()
