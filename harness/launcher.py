"""`python -m harness.launcher NPROC CONFIG.yaml [overrides]`: NPROC ranks on this node via torchrun.

torchrun itself reports any failed rank with a Python traceback of its own. When a rank stopped
for a reason it already printed in one line (a user error, exit 2, an aborted run, exit 3, or
a stop signal after its checkpoint, exit 75),
that report is noise, so it is dropped and the rank's exit code is passed on. Anything else (a
crash, a signal) keeps torchrun's full report.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional, Sequence

EXPLAINED_EXIT_CODES = {2, 3, 75}  # user error, aborted run, stopped by a signal after a checkpoint


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or not args[0].isdigit():
        print("usage: python -m harness.launcher NPROC CONFIG.yaml [key.sub=value ...]", file=sys.stderr)
        return 2
    nproc, rest = args[0], args[1:]
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    torchrun_args = parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module", "harness.train", *rest])
    elastic_log = logging.getLogger("torch.distributed.elastic")
    elastic_log.setLevel(logging.CRITICAL)
    try:
        run(torchrun_args)
    except ChildFailedError as err:
        _, first = err.get_first_failure()
        if first.exitcode in EXPLAINED_EXIT_CODES:
            return first.exitcode
        print(err.format_msg(), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from harness.cli import exit_process

    exit_process(main())
