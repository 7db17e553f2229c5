"""A rank dies (kill -9): the job ends within 60 s, the launcher's last line names the rank and the
signal, the last checkpoint is intact, and resume=auto continues with the uninterrupted losses."""

from __future__ import annotations

import signal

import pytest

from harness.checkpoint import complete_checkpoints, verify
from tests.reliability.drills import BACKENDS, Job, losses, no_process_left, run

# The job must end within a deadline of the kill: a second worker's load would eat into it.
pytestmark = [pytest.mark.spawns, pytest.mark.exclusive]

# Constant learning rate: the killed job can be given more steps than it will live, and its
# losses still match a 12-step run's.
SHAPE = ["train.lr_schedule=constant", "train.warmup_steps=0", "checkpoint.every=5", "precision=fp32"]


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_a_killed_rank_ends_the_job_and_resume_matches_the_uninterrupted_run(backend, tmp_path):
    reference = run(tmp_path / "reference", *SHAPE, *BACKENDS[backend], "train.steps=12")
    assert reference.returncode == 0, reference.output[-3000:]

    job = Job(tmp_path / "drill", *SHAPE, *BACKENDS[backend], "train.steps=1000")
    job.wait_for_step(8)
    job.signal_rank(1, signal.SIGKILL)
    killed = job.finish(timeout=60)
    assert killed.returncode != 0
    assert killed.seconds < 60
    assert "rank 1" in killed.last_line and "SIGKILL" in killed.last_line, killed.output[-2000:]
    assert "run the same command again to continue" in killed.last_line
    assert "Traceback" not in killed.output, killed.output[-3000:]
    assert no_process_left(tmp_path / "drill")
    checkpoints = complete_checkpoints(tmp_path / "drill" / "checkpoints")
    assert checkpoints and all(verify(path) is None for path in checkpoints)
    newest_step = int(checkpoints[-1].name.split("-")[1])
    assert str(checkpoints[-1]) in killed.last_line

    resumed = run(tmp_path / "drill", *SHAPE, *BACKENDS[backend], "train.steps=12", "resume=auto")
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"continuing after step {newest_step}" in resumed.output
    want, got = losses(tmp_path / "reference"), losses(tmp_path / "drill")
    assert sorted(got) == list(range(1, 13))
    for step in range(1, 13):
        assert got[step] == pytest.approx(want[step], rel=1e-6), step


def test_a_rank_that_crashes_is_named_with_its_error_not_the_rank_ended_after_it(tmp_path):
    """Rank 1 raises in step 3 while rank 0 waits for it in a collective: the launcher's last line
    names rank 1 and its error (recorded through torch's error handler), not rank 0, which the
    launcher ended afterwards."""
    crashed = run(tmp_path / "crash", "train.steps=6", "checkpoint.every=2", "faults.crash_at_step=3",
                  "faults.crash_rank=1", timeout=120)
    assert crashed.returncode == 1, crashed.output[-3000:]
    assert crashed.last_line.startswith("harness: rank 1 (pid "), crashed.output[-3000:]
    assert ("failed first, exit code 1: RuntimeError: faults.crash_at_step=3: an injected crash on rank 1; "
            "the other ranks were ended.") in crashed.last_line
    assert "step-00000002" in crashed.last_line  # where to continue from
    assert "Traceback" in crashed.output  # the rank's own traceback stays above
    assert no_process_left(tmp_path / "crash")
