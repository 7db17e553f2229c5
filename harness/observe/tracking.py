"""Experiment tracking: exactly one wandb run per job, on rank 0, or nothing at all.

The trainer calls `log(row)` for every step and `finish()` at the end, with no `if wandb:` in the
loop: a job without `log.wandb=true`, and every rank but 0, gets `NullTracker`, and wandb is then
never imported (no service process is spawned).

The wandb run id is kept in `<run.dir>/wandb_run_id`. A resumed (or requeued) job reads it back and
continues the same wandb run (`resume="allow"`); a fresh run in the same folder starts a new one.
Rows are logged against the `step` field rather than wandb's own counter, so the steps an
interrupted attempt logged after its last checkpoint simply appear again after the resume.

Online mode checks two things before wandb is started, so neither becomes a traceback or a hang:
an API key must be configured (else a one-line error: `wandb login`, or log.wandb_mode=offline),
and the server must answer within log.wandb_connect_timeout_s (else the run logs offline, with one
warning that prints the `wandb sync` command to upload it later).

wandb's service process exits on SIGTERM without writing what it still buffered, and Slurm sends
SIGTERM to every process of a job step. So a resumed run first reads back the steps the earlier
attempts' run files really hold and re-logs, from metrics.jsonl, any checkpointed step they lack.
"""

from __future__ import annotations

import json
import netrc
import os
import secrets
import socket
import string
import threading
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from harness.config import Config, LogConfig
from harness.errors import HarnessError

RUN_ID_FILE = "wandb_run_id"


class NullTracker:
    def log(self, row: dict[str, Any], completions: Optional[list[dict]] = None) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker:
    def __init__(self, cfg: Config, resumed: bool) -> None:
        self.completions: list[list] = []
        """Every eval.prompts completion so far: (step, prompt, completion)."""
        run_dir = Path(cfg.run.dir)
        wandb_dir = Path(os.environ.get("WANDB_DIR") or run_dir)
        mode = choose_mode(cfg.log, wandb_dir)
        import wandb

        id_file = run_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if resumed and id_file.exists() else _new_run_id()
        id_file.write_text(run_id + "\n")
        log = cfg.log
        init = dict(
            project=log.wandb_project,
            entity=log.wandb_entity,
            group=log.wandb_group,
            name=log.wandb_name or cfg.run.name,
            tags=log.wandb_tags or None,
            # WANDB_DIR, when set, is wandb's own choice of folder; otherwise the run's folder.
            dir=None if os.environ.get("WANDB_DIR") else str(run_dir),
            id=run_id,
            resume="allow",
            config=cfg.to_dict(),
        )
        try:
            self.run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=log.wandb_connect_timeout_s), **init)
        except (wandb.errors.CommError, wandb.errors.UsageError, TimeoutError) as exc:
            if mode != "online":
                raise
            # The name resolved and a connection opened, but no wandb server answered (a proxy, a
            # firewall that intercepts): offline, as for a node with no route out.
            _warn_offline(urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "wandb",
                          str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__, wandb_dir)
            wandb.teardown()  # the failed attempt still holds the run id in this process
            self.run = wandb.init(mode="offline", **init)
        self.run.define_metric("*", step_metric="step")
        if resumed:
            self._backfill(run_dir, wandb_dir, run_id)

    def _backfill(self, run_dir: Path, wandb_dir: Path, run_id: str) -> None:
        from harness.observe.wandb_file import find_runs

        recorded = recorded_steps(find_runs(wandb_dir, run_id)[:-1])  # the last one is this attempt's
        metrics = run_dir / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        missing = [row for row in rows if row["step"] not in recorded]
        for row in missing:
            self.log(row)
        if missing:
            print(f"wandb: re-logged steps {missing[0]['step']}..{missing[-1]['step']} that the interrupted "
                  "attempt had not recorded", flush=True)

    def log(self, row: dict[str, Any], completions: Optional[list[dict]] = None) -> None:
        """A metrics row; with eval.prompts' completions, the table of every completion so far
        (step, prompt, completion) under `completions`, in the same record."""
        if self.run is None:
            return
        if completions:
            import wandb

            self.completions.extend([row["step"], c["prompt"], c["completion"]] for c in completions)
            row = {**row, "completions": wandb.Table(columns=["step", "prompt", "completion"],
                                                     data=[list(r) for r in self.completions])}
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


def recorded_steps(run_files: list[Path]) -> set[int]:
    """The steps earlier attempts of a run logged to wandb (their run files). A file that cannot be
    read stops the run: guessing would re-log its whole history into the same wandb run."""
    from harness.observe.wandb_file import UnreadableRunFile, read_run

    steps: set[int] = set()
    for path in run_files:
        try:
            steps |= {row["step"] for row in read_run(path)["history"] if "step" in row}
        except (UnreadableRunFile, OSError) as exc:
            raise HarnessError(
                f"wandb: cannot read the earlier attempt's run file ({exc}); to resume the same wandb run, move "
                f"that file away (its steps are then logged again), or set log.wandb=false"
            ) from None
    return steps


def _new_run_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def build_tracker(cfg: Config, rank: int, resumed: bool) -> NullTracker | WandbTracker:
    if not cfg.log.wandb or rank != 0:
        return NullTracker()
    return WandbTracker(cfg, resumed)


def choose_mode(log: LogConfig, wandb_dir: Path) -> str:
    """online, offline or disabled, as configured; online only with an API key (else a one-line
    error) and a server that answers in time (else offline, with the command to sync later)."""
    mode = log.wandb_mode or os.environ.get("WANDB_MODE") or "online"
    if mode != "online":
        return mode
    base_url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    host = urlparse(base_url).hostname or base_url
    if not has_api_key(host):
        raise HarnessError(
            "log.wandb=true logs online, but no wandb API key is configured on this machine: run `wandb login` "
            "(or set WANDB_API_KEY), or set log.wandb_mode=offline and upload later with `wandb sync`"
        )
    problem = unreachable(base_url, log.wandb_connect_timeout_s)
    if problem is not None:
        _warn_offline(host, problem, wandb_dir)
        return "offline"
    return mode


def _warn_offline(host: str, problem: str, wandb_dir: Path) -> None:
    print(f"warning: wandb: {host} is not reachable from this node ({problem}); logging offline to "
          f"{wandb_dir / 'wandb'}; upload it later with: wandb sync {wandb_dir / 'wandb'}/offline-run-*", flush=True)


def has_api_key(host: str) -> bool:
    """WANDB_API_KEY, or the netrc entry `wandb login` writes, or wandb's own lookup."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        if netrc.netrc(os.environ.get("NETRC") or None).authenticators(host):
            return True
    except (OSError, netrc.NetrcParseError):
        pass
    try:
        from wandb.sdk.lib import apikey

        return bool(apikey.api_key())
    except Exception:  # noqa: BLE001 - an older or newer wandb without this helper: no key found
        return False


def unreachable(base_url: str, timeout_s: float) -> Optional[str]:
    """None if a TCP connection to the server opens within timeout_s (name lookup included),
    else why not."""
    parsed = urlparse(base_url)
    host = parsed.hostname or base_url
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    outcome: list = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc.strerror or str(exc) or type(exc).__name__)

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout_s)
    if not outcome:
        return f"no answer in {timeout_s:g} s"
    return outcome[0]
