"""Real faults injected into real 2-rank jobs (launch/local.sh: torchrun, gloo), with hard time
limits: a drill that hangs fails its test instead of holding the suite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
TINY = "configs/tiny.yaml"
HARNESS_TRAIN = [sys.executable, "-m", "harness", "train"]
QUIET = ["log.progress=off", "eval.every=0"]
BACKENDS = {"fsdp2": ["parallel.backend=fsdp2"], "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"]}


@dataclass
class Finished:
    returncode: int
    output: str
    seconds: float
    """From the fault (or the start) to the launcher's exit."""

    @property
    def last_line(self) -> str:
        lines = [line for line in self.output.splitlines() if line.strip()]
        return lines[-1] if lines else ""


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a row being written
    return out


def losses(run_dir: Path) -> dict[int, float]:
    """The loss of every step, the last row of a step winning (rollbacks re-run steps)."""
    return {row["step"]: row["loss"] for row in rows(run_dir)}


def run(run_dir: Path, *overrides: str, nproc: int = 2, config: str = TINY, timeout: float = 300) -> Finished:
    """A whole job, to its end."""
    started = time.monotonic()
    cmd = ["launch/local.sh", str(nproc), config] if nproc > 1 else [*HARNESS_TRAIN, config]
    result = subprocess.run([*cmd, f"run.dir={run_dir}", *QUIET, *overrides], cwd=ROOT, capture_output=True,
                            text=True, timeout=timeout)
    return Finished(result.returncode, result.stdout + result.stderr, time.monotonic() - started)


class Job:
    """A 2-rank job running in the background, to inject a fault into once it reaches a step."""

    def __init__(self, run_dir: Path, *overrides: str, config: str = TINY, nproc: int = 2) -> None:
        self.run_dir = run_dir
        self.process = subprocess.Popen(
            ["launch/local.sh", str(nproc), config, f"run.dir={run_dir}", *QUIET, "log.every=1", *overrides],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        self.fault_at: Optional[float] = None

    def wait_for_step(self, step: int, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not any(row["step"] >= step for row in rows(self.run_dir)):
            if self.process.poll() is not None:
                raise AssertionError(f"the job ended before step {step}:\n{self.process.stdout.read()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"the job did not reach step {step} in {timeout} s")
            time.sleep(0.1)

    def rank_pid(self, rank: int) -> int:
        """The process of rank `rank` of this job (found by its environment)."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"\0harness\0train\0" in cmdline and str(self.run_dir).encode() in cmdline and f"RANK={rank}".encode() in environ:
                return int(entry.name)
        raise AssertionError(f"no process of rank {rank} found")

    def signal_rank(self, rank: int, sig: int) -> None:
        pid = self.rank_pid(rank)
        self.fault_at = time.monotonic()
        os.kill(pid, sig)

    def signal_launcher(self, sig: int) -> None:
        self.fault_at = self.fault_at or time.monotonic()
        self.process.send_signal(sig)

    def finish(self, timeout: float) -> Finished:
        """Wait for the launcher to exit; a job still running after `timeout` is killed and fails."""
        try:
            output, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            output, _ = self.process.communicate()
            raise AssertionError(f"the job was still running {timeout} s after the fault:\n{output[-3000:]}") from None
        return Finished(self.process.returncode, output, time.monotonic() - (self.fault_at or 0))

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except OSError:
            pass
        for pid in _processes_of(self.run_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _processes_of(run_dir: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(run_dir).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def no_process_left(run_dir: Path) -> bool:
    """No rank, launcher or helper of this job is still alive (zombies aside)."""
    alive = []
    for pid in _processes_of(run_dir):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            alive.append(pid)
    return not alive
