"""Ctrl-C (SIGINT) and SIGTERM outside Slurm: the first one saves a checkpoint after the current
step and exits 0, resumable; a second one exits at once and leaves the previous checkpoint the
newest intact one."""

from __future__ import annotations

import json
import signal
import time

import pytest

from harness.checkpoint import complete_checkpoints, verify
from tests.reliability.drills import Job, losses, no_process_left, rows, run

# Exit deadlines are measured from the signal: a second worker's load would eat into them.
pytestmark = [pytest.mark.spawns, pytest.mark.exclusive]

SHAPE = ["train.lr_schedule=constant", "train.warmup_steps=0", "checkpoint.every=5", "precision=fp32"]


def test_first_sigterm_checkpoints_and_exits_zero_then_resume_continues(tmp_path):
    sig = signal.SIGTERM  # SIGINT (Ctrl-C): the rerun story below
    job = Job(tmp_path / "run", *SHAPE, "train.steps=100000")
    job.wait_for_step(7)
    job.signal_launcher(sig)
    stopped = job.finish(timeout=60)
    assert stopped.returncode == 0, stopped.output[-3000:]
    assert "Traceback" not in stopped.output
    assert f"stopped by {signal.Signals(sig).name} after step" in stopped.output
    assert no_process_left(tmp_path / "run")
    last = max(row["step"] for row in rows(tmp_path / "run"))
    checkpoints = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert checkpoints[-1].name == f"step-{last:08d}"  # saved after the step it stopped at
    assert all(verify(path) is None for path in checkpoints)
    # The summary counts the tokens trained, not those train.steps would have trained.
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["tokens"] == [row for row in rows(tmp_path / "run") if row["step"] == last][-1]["tokens"]

    resumed = run(tmp_path / "run", *SHAPE, f"train.steps={last + 2}", "resume=auto")
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"continuing after step {last}" in resumed.output
    assert sorted(losses(tmp_path / "run")) == list(range(1, last + 3))


# A model whose checkpoint takes a moment to write (~190 MB), so the second signal lands inside
# the save the first one asked for. Two signals sent back to back would be merged into one.
LARGER = ["model.config.n_embd=256", "model.config.n_layer=4"]


def test_second_signal_exits_at_once_and_keeps_the_previous_checkpoint(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    job = Job(tmp_path / "run", *SHAPE, *LARGER, "train.steps=100000")
    job.wait_for_step(7)
    newest_before = complete_checkpoints(checkpoints)[-1]
    job.signal_launcher(signal.SIGINT)
    deadline = time.monotonic() + 60
    while not list(checkpoints.glob("step-*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.005)
    in_progress = list(checkpoints.glob("step-*.tmp"))
    assert in_progress, "the stop save never started"
    job.signal_launcher(signal.SIGINT)
    stopped = job.finish(timeout=30)
    assert stopped.returncode == 128 + signal.SIGINT, stopped.output[-3000:]
    assert "second SIGINT: exiting now" in stopped.output
    assert "Traceback" not in stopped.output
    assert no_process_left(tmp_path / "run")
    after = complete_checkpoints(checkpoints)
    cut_off = in_progress[0].name.split(".")[0]
    assert cut_off not in [p.name for p in after]  # the save that was cut off never became visible
    assert after[-1].name >= newest_before.name and all(verify(path) is None for path in after)
    resumed = run(tmp_path / "run", *SHAPE, *LARGER, f"train.steps={int(after[-1].name.split('-')[1]) + 1}",
                  "resume=auto")
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"resuming from {after[-1]}" in resumed.output


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    job = Job(tmp_path / "run", *SHAPE, "train.steps=100000")
    job.wait_for_step(6)
    job.signal_rank(1, signal.SIGTERM)
    stopped = job.finish(timeout=60)
    assert stopped.returncode == 0, stopped.output[-3000:]
    assert "stopped by a signal on another rank after step" in stopped.output or "stopped by SIGTERM" in stopped.output
    last = max(row["step"] for row in rows(tmp_path / "run"))
    assert complete_checkpoints(tmp_path / "run" / "checkpoints")[-1].name == f"step-{last:08d}"
