"""Summarise bench/gpu.sh runs as Markdown table rows for bench/RESULTS.md.

    python bench/gpu_rows.py RUN_DIR_OR_ROW_JSON ... 

A harness run dir contributes the medians of its metrics.jsonl over steps 3 and later (the first
steps pay for allocator warm-up and lazy initialisation); a JSON row (bench/plain_loop.py --out)
is printed as it is. Missing runs are listed as failed, so one broken row does not hide the rest.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def summarise_run(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steady = [r for r in rows if r["step"] >= 3] or rows
    mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
    return {
        "run": run_dir.name,
        "steps": len(rows),
        "skipped": sum(bool(r["skipped"]) for r in rows),
        "step_time_s": statistics.median(r["step_time_s"] for r in steady),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "mfu": statistics.median(mfus) if mfus else None,
        "mem_gb": max(r["mem_gb"] for r in rows),
        "final_loss": rows[-1]["loss"],
        "setup_host_gb": _setup_host_peak(run_dir),
    }


def _setup_host_peak(run_dir: Path):
    try:
        return max(json.loads((run_dir / "summary.json").read_text())["setup_host_peak_gb"])
    except (OSError, ValueError, KeyError):
        return None


def summarise(path: Path) -> dict:
    try:
        if path.is_dir():
            return summarise_run(path)
        return json.loads(path.read_text())
    except (OSError, ValueError, KeyError) as exc:
        return {"run": path.name, "error": f"{type(exc).__name__}: {exc}"}


def main(paths: list[str]) -> int:
    rows = [summarise(Path(p)) for p in paths]
    baseline = next((r for r in rows if r.get("run") == "bf16" and "error" not in r), None)
    print("| run | tokens/s | step s | MFU | peak mem GiB | setup host GiB | final loss | vs harness bf16 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['run']} | failed: {r['error'][:80]} | | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        ratio = f"{r['tokens_per_s'] / baseline['tokens_per_s']:.2f}x" if baseline else "n/a"
        host = f"{r['setup_host_gb']:.1f}" if r.get("setup_host_gb") is not None else "n/a"
        print(f"| {r['run']} | {r['tokens_per_s']:,.0f} | {r['step_time_s']:.3f} | {mfu} | {r['mem_gb']:.1f} | {host} | "
              f"{r['final_loss']:.3f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
