"""One Markdown row from a finished run's metrics.jsonl, for the bench scripts' tables.

    python bench/run_row.py --header
    python bench/run_row.py NAME RUN_DIR EXIT_CODE [OVERRIDES...]
    python bench/run_row.py --gap BASELINE_RUN_DIR OTHER_RUN_DIR

tokens/s is the median over the steps after the first third (compilation and warm-up excluded);
the loss is the mean of the last 10 steps; memory is the largest device peak of any step.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

COLUMNS = ("run", "exit", "steps", "tokens/s (median)", "step s", "MFU", "peak GiB", "final loss (last 10)", "overrides")


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def summary(run_dir: Path) -> dict:
    found = [r for r in rows(run_dir) if "loss" in r and r.get("tokens_per_s")]
    steady = found[len(found) // 3:] or found
    return {
        "steps": len(found),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady) if steady else float("nan"),
        "step_s": statistics.median(r["step_time_s"] for r in steady) if steady else float("nan"),
        "mfu": statistics.median(r["mfu"] for r in steady) if steady and steady[-1].get("mfu") is not None else None,
        "peak_gb": max((r.get("mem_gb") or 0.0 for r in found), default=float("nan")),
        "loss": statistics.fmean(r["loss"] for r in found[-10:]) if found else float("nan"),
    }


def main(argv: list[str]) -> None:
    if argv[:1] == ["--header"]:
        print("| " + " | ".join(COLUMNS) + " |")
        print("|" + "---|" * len(COLUMNS))
        return
    if argv[:1] == ["--gap"]:
        base, other = summary(Path(argv[1])), summary(Path(argv[2]))
        gap = (other["loss"] - base["loss"]) / base["loss"]
        print(f"loss gap {Path(argv[2]).name} vs {Path(argv[1]).name}: {other['loss']:.4f} vs {base['loss']:.4f} "
              f"= {100 * gap:+.2f}% (target: within 1%)")
        return
    name, run_dir, code, *overrides = argv
    s = summary(Path(run_dir))
    mfu = f"{100 * s['mfu']:.1f}%" if s["mfu"] is not None else "n/a"
    print(f"| {name} | {code} | {s['steps']} | {s['tokens_per_s']:,.0f} | {s['step_s']:.3f} | {mfu} | "
          f"{s['peak_gb']:.1f} | {s['loss']:.4f} | {' '.join(overrides)} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
