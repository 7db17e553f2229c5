"""Experiment tracking: exactly one wandb run per job, on rank 0, or nothing at all.

The trainer calls `log(row)` for every step and `finish()` at the end, with no `if wandb:` in the
loop: a job without `log.wandb=true`, and every rank but 0, gets `NullTracker`, and wandb is then
never imported (no service process is spawned).

The wandb run id is kept in `<run.dir>/wandb_run_id`. A resumed (or requeued) job reads it back and
continues the same wandb run (`resume="allow"`); a fresh run in the same folder starts a new one.
Rows are logged against the `step` field rather than wandb's own counter, so the steps an
interrupted attempt logged after its last checkpoint simply appear again after the resume.

wandb's service process exits on SIGTERM without writing what it still buffered, and Slurm sends
SIGTERM to every process of a job step. So a resumed run first reads back the steps the earlier
attempts' run files really hold and re-logs, from metrics.jsonl, any checkpointed step they lack.
"""

from __future__ import annotations

import json
import os
import secrets
import string
from pathlib import Path
from typing import Any

from harness.config import Config

RUN_ID_FILE = "wandb_run_id"


class NullTracker:
    def log(self, row: dict[str, Any]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker:
    def __init__(self, cfg: Config, resumed: bool) -> None:
        import wandb

        run_dir = Path(cfg.run.dir)
        wandb_dir = Path(os.environ.get("WANDB_DIR") or run_dir)
        id_file = run_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if resumed and id_file.exists() else _new_run_id()
        id_file.write_text(run_id + "\n")
        log = cfg.log
        self.run = wandb.init(
            project=log.wandb_project,
            entity=log.wandb_entity,
            group=log.wandb_group,
            name=log.wandb_name or cfg.run.name,
            tags=log.wandb_tags or None,
            mode=log.wandb_mode,
            # WANDB_DIR, when set, is wandb's own choice of folder; otherwise the run's folder.
            dir=None if os.environ.get("WANDB_DIR") else str(run_dir),
            id=run_id,
            resume="allow",
            config=cfg.to_dict(),
        )
        self.run.define_metric("*", step_metric="step")
        if resumed:
            self._backfill(run_dir, wandb_dir, run_id)

    def _backfill(self, run_dir: Path, wandb_dir: Path, run_id: str) -> None:
        from harness.wandb_file import find_runs, read_run

        recorded = set()
        for path in find_runs(wandb_dir, run_id)[:-1]:  # the last one is this attempt's
            try:
                recorded |= {row["step"] for row in read_run(path)["history"] if "step" in row}
            except Exception:  # noqa: BLE001 - a file cut off mid-record still tells us nothing more
                continue
        metrics = run_dir / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        missing = [row for row in rows if row["step"] not in recorded]
        for row in missing:
            self.log(row)
        if missing:
            print(f"wandb: re-logged steps {missing[0]['step']}..{missing[-1]['step']} that the interrupted "
                  "attempt had not recorded", flush=True)

    def log(self, row: dict[str, Any]) -> None:
        if self.run is not None:
            self._guarded(self.run.log, row)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self._guarded(self.run.finish, exit_code=exit_code)
            self.run = None

    def _guarded(self, call, *args, **kwargs) -> None:
        # Tracking must never take training down. wandb's service process receives the same
        # SIGTERM as the ranks when Slurm signals a job step, and drops its connection; the
        # checkpoint and the exit that the signal asks for still have to happen.
        try:
            call(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any wandb failure means the same: stop tracking
            print(f"wandb stopped working ({type(exc).__name__}: {exc}); tracking is off for the rest of "
                  "this attempt, metrics.jsonl is complete", flush=True)
            self.run = None


def _new_run_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def build_tracker(cfg: Config, rank: int, resumed: bool) -> NullTracker | WandbTracker:
    if not cfg.log.wandb or rank != 0:
        return NullTracker()
    return WandbTracker(cfg, resumed)
