"""The Slurm job script harness submit writes: the sbatch options, the environment, the
slurm.setup lines and the srun options (pyxis container, cores per rank), rendered into
slurm/train.sbatch or slurm/deepspeed.sbatch between their marker lines."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from harness.cli.site import node_cores
from harness.config.slurm import SlurmConfig
from harness.errors import HarnessError

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = {"srun": ROOT / "slurm" / "train.sbatch", "deepspeed": ROOT / "slurm" / "deepspeed.sbatch"}
BLOCK = re.compile(r"# --- sbatch options.*?\n(.*?)# --- end of sbatch options ---\n", re.S)


@dataclass
class Job:
    """What one submission asks for."""

    name: str
    nodes: int
    ranks_per_node: int
    launcher: str
    request_gpus: bool
    cpus_per_task: Optional[int]
    run_dir: str
    slurm: SlurmConfig
    extra_sbatch: list[str]


def cores_per_rank(slurm: SlurmConfig, ranks_per_node: int) -> Optional[int]:
    """slurm.cpus_per_task, else the node's cores divided by its ranks (None: sinfo cannot say)."""
    if slurm.cpus_per_task:
        return slurm.cpus_per_task
    cores = node_cores(slurm.partition)
    return max(1, cores // ranks_per_node) if cores else None


def sbatch_options(job: Job) -> list[str]:
    s = job.slurm
    options = [f"--job-name={job.name}", f"--nodes={job.nodes}", f"--ntasks-per-node={job.ranks_per_node}"]
    if job.request_gpus:
        options.append(f"--gpus-per-node={job.ranks_per_node}")
    if job.cpus_per_task:
        options.append(f"--cpus-per-task={job.cpus_per_task}")
    options += [f"--{key}={value}" for key, value in
                (("partition", s.partition), ("time", s.time), ("account", s.account), ("qos", s.qos),
                 ("constraint", s.constraint), ("mem", s.mem)) if value]
    if s.exclusive:
        options.append("--exclusive")
    # srun ranks are tasks of a job step and get the signal themselves; the deepspeed launcher's
    # ranks on the first node are children of the job script, which passes it on.
    target = "" if job.launcher == "srun" else "B:"
    options += [
        f"--signal={target}USR1@{s.signal_seconds}",
        "--requeue",
        # One job per run at a time: a second submission of the same run waits for the first,
        # then continues where it stopped (the run dir is the same).
        "--dependency=singleton",
        "--open-mode=append",
        f"--chdir={ROOT}",
        f"--output={ROOT}/runs/slurm/%x-%j.out",
        *job.extra_sbatch,
    ]
    return options


def srun_options(job: Job) -> list[str]:
    """pyxis's options for the ranks' container: the checkout at its own path, as the working
    directory, and the run dir when it lies outside the checkout."""
    s = job.slurm
    if not s.container_image:
        return []
    mounts = [f"{ROOT}:{ROOT}"]
    run_dir = Path(job.run_dir)
    if run_dir.is_absolute() and not run_dir.is_relative_to(ROOT):
        mounts.append(f"{run_dir}:{run_dir}")
    mounts += s.container_mounts
    return [f"--container-image={s.container_image}", f"--container-mounts={','.join(mounts)}",
            f"--container-workdir={ROOT}"]


def ranks_python(slurm: SlurmConfig, submitting_python: str) -> str:
    if slurm.python:
        return slurm.python
    return "python" if slurm.setup or slurm.container_image else submitting_python


def render(job: Job, env: dict[str, str]) -> str:
    """The template with its options block replaced by this job's: #SBATCH lines, exports, the
    srun options array and the slurm.setup lines (each stops the job, named, if it fails)."""
    if job.slurm.container_image and job.launcher != "srun":
        raise HarnessError("slurm.container_image needs --launcher srun (the deepspeed launcher starts ranks outside "
                           "the container); the srun launcher runs ZeRO too")
    template = TEMPLATES[job.launcher]
    lines = ["# --- sbatch options (rendered by harness submit) ---"]
    lines += [f"#SBATCH {option}" for option in sbatch_options(job)]
    lines.append("# --- end of sbatch options ---")
    lines += [f"export {key}={shlex.quote(value)}" for key, value in env.items()]
    srun = srun_options(job)
    if srun:
        lines.append("HARNESS_SRUN_ARGS=(" + " ".join(shlex.quote(arg) for arg in srun) + ")")
    if job.slurm.setup:
        # A function, called once the script has its arguments: a sourced activate script sees
        # none of them, and runs without `set -u` (conda's reads unset variables).
        lines.append("harness_setup() {  # slurm.setup: run before the ranks start; a failing line stops the job")
        for line in job.slurm.setup:
            message = shlex.quote(f"harness: slurm.setup line failed: {line}")
            lines.append(f"  {line} || {{ echo {message} >&2; exit 2; }}")
        lines.append("}")
    rendered, count = BLOCK.subn(lambda _: "\n".join(lines) + "\n", template.read_text())
    if count != 1:
        raise HarnessError(f"{template} lost its '# --- sbatch options' block; restore it from git")
    return rendered
