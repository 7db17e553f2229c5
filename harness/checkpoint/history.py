"""A run folder's history: what earlier attempts left in it, and what a new attempt does with it.

The rules (docs/reliability.md, "Reruns"):
1. A run continues by default (resume=auto): from the newest intact checkpoint in checkpoint.dir,
   with a console line that says which, locally as under Slurm.
2. What lies after the step an attempt continues from (later checkpoints, intact or damaged, and
   the metrics rows an interrupted attempt wrote after its last checkpoint) is moved aside into
   run.dir/previous-<n>/, never deleted: the folder holds one line of steps, each row once.
3. An attempt that starts at step 0 in a folder that holds a run (run.fresh=true, a
   resume.weights_only start, another run's checkpoint, or resume=auto with no intact checkpoint)
   first moves the whole old run aside the same way.
4. resume=never into a folder that holds a run is refused in one line, before anything is built;
   a finished run started again (its newest intact checkpoint at train.steps) says so, exit 0.
5. Nothing moves until the attempt's setup has succeeded: a refused resume leaves the folder as it was.

A checkpoint.dir outside run.dir keeps its history beside it, in <checkpoint.dir>.previous-<n>/.
Rank 0 does every move, while it holds the run folder's lock (harness.runtime.run_dir).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from harness.checkpoint.format import STEP_DIR, checkpoint_step, complete_checkpoints
from harness.errors import HarnessError, RunFinished, first_line

KEPT_IN_PLACE = (".lock", ".lock.held", "logs")
"""Never moved aside: the lock of the live job, and the Slurm job's own logs (being written now)."""
ASIDE_PREFIX = "previous-"


@dataclass(frozen=True)
class Held:
    """What a run folder holds from earlier attempts."""

    run_dir: Path
    checkpoint_dir: Path
    checkpoints: tuple[int, ...]
    """Steps of the complete step-<N> folders in checkpoint.dir, oldest first."""
    last_row: Optional[int]
    """The step of metrics.jsonl's last row (None: no rows)."""

    @property
    def holds_run(self) -> bool:
        return bool(self.checkpoints) or self.last_row is not None

    def describe(self) -> str:
        parts = []
        if self.last_row is not None:
            parts.append(f"rows up to step {self.last_row} in metrics.jsonl")
        if self.checkpoints:
            newest = self.checkpoints[-1]
            parts.append(f"{len(self.checkpoints)} checkpoint(s), the newest step {newest}")
        return " and ".join(parts)


def survey(run_dir: Path, checkpoint_dir: Path) -> Held:
    steps = tuple(checkpoint_step(p) for p in complete_checkpoints(checkpoint_dir))
    return Held(run_dir, checkpoint_dir, steps, _last_row(run_dir / "metrics.jsonl"))


def _last_row(path: Path) -> Optional[int]:
    """The step of the last readable row (a row cut short by a kill is skipped)."""
    if not path.is_file():
        return None
    last = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                step = json.loads(line).get("step")
            except (ValueError, AttributeError):
                continue
            if isinstance(step, int):
                last = step
    return last


def refuse_finished(run_dir: Path, checkpoint: Path, step: int, steps: int) -> None:
    """Continuing from `checkpoint` (verified; it holds step `step`) with train.steps=`steps`
    would train nothing: say so, and change nothing (exit 0)."""
    if step >= steps:
        raise RunFinished(
            f"run.dir {run_dir} already holds the finished run ({checkpoint.name}, train.steps={steps}): nothing to "
            "train; raise train.steps to train on, or set run.fresh=true to start over (the finished run moves aside)"
        )


def refuse_never(held: Held, how: str) -> None:
    """resume=never (or none) must not start over on top of a run (rule 4)."""
    if held.holds_run:
        raise HarnessError(
            f"run.dir {held.run_dir} holds a run ({held.describe()}) and {how} would start it over: set "
            f"run.fresh=true to move it aside into {next_aside(held.run_dir)} and start afresh, resume=auto to "
            "continue it, or choose another run.dir"
        )


