"""The run folder's history rules (harness.checkpoint.history): on folders built by hand, and the
rerun story of issue 38 through real 2-rank runs (Ctrl-C, the same command again, ...)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from harness.checkpoint import complete_checkpoints
from harness.checkpoint.history import next_aside, refuse_never, settle, survey
from harness.errors import HarnessError
from tests.reliability.drills import Job, losses, rows, run

SHAPE = ["train.lr_schedule=constant", "train.warmup_steps=0", "precision=fp32"]


def _run_dir(root: Path, steps: list[int], rows: int, staging: tuple[int, ...] = ()) -> Path:
    run_dir = root / "run"
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True)
    for step in steps:
        (checkpoints / f"step-{step:08d}").mkdir()
        (checkpoints / f"step-{step:08d}" / "manifest.json").write_text("{}")
    for step in staging:
        (checkpoints / f"step-{step:08d}.tmp").mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n"
                                                   for s in range(1, rows + 1)))
    (run_dir / "config.yaml").write_text("run: {}\n")
    (run_dir / ".lock").write_text("host 1\n")
    (run_dir / "logs").mkdir()
    return run_dir


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_survey_reads_checkpoints_and_the_last_row(tmp_path):
    run_dir = _run_dir(tmp_path, [4, 8], rows=9, staging=(10,))
    held = survey(run_dir, run_dir / "checkpoints")
    assert held.checkpoints == (4, 8) and held.last_row == 9 and held.holds_run
    assert "rows up to step 9" in held.describe() and "newest step 8" in held.describe()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"ste')  # a row cut short by a kill
    assert survey(run_dir, run_dir / "checkpoints").last_row == 2


def test_an_empty_or_missing_folder_holds_no_run(tmp_path):
    assert not survey(tmp_path / "nothing", tmp_path / "nothing" / "checkpoints").holds_run
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    assert not survey(tmp_path / "run", tmp_path / "run" / "checkpoints").holds_run


def test_never_is_refused_on_a_run_and_names_the_way_out(tmp_path):
    run_dir = _run_dir(tmp_path, [4], rows=5)
    with pytest.raises(HarnessError) as refused:
        refuse_never(survey(run_dir, run_dir / "checkpoints"), "resume=never")
    message = str(refused.value)
    assert "\n" not in message and "run.fresh=true" in message and "resume=auto" in message
    assert str(run_dir / "previous-1") in message
    refuse_never(survey(tmp_path / "new", tmp_path / "new" / "checkpoints"), "resume=never")  # nothing to lose


def test_continuing_moves_later_checkpoints_and_keeps_every_row_aside(tmp_path):
    run_dir = _run_dir(tmp_path, [2, 4, 6], rows=7, staging=(8,))
    settled = settle(survey(run_dir, run_dir / "checkpoints"), continues_after=4)
    aside = run_dir / "previous-1"
    assert settled.aside == aside and "after step 4" in settled.message
    assert _names(run_dir / "checkpoints") == ["step-00000002", "step-00000004"]
    assert _names(aside / "checkpoints") == ["step-00000006", "step-00000008.tmp"]
    # The live metrics stay for the writer to cut at the resumed step; the aside copy keeps all 7.
    assert len((aside / "metrics.jsonl").read_text().splitlines()) == 7
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 7


def test_continuing_from_the_newest_moves_nothing(tmp_path):
    run_dir = _run_dir(tmp_path, [2, 4], rows=4)
    assert settle(survey(run_dir, run_dir / "checkpoints"), continues_after=4).aside is None
    assert not (run_dir / "previous-1").exists()


def test_starting_afresh_moves_the_whole_run_but_not_the_lock_or_the_job_logs(tmp_path):
    run_dir = _run_dir(tmp_path, [2, 4], rows=5)
    (run_dir / "previous-1").mkdir()  # an earlier aside: kept, and the next number is taken
    settled = settle(survey(run_dir, run_dir / "checkpoints"), continues_after=None)
    assert settled.aside == run_dir / "previous-2" and "starting afresh" in settled.message
    assert _names(run_dir) == [".lock", "logs", "previous-1", "previous-2"]
    assert _names(run_dir / "previous-2") == ["checkpoints", "config.yaml", "metrics.jsonl"]
    assert _names(run_dir / "previous-2" / "checkpoints") == ["step-00000002", "step-00000004"]
    assert next_aside(run_dir) == run_dir / "previous-3"


def test_a_checkpoint_dir_outside_the_run_keeps_its_history_beside_it(tmp_path):
    run_dir = _run_dir(tmp_path, [], rows=6)
    outside = tmp_path / "scratch" / "ckpt"
    for step in (3, 6):
        (outside / f"step-{step:08d}").mkdir(parents=True)
    settled = settle(survey(run_dir, outside), continues_after=3)
    assert _names(outside) == ["step-00000003"]
    assert _names(tmp_path / "scratch" / "ckpt.previous-1") == ["step-00000006"]
    assert settled.aside == run_dir / "previous-1"
    settle(survey(run_dir, outside), continues_after=None)
    assert not outside.exists() and _names(tmp_path / "scratch" / "ckpt.previous-2") == ["step-00000003"]


def test_a_fresh_folder_needs_no_move(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").write_text("")
    assert settle(survey(run_dir, run_dir / "checkpoints"), continues_after=None).aside is None
    assert _names(run_dir) == [".lock"]


def _stop_after(job: Job, step: int) -> int:
    """Ctrl-C once the job reached `step`; the step it saved and stopped after."""
    job.wait_for_step(step)
    job.signal_launcher(signal.SIGINT)
    stopped = job.finish(timeout=60)
    assert stopped.returncode == 0 and "stopped by SIGINT after step" in stopped.output, stopped.output[-3000:]
    return max(row["step"] for row in rows(job.run_dir))


@pytest.mark.spawns
def test_a_rerun_continues_the_run_and_keeps_every_step_once(tmp_path):
    """Issue 38: Ctrl-C, the same command again, Ctrl-C again, then resume=auto: steps 1..N each
    exactly once, with the losses of an uninterrupted run (a constant LR: train.steps does not
    change the curve), and each attempt says what it continued from."""
    run_dir = tmp_path / "run"
    command = [*SHAPE, "checkpoint.every=0", "checkpoint.final=false", "train.steps=100000"]
    first = _stop_after(Job(run_dir, *command), 4)
    again = Job(run_dir, *command)  # the same command: continues, never starts over
    second = _stop_after(again, first + 3)
    assert [path.name for path in complete_checkpoints(run_dir / "checkpoints")] == \
        [f"step-{first:08d}", f"step-{second:08d}"]
    final = second + 2
    last = run(run_dir, *SHAPE, "resume=auto", "checkpoint.every=0", f"train.steps={final}")
    assert last.returncode == 0, last.output[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / f'step-{second:08d}'}" in last.output
    steps = [row["step"] for row in rows(run_dir) if "loss" in row]
    assert steps == list(range(1, final + 1)), steps
    assert not list(run_dir.glob("previous-*"))  # each stop saved after its last row: nothing to move aside
    reference = run(tmp_path / "uninterrupted", *SHAPE, f"train.steps={final}")
    assert reference.returncode == 0, reference.output[-3000:]
    assert losses(run_dir) == losses(tmp_path / "uninterrupted")

    # The finished run, run again: nothing to do, said in a line, nothing touched. (One rank from
    # here on: these starts stop, or start afresh, before anything depends on the world size.)
    before = (run_dir / "metrics.jsonl").read_text()
    done = run(run_dir, *SHAPE, f"train.steps={final}", nproc=1)
    assert done.returncode == 0 and "already holds the finished run" in done.output, done.output[-3000:]
    assert (run_dir / "metrics.jsonl").read_text() == before
    # resume=never would start it over: refused in one line that names the way out.
    refused = run(run_dir, *SHAPE, "resume=never", f"train.steps={final}", nproc=1)
    assert refused.returncode == 2 and "run.fresh=true" in refused.last_line, refused.output[-3000:]
    assert "Traceback" not in refused.output and (run_dir / "metrics.jsonl").read_text() == before
    # A fresh start moves the whole run aside, never deletes it.
    fresh = run(run_dir, *SHAPE, "run.fresh=true", "train.steps=2", nproc=1)
    assert fresh.returncode == 0 and "moved aside into" in fresh.output, fresh.output[-3000:]
    assert (run_dir / "previous-1" / "metrics.jsonl").read_text() == before
    assert [p.name for p in complete_checkpoints(run_dir / "previous-1" / "checkpoints")][-1] == f"step-{final:08d}"
    assert [row["step"] for row in rows(run_dir)] == [1, 2]


@pytest.mark.spawns
def test_resuming_an_earlier_checkpoint_moves_the_later_ones_aside(tmp_path):
    """resume=step-<N> in the run's own folder: the checkpoints and rows after N go to previous-1,
    and the re-run steps are written again (the old crash: a save over the other attempt's folder)."""
    run_dir = tmp_path / "run"
    first = run(run_dir, *SHAPE, "checkpoint.every=2", "checkpoint.keep_last=5", "train.steps=6", nproc=1)
    assert first.returncode == 0, first.output[-3000:]
    before = (run_dir / "metrics.jsonl").read_text()
    again = run(run_dir, *SHAPE, "checkpoint.every=2", "checkpoint.keep_last=5", "train.steps=6",
                f"resume={run_dir / 'checkpoints' / 'step-00000002'}", nproc=1)
    assert again.returncode == 0, again.output[-3000:]
    assert "what came after step 2" in again.output
    aside = run_dir / "previous-1"
    assert [p.name for p in complete_checkpoints(aside / "checkpoints")] == ["step-00000004", "step-00000006"]
    assert (aside / "metrics.jsonl").read_text() == before
    assert [row["step"] for row in rows(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert [p.name for p in complete_checkpoints(run_dir / "checkpoints")] == \
        ["step-00000002", "step-00000004", "step-00000006"]
