"""`python -m harness.cli.launcher NPROC CONFIG.yaml [overrides]`: NPROC ranks on this node via torchrun.
`... NPROC SCRIPT.py [args]` starts a script of the Python API (harness.Trainer) the same way.

What it adds to torchrun:
- **Signals.** SIGINT (Ctrl-C) and SIGTERM go to every rank, once, and the launcher waits: the
  ranks save a checkpoint after the current step and exit 0. A second signal is passed on too, and
  the ranks exit at once (harness.runtime.preemption). torchrun's own handling would send the signal and
  SIGKILL the ranks 30 s later, whether or not their checkpoint was written.
- **A dead rank ends the job quickly.** When a rank dies, torchrun stops the others (SIGTERM,
  then SIGKILL after FAILURE_GRACE_S rather than 30 s: a job that lost a rank cannot checkpoint).
- **One last line that says what happened.** A rank that explained itself in one line (a user
  error, exit 2; an aborted run, 3; a hang or a lost peer, 4; a stop signal under Slurm, 75) needs
  no report. A rank killed by a signal is named with the signal, the newest checkpoint and how to
  resume. A rank that crashed is named with its error (its traceback is above, in its output).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Optional, Sequence

EXPLAINED_EXIT_CODES = {2, 3, 4, 75}  # user error, aborted run, hang / lost rank, stopped by a signal (Slurm)
FAILURE_GRACE_S = 10
"""After a rank failed: how long the others get to exit on SIGTERM before SIGKILL (torchrun: 30 s).
Long enough for the watchdog to write its stack dumps (harness.runtime.watchdog)."""
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or not args[0].isdigit():
        print("usage: python -m harness.cli.launcher NPROC CONFIG.yaml [key.sub=value ...] | NPROC SCRIPT.py [args]",
              file=sys.stderr)
        return 2
    nproc, rest = args[0], args[1:]
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, parse_args, run

    own = ["--standalone", f"--nproc-per-node={nproc}"]
    # torchrun installs its own handlers for the signals it is told to handle; SIGINT and SIGTERM are ours.
    if "--signals-to-handle" in get_args_parser()._option_string_actions:
        own.append("--signals-to-handle=SIGHUP,SIGQUIT")
    target = rest if rest[0].endswith(".py") else ["--module", "harness", "train", *rest]
    torchrun_args = parse_args([*own, *target])
    elastic_log = logging.getLogger("torch.distributed.elastic")
    elastic_log.setLevel(logging.CRITICAL)
    forwarder = SignalForwarder().install()
    _shorten_failure_grace()
    try:
        run(torchrun_args)
    except ChildFailedError as err:
        if forwarder.count > 1:  # asked twice: the ranks exited at once and said so
            return 128 + forwarder.last_signal
        return _report(err, rest)
    return 0


class SignalForwarder:
    """Passes SIGINT/SIGTERM on to every rank (each rank runs in its own session, so a terminal's
    Ctrl-C reaches only this process). A third signal kills the ranks outright."""

    def __init__(self) -> None:
        self.count = 0
        self.last_signal = 0

    def install(self) -> "SignalForwarder":
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.count += 1
        self.last_signal = signum
        sent = signal.SIGKILL if self.count >= 3 else signum
        for pid in _children():
            try:
                os.killpg(pid, sent)
            except OSError:
                try:
                    os.kill(pid, sent)
                except OSError:
                    pass
        if self.count == 1:
            print(f"harness: {signal.Signals(signum).name}: every rank checkpoints after its current step and exits; "
                  "send it again to stop at once", file=sys.stderr, flush=True)


def _children() -> list[int]:
    """This process's child processes (the ranks torchrun started), from /proc."""
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after the last ')'.
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == me:
            found.append(int(entry.name))
    return found


def _shorten_failure_grace() -> None:
    """torchrun waits 30 s for the surviving ranks to exit on SIGTERM before it SIGKILLs them. A
    frozen rank (SIGSTOP, a hung driver) never does; nothing is saved in those 30 s either.
    Every path (a failed rank seen by the monitor, the agent's shutdown) goes through
    PContext.close, whose timeout is capped here."""
    try:
        from torch.distributed.elastic.multiprocessing import api
    except ImportError:
        return
    close = getattr(api.PContext, "close", None)
    if close is None or getattr(close, "_harness", False):
        return

    def capped_close(self, death_sig=None, timeout=30):
        return close(self, death_sig, min(timeout, FAILURE_GRACE_S))

    capped_close._harness = True
    api.PContext.close = capped_close


def _report(err, rest: Sequence[str]) -> int:
    """The launcher's last line, from the failure that came first (a killed rank before the
    ranks that then lost contact with it; a rank that reported a hang before the frozen rank the
    launcher had to kill)."""
    rank, first = min(err.failures.items(), key=lambda kv: (kv[1].timestamp, _precedence(kv[1].exitcode), kv[0]))
    if first.exitcode < 0:
        print(f"harness: rank {rank} (pid {first.pid}) was killed by {first.signal_name()}; the job stopped and the "
              f"other ranks were ended. {_newest_checkpoint(rest)}", file=sys.stderr, flush=True)
        return 128 + (-first.exitcode)
    if first.exitcode in EXPLAINED_EXIT_CODES:
        return first.exitcode
    print(f"harness: rank {rank} (pid {first.pid}) failed first, exit code {first.exitcode}: {_error_of(first)}; "
          f"the other ranks were ended. {_newest_checkpoint(rest)}", file=sys.stderr, flush=True)
    return 1


def _error_of(failure) -> str:
    """The error a rank recorded (its exception's type and message, written through torch's
    error handler by harness.cli.train), on one line."""
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    text = " ".join(str(message or "").split())
    if not text or text.startswith("To enable traceback"):
        return "it recorded no error (its output above says why)"
    return text if len(text) <= 300 else text[:297] + "..."


def _precedence(exitcode: int) -> int:
    """Among failures in the same second (torchrun stamps whole seconds): a rank killed outright
    (SIGKILL: a drill, the OOM killer) came first, then a rank that exited with an error; a rank
    ended by SIGTERM was most likely ended by torchrun because another one had failed."""
    if exitcode == -signal.SIGKILL:
        return 0
    return 1 if exitcode > 0 else 2


def _newest_checkpoint(rest: Sequence[str]) -> str:
    """Where the run can continue from, for the last line (best effort: the config was checked
    before the ranks started, but the folder may be anywhere)."""
    try:
        from harness.checkpoint import complete_checkpoints
        from harness.config import load_config

        cfg = load_config(rest[0], [a for a in rest[1:] if "=" in a and not a.startswith("-")])
        newest = complete_checkpoints(Path(cfg.checkpoint.dir))
    except Exception:
        return "Run the same command again to continue from the newest checkpoint."
    if not newest:
        return f"No checkpoint was saved yet (checkpoint.dir={cfg.checkpoint.dir})."
    return f"Newest checkpoint: {newest[-1]}; run the same command again to continue from it."


if __name__ == "__main__":
    from harness.runtime.process import exit_process

    exit_process(main())