def next_aside(run_dir: Path, checkpoint_dir: Optional[Path] = None) -> Path:
    """run.dir/previous-<n>, the first n not taken (nor, for a checkpoint.dir outside run.dir, the
    folder beside it that would hold its part)."""
    n = 1
    while (run_dir / f"{ASIDE_PREFIX}{n}").exists() or \
            (checkpoint_dir is not None and _beside(checkpoint_dir, run_dir / f"{ASIDE_PREFIX}{n}").exists()):
        n += 1
    return run_dir / f"{ASIDE_PREFIX}{n}"


@dataclass(frozen=True)
class Settled:
    aside: Optional[Path]
    """Where this attempt moved earlier material (None: nothing needed moving)."""
    message: str


def settle(held: Held, continues_after: Optional[int]) -> Settled:
    """Move aside what this attempt would otherwise overwrite (rules 2 and 3). `continues_after`:
    the step of the checkpoint in checkpoint.dir this attempt continues from, or None when it
    starts at step 0 (or from a checkpoint elsewhere) and the whole old run goes."""
    try:
        if continues_after is None:
            return _move_whole_run(held)
        return _move_after(held, continues_after)
    except OSError as exc:
        raise HarnessError(f"could not move the earlier attempt in {held.run_dir} aside ({first_line(exc)}); "
                           "make the folder writable, or choose another run.dir") from None


def _move_whole_run(held: Held) -> Settled:
    run_dir = held.run_dir
    if not held.holds_run and not _has_staging(held.checkpoint_dir):
        return Settled(None, "")
    outside = _checkpoints_outside(held)
    aside = next_aside(run_dir, outside)
    aside.mkdir()
    for entry in sorted(run_dir.iterdir()):
        if entry.name in KEPT_IN_PLACE or entry.name.startswith(ASIDE_PREFIX):
            continue
        entry.rename(aside / entry.name)
    if outside is not None and outside.is_dir():
        beside = _beside(outside, aside)
        outside.rename(beside)
        where = f"{aside} (checkpoints: {beside})"
    else:
        where = str(aside)
    return Settled(aside, f"run.dir: the earlier run ({held.describe()}) moved aside into {where}; starting afresh")


def _move_after(held: Held, step: int) -> Settled:
    folders = held.checkpoint_dir.iterdir() if held.checkpoint_dir.is_dir() else ()
    later = [p for p in folders if (n := _step_of(p)) is not None and n > step]
    rows_after = held.last_row is not None and held.last_row > step
    if not later and not rows_after:
        return Settled(None, "")
    outside = _checkpoints_outside(held)
    aside = next_aside(held.run_dir, outside)
    aside.mkdir()
    target = _beside(outside, aside) if outside is not None else aside / held.checkpoint_dir.relative_to(held.run_dir)
    if later:
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(later, key=_step_of):
            path.rename(target / path.name)
    if (held.run_dir / "metrics.jsonl").is_file():  # copies: the live files keep their rows up to `step`
        shutil.copy2(held.run_dir / "metrics.jsonl", aside / "metrics.jsonl")
    if (held.run_dir / "ranks").is_dir():
        shutil.copytree(held.run_dir / "ranks", aside / "ranks")
    what = []
    if later:
        what.append(f"{len(later)} later checkpoint(s) (to {target})")
    if rows_after:
        what.append(f"metrics rows {step + 1}..{held.last_row}")
    return Settled(aside, f"run.dir: what came after step {step} ({' and '.join(what)}) moved aside into {aside}")


def _step_of(path: Path) -> Optional[int]:
    """N of step-<N> or step-<N>.tmp (a save that did not finish), else None."""
    match = STEP_DIR.match(path.name.removesuffix(".tmp"))
    return int(match.group(1)) if match else None


def _has_staging(checkpoint_dir: Path) -> bool:
    return checkpoint_dir.is_dir() and any(checkpoint_dir.glob("step-*.tmp"))


def _checkpoints_outside(held: Held) -> Optional[Path]:
    """checkpoint.dir when it is not inside run.dir (its history then lives beside it)."""
    try:
        held.checkpoint_dir.resolve().relative_to(held.run_dir.resolve())
        return None
    except ValueError:
        return held.checkpoint_dir


def _beside(checkpoint_dir: Path, aside: Path) -> Path:
    """<checkpoint.dir>.previous-<n>, numbered as the run folder's aside."""
    return checkpoint_dir.with_name(f"{checkpoint_dir.name}.{aside.name}")
