"""The `slurm:` section: how `harness submit` asks a Slurm site for the job and prepares each
node before the ranks start. Training never reads it; it lives in the config so that a run's
resources travel with the run (the same file is submitted again to continue it)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from harness.errors import ConfigError

_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$|^\d+$")
_MEM = re.compile(r"^\d+[KMGT]?$")


@dataclass
class SlurmConfig:
    partition: str = ""
    """Partition (sbatch --partition). Empty: the site's default partition."""
    time: str = ""
    """Time limit of each job: minutes, HH:MM:SS or D-HH:MM:SS (sbatch --time). Empty: the partition's default. Longer runs: harness submit --chain N."""
    account: str = ""
    """Account charged for the job (sbatch --account)."""
    qos: str = ""
    """Quality of service (sbatch --qos)."""
    constraint: str = ""
    """Node features the job needs, e.g. h100 or "ib&h100" (sbatch --constraint)."""
    mem: str = ""
    """Host memory per node, e.g. 480G (sbatch --mem; K/M/G/T suffixes, a bare number is MB); 0 asks for all of each node's memory. Empty: the site's default, often a few GB per CPU. harness check compares it with the estimate."""
    cpus_per_task: int = 0
    """CPU cores per rank, given to sbatch and srun (--cpus-per-task); each rank's OMP_NUM_THREADS is set from it. 0: each node's cores divided by its ranks, as sinfo reports them at submission."""
    exclusive: bool = False
    """Whole nodes, shared with no other job (sbatch --exclusive)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines the job script runs on the first node before it starts the ranks, e.g. "module load cuda/12.8", "source ~/miniforge3/bin/activate train" or "source /shared/venvs/harness/bin/activate"; srun passes the environment they leave to every rank."""
    container_image: str = ""
    """Run every rank in this container (pyxis: srun --container-image), e.g. nvcr.io#nvidia/pytorch:25.01-py3 or /shared/images/harness.sqsh. The checkout is mounted at its own path and is the working directory."""
    container_mounts: list[str] = field(default_factory=list)
    """More mounts into the container, each SRC:DST[:FLAGS] as pyxis takes them: a list ([/lustre:/lustre, /scratch:/scratch]) or pyxis's comma-separated form (slurm.container_mounts=/lustre:/lustre,/scratch:/scratch)."""
    python: str = ""
    """The Python that runs the ranks. Default: the one running harness submit; with slurm.setup or slurm.container_image, the `python` on the job's PATH after them."""
    signal_seconds: int = 120
    """Slurm sends USR1 this long before the time limit; every rank then finishes its step, saves and stops (harness check verifies the lead covers log.every steps plus a save)."""


def validate_slurm(s: SlurmConfig) -> None:
    """Raise ConfigError naming the first slurm.* key Slurm would refuse."""
    if s.time and not _TIME.match(s.time):
        raise ConfigError(f"slurm.time {s.time!r} is not a Slurm time (minutes, HH:MM:SS or D-HH:MM:SS)")
    if s.mem and not _MEM.match(s.mem.upper()):
        raise ConfigError(f"slurm.mem {s.mem!r} is not a Slurm memory size (e.g. 480G, 64000 for MB, or 0 for all)")
    if s.cpus_per_task < 0:
        raise ConfigError(f"slurm.cpus_per_task must be >= 0 (0: the node's cores divided by its ranks; got {s.cpus_per_task})")
    if s.signal_seconds < 1:
        raise ConfigError(f"slurm.signal_seconds must be >= 1 (got {s.signal_seconds})")
    for i, line in enumerate(s.setup):
        if not isinstance(line, str) or "\n" in line:
            raise ConfigError(f"slurm.setup[{i}] must be one shell line (got {line!r}); give each line its own entry")
    for i, mount in enumerate(s.container_mounts):
        if not isinstance(mount, str) or "," in mount or ":" not in mount:
            raise ConfigError(f"slurm.container_mounts[{i}] must be one SRC:DST[:FLAGS] mount (got {mount!r})")
    if s.container_mounts and not s.container_image:
        raise ConfigError("slurm.container_mounts needs slurm.container_image (mounts go into the container)")


def mem_gib(mem: str) -> float | None:
    """slurm.mem in GiB (None for empty or 0: the site's default or the whole node)."""
    if not mem or mem == "0":
        return None
    scale = {"K": 2**-20, "M": 2**-10, "G": 1.0, "T": 2**10}
    unit = mem[-1].upper()
    return int(mem[:-1]) * scale[unit] if unit in scale else int(mem) * 2**-10
