"""The process itself: environment set before the libraries read it, whether a process of this host
lives, and a clean exit (no torch import here)."""

from __future__ import annotations

import logging
import os
import sys


def quiet_imports_without_gpus() -> None:
    """transformers imports DeepSpeed and torchao when they are installed. On a CPU-only machine
    DeepSpeed warns that it fell back to its CPU accelerator (name that accelerator up front
    instead), and torchao reports each CUDA kernel library it could not load and registers enums
    torch now calls deprecated (its own messages, at import, whatever the run does)."""
    if os.path.exists("/dev/nvidiactl"):
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


def env_rank() -> int:
    """This process's rank as the launcher's environment says (0 without one), read without
    torch: for deciding which rank prints a one-line error."""
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def exit_process(code: int) -> None:
    """Flush and leave without running gloo's static destructors: they abort intermittently at
    interpreter exit (pytorch #190489), which would turn a clean run into a crash report."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this host runs. A zombie (exited, or killed, and not yet reaped by
    its parent, as a launcher's dead rank is for a moment) does not."""
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc: ask the kernel whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
