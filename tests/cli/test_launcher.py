"""The launcher's last line names the failure that came first (harness.cli.launcher._report)."""

from __future__ import annotations

import signal
from types import SimpleNamespace

from harness.cli.launcher import _report


def _failure(exitcode: int, timestamp: int, pid: int = 100, message=""):
    name = signal.Signals(-exitcode).name if exitcode < 0 else ""
    return SimpleNamespace(exitcode=exitcode, timestamp=timestamp, pid=pid, signal_name=lambda: name, message=message)


def _error(**failures):
    return SimpleNamespace(failures={int(rank[1:]): failure for rank, failure in failures.items()},
                           format_msg=lambda: "torchrun's report")


def test_a_rank_that_failed_is_named_not_the_rank_torchrun_ended_in_the_same_second(capsys):
    # Rank 1 explained itself (exit 2) and torchrun then ended rank 0 with SIGTERM, stamped the same second.
    assert _report(_error(r0=_failure(-signal.SIGTERM, 100), r1=_failure(2, 100)), ["cfg.yaml"]) == 2
    assert capsys.readouterr().err == ""  # rank 1 printed its own line
    crash = {"message": "ValueError: bad\nthing", "extraInfo": {}}
    assert _report(_error(r0=_failure(-signal.SIGTERM, 100), r1=_failure(1, 100, pid=9, message=crash)), ["cfg.yaml"]) == 1
    assert capsys.readouterr().err.startswith("harness: rank 1 (pid 9) failed first, exit code 1: ValueError: bad thing; ")


def test_a_rank_killed_outright_comes_before_the_ranks_that_lost_it(capsys):
    assert _report(_error(r0=_failure(4, 100), r1=_failure(-signal.SIGKILL, 100, pid=7)), ["/nowhere.yaml"]) == 137
    assert "rank 1 (pid 7) was killed by SIGKILL" in capsys.readouterr().err
    # An earlier second wins whatever it was.
    assert _report(_error(r0=_failure(-signal.SIGTERM, 99, pid=5), r1=_failure(2, 100)), ["/nowhere.yaml"]) == 143
