"""The one exception type for problems a user can fix.

Anything raised as `HarnessError` is caught once at the entry point, printed as one line and
turned into a non-zero exit code; everything else is a bug and keeps its traceback.
"""


def first_line(exc: BaseException) -> str:
    """The first line of an exception from a library, to quote inside a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class HarnessError(Exception):
    """A user-fixable problem (config, data, checkpoint, environment). One line: what and how to fix.

    Every rank usually meets the same problem, so only rank 0 prints it; `rank_local=True` marks
    one that only this rank can see, which that rank then prints itself.
    """

    exit_code = 2
    heading: "str | None" = "error"
    """What the one line says before the message ("harness: error: ..."); None: nothing."""

    def __init__(self, message: str, rank_local: bool = False) -> None:
        super().__init__(message)
        self.rank_local = rank_local


def report_line(exc: HarnessError, rank: int) -> "str | None":
    """The one line a rank prints for `exc` (None: rank 0 speaks for every rank)."""
    if rank != 0 and not exc.rank_local:
        return None
    prefix = f"[rank {rank}] " if exc.rank_local else ""
    heading = f"{exc.heading}: " if exc.heading else ""
    return f"{prefix}harness: {heading}{exc}"


class ConfigError(HarnessError):
    """The config (file or CLI overrides) is invalid."""


class TrainingAborted(HarnessError):
    """Training cannot continue (e.g. the fp16 loss scale hit its floor). Not bad input: exit 3."""

    exit_code = 3


class RunFinished(HarnessError):
    """The run folder already holds the finished run (its newest checkpoint reached train.steps):
    nothing to train and nothing wrong, so the exit code is 0."""

    exit_code = 0
    heading = None
