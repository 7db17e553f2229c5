"""Experiment tracking: exactly one wandb run per job, on rank 0, or nothing at all.

The trainer calls `log(row)` for every step and `finish()` at the end, with no `if wandb:` in the
loop: a job without `log.wandb=true`, and every rank but 0, gets `NullTracker`, and wandb is then
never imported (no service process is spawned).

The wandb run id is kept in `<run.dir>/wandb_run_id`. A resumed (or requeued) job reads it back and
continues the same wandb run (`resume="allow"`); a fresh run in the same folder starts a new one.
Rows are logged against the `step` field rather than wandb's own counter, so the steps an
interrupted attempt logged after its last checkpoint simply appear again after the resume.
"""

from __future__ import annotations

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

    def log(self, row: dict[str, Any]) -> None:
        self.run.log(row)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def _new_run_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def build_tracker(cfg: Config, rank: int, resumed: bool) -> NullTracker | WandbTracker:
    if not cfg.log.wandb or rank != 0:
        return NullTracker()
    return WandbTracker(cfg, resumed)
