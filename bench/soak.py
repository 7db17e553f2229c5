"""The soak: a long 2-rank run with async checkpoints, watched for slow leaks.

    python bench/soak.py [--steps 3000] [--checkpoint-every 50] [--keep-last 2] [--sample-every 100]
    bench/soak.sh  (the same, 3,000 steps)

Runs configs/tiny.yaml on 2 gloo ranks (launch/local.sh) with checkpoint.async_save=true and
debug.resources_every (each rank samples its RSS, open file descriptors and threads), then checks:
- RSS grows by less than --max-rss-growth (5%) from the first sample after warm-up (the first 10%
  of the steps) to the last sample of the loop, on every rank;
- open file descriptors and threads at the end (after the last save) equal their value before step 1;
- no process of the job is left once the launcher exits;
- the checkpoint folder holds exactly the newest --keep-last checkpoints, and nothing half-written.
Prints the figures as a Markdown table; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--keep-last", type=int, default=2)
    parser.add_argument("--sample-every", type=int, default=100)
    parser.add_argument("--max-rss-growth", type=float, default=0.05)
    parser.add_argument("--run-dir", default="runs/soak")
    args = parser.parse_args()

    run_dir = (ROOT / args.run_dir).resolve()
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    started = time.monotonic()
    job = subprocess.run(
        [str(ROOT / "launch/local.sh"), "2", "configs/tiny.yaml", f"run.dir={run_dir}", f"train.steps={args.steps}",
         "train.lr_schedule=constant", "train.warmup_steps=0", "eval.every=0", "log.progress=off", "log.every=50",
         f"checkpoint.every={args.checkpoint_every}", f"checkpoint.keep_last={args.keep_last}",
         "checkpoint.async_save=true", f"debug.resources_every={args.sample_every}"],
        cwd=ROOT, capture_output=True, text=True,
    )
    wall = time.monotonic() - started
    if job.returncode != 0:
        print(job.stdout[-3000:] + job.stderr[-3000:])
        print(f"soak: the run failed (exit {job.returncode})")
        return 1
    time.sleep(1.0)  # the launcher has exited; give the kernel a moment to reap what it ended
    failures = check(run_dir, args)
    print(f"soak: {args.steps} steps, 2 ranks, async checkpoint every {args.checkpoint_every}, keep_last="
          f"{args.keep_last}: {wall:.0f} s")
    print(table(run_dir, args))
    for failure in failures:
        print(f"FAIL: {failure}")
    print("soak: ok" if not failures else f"soak: {len(failures)} check(s) failed")
    return 1 if failures else 0


def samples(run_dir: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "resources" / f"rank-{rank}.jsonl").read_text().splitlines()]


def _loop(rows: list[dict]) -> list[dict]:
    return [row for row in rows if isinstance(row["step"], int)]


def rss_growth(rows: list[dict], steps: int) -> tuple[float, float, float]:
    """(baseline after warm-up, last in the loop, growth) of one rank's RSS."""
    loop = _loop(rows)
    warm = [row for row in loop if row["step"] >= max(1, steps // 10)]
    baseline, last = warm[0]["rss_gb"], loop[-1]["rss_gb"]
    return baseline, last, last / baseline - 1


def check(run_dir: Path, args) -> list[str]:
    failures = []
    for rank in (0, 1):
        rows = samples(run_dir, rank)
        start, end = rows[0], rows[-1]
        if end["step"] != "end":
            failures.append(f"rank {rank}: no end sample")
            continue
        baseline, last, growth = rss_growth(rows, args.steps)
        if growth >= args.max_rss_growth:
            failures.append(f"rank {rank}: RSS grew {growth:.1%} ({baseline:.3f} -> {last:.3f} GiB)")
        for key in ("open_fds", "threads"):
            if end[key] != start[key]:
                failures.append(f"rank {rank}: {key} {start[key]} before step 1, {end[key]} at the end")
    leftover = _processes_of(run_dir)
    if leftover:
        described = [f"{pid} ({_cmdline(pid)})" for pid in leftover]
        failures.append(f"processes left after exit: {described}")
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    last = args.steps - args.steps % args.checkpoint_every
    wanted = [f"step-{s:08d}" for s in sorted({args.steps, last, last - args.checkpoint_every})][-args.keep_last:]
    if checkpoints != wanted:
        failures.append(f"checkpoint folder holds {checkpoints}, expected {wanted}")
    return failures


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:150]
    except OSError:
        return "gone"


def _processes_of(run_dir: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if str(run_dir).encode() in (entry / "cmdline").read_bytes():
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return found


def table(run_dir: Path, args) -> str:
    lines = ["| rank | RSS after warm-up GiB | RSS at the last step GiB | growth | fds start / end | threads start / end |",
             "|---|---|---|---|---|---|"]
    for rank in (0, 1):
        rows = samples(run_dir, rank)
        baseline, last, growth = rss_growth(rows, args.steps)
        lines.append(f"| {rank} | {baseline:.3f} | {last:.3f} | {growth:+.1%} | {rows[0]['open_fds']} / "
                     f"{rows[-1]['open_fds']} | {rows[0]['threads']} / {rows[-1]['threads']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
