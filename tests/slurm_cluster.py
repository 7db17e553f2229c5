"""A real Slurm cluster on this machine for the tests: one slurmctld and two slurmd daemons
(node1, node2) with their own ports, so jobs can span two "nodes". Debian's packages are
installed with apt when missing (the suite runs as root on our machines and in CI)."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]

# Slurm refuses to start when FirstJobId > MaxJobId ("fatal: Unable to process configuration
# file"); its default MaxJobId is 0x03ff0000, and ids above it are reserved for federations.
MAX_JOB_ID = 67_043_328
# Each test cluster takes a block of ids: far more jobs than one test session submits.
JOB_ID_BLOCK = 10_000
# Job ids name the default run dirs and job logs (runs/<job name>-<job id>), which outlive a
# cluster: clusters started on one machine hand out ids from one machine-wide counter.
JOB_ID_COUNTER = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "harness-tests" / "slurm-next-job-id"


class SlurmUnavailable(RuntimeError):
    pass


def ensure_installed() -> None:
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "scontrol")):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("Slurm is not installed and installing it with apt-get needs root")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if result.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed: {result.stderr.strip()[-500:]}")


def reserve_job_ids(counter: Path, now: float) -> int:
    """The first id of a block of JOB_ID_BLOCK ids that no earlier cluster on this machine used.

    The counter file is locked while read and advanced. A machine without one (a fresh CI box)
    starts at a block chosen from the clock, inside the valid range, so ids from an earlier
    machine's leftover run dirs are unlikely to repeat either. Past MAX_JOB_ID it wraps to 1.
    """
    blocks = (MAX_JOB_ID - 1) // JOB_ID_BLOCK
    counter.parent.mkdir(parents=True, exist_ok=True)
    with open(counter, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        text = handle.read().strip()
        block = int(text) if text.isdigit() else int(now) // 60 % blocks
        handle.seek(0)
        handle.truncate()
        handle.write(f"{(block + 1) % blocks}\n")
    return 1 + block % blocks * JOB_ID_BLOCK


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class Cluster:
    def __init__(self, root: Path, clock: Callable[[], float] = time.time,
                 job_id_counter: Path = JOB_ID_COUNTER) -> None:
        self.root = root
        self.clock = clock
        self.job_id_counter = job_id_counter
        self.first_job_id = 0
        self.conf = root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def write_config(self) -> None:
        host = socket.gethostname()
        ctld, d1, d2 = _free_ports(3)
        self.first_job_id = reserve_job_ids(self.job_id_counter, self.clock())
        for sub in ("state", "spool-node1", "spool-node2", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"""\
ClusterName=harness-test
FirstJobId={self.first_job_id}
MaxJobId={MAX_JOB_ID}
SlurmctldHost={host}
AuthType=auth/none
CredType=cred/none
SlurmUser=root
MpiDefault=none
SlurmctldPort={ctld}
SlurmdPort={d1}
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool-%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
KillWait=60
SchedulerParameters=defer_batch
NodeName=node1 NodeHostname={host} NodeAddr=127.0.0.1 Port={d1} CPUs=2 RealMemory=4000 State=UNKNOWN
NodeName=node2 NodeHostname={host} NodeAddr=127.0.0.1 Port={d2} CPUs=2 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE OverSubscribe=FORCE:4 State=UP
""")

    def start(self) -> None:
        self.write_config()
        log = open(self.root / "log" / "daemons.out", "w")
        self.procs.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(self.conf)], stdout=log,
                                           stderr=log, env=self.env))
        time.sleep(1.5)
        for node in ("node1", "node2"):
            self.procs.append(subprocess.Popen(["slurmd", "-D", "-N", node, "-f", str(self.conf)], stdout=log,
                                               stderr=log, env=self.env))
        deadline = time.time() + 60
        out: list[str] = []
        while time.time() < deadline and all(proc.poll() is None for proc in self.procs):
            out = self.run(["sinfo", "-h", "-o", "%T %D"]).stdout.split()
            if out[:2] == ["idle", "2"]:
                return
            time.sleep(1)
        self.stop()
        raise SlurmUnavailable(f"the test cluster did not come up: sinfo says {' '.join(out) or 'nothing'}; "
                               f"the daemons said:\n{self.daemon_log_tail()}")

    def daemon_log_tail(self, lines: int = 15) -> str:
        """The last lines of each daemon's own log: where Slurm says why it would not start."""
        tails = []
        for log in sorted((self.root / "log").glob("*")):
            text = log.read_text(errors="replace").strip().splitlines()
            if text:
                tails.append(f"--- {log.name}\n" + "\n".join(text[-lines:]))
        return "\n".join(tails) or "(no daemon log was written)"

    def run(self, cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=120, **kwargs)

    def state(self, job_id: str) -> str:
        out = self.run(["scontrol", "show", "job", job_id, "-o"]).stdout
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def wait_for(self, job_id: str, states: set[str], timeout: float = 600) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.state(job_id)
            if state in states:
                return state
            if state in {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}:
                raise AssertionError(f"job {job_id} ended {state} while waiting for {sorted(states)}")
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still {self.state(job_id)} after {timeout}s")

    def stop(self) -> None:
        self.run(["scancel", "--user=root"])
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
