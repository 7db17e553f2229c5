"""`harness submit CONFIG.yaml [overrides] --nodes N --gpus-per-node G [...]`: a Slurm job in one command.

Runs the preflight (harness check), renders slurm/train.sbatch (or slurm/deepspeed.sbatch with
--launcher deepspeed) with the config's slurm: section and the flags (which win), submits it with
sbatch (whatever cluster sbatch reaches; SLURM_CONF is honoured), and prints the job id and the
run dir. The run dir is the config's (runs/<run.name> unless run.dir is set), so submitting the
same config again continues the run (resume=auto); --chain N queues N jobs that each continue
the last. --dry-run prints the script and the sbatch commands, and writes nothing.

--gpus-per-node G is the number of ranks per node. GPUs are requested (--gpus-per-node=G) when
the cluster has GPU resources (sinfo reports a gpu GRES) or with --gpus yes; on a CPU-only
cluster the same command runs G CPU ranks per node.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from harness.cli.jobscript import ROOT, TEMPLATES, Job, cores_per_rank, ranks_python, render
from harness.cli.site import has_gpus
from harness.config import load_config, validate_for_world
from harness.config.slurm import validate_slurm
from harness.errors import HarnessError

# Flags that set a slurm.* key (the flag wins over the config).
SLURM_FLAGS = ("partition", "time", "account", "qos", "constraint", "mem", "cpus_per_task", "exclusive", "setup",
               "container_image", "container_mounts", "python", "signal_seconds")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="harness submit", description=__doc__.split("\n\n")[1])
    parser.add_argument("config", help="YAML config")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides for the job")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=1, help="ranks per node: GPUs, or CPU ranks on CPU nodes")
    parser.add_argument("--chain", type=int, default=1, metavar="N",
                        help="queue N jobs, each continuing the run where the last stopped (afterany, singleton): "
                             "runs longer than the site's time limit")
    parser.add_argument("--job-name", help="job name (default: harness-<run.name>)")
    parser.add_argument("--launcher", choices=sorted(TEMPLATES), default="srun",
                        help="srun: one srun task per rank (default); deepspeed: the deepspeed launcher")
    parser.add_argument("--gpus", choices=("auto", "yes", "no"), default="auto",
                        help="request GPUs: auto asks sinfo whether the cluster has any")
    site = parser.add_argument_group("site resources (each sets the slurm.* key of the same name)")
    site.add_argument("--partition", help="Slurm partition")
    site.add_argument("--time", help="time limit of each job, e.g. 04:00:00 or 2-00:00:00")
    site.add_argument("--account", help="Slurm account")
    site.add_argument("--qos", help="Slurm QOS")
    site.add_argument("--constraint", help="node features, e.g. h100")
    site.add_argument("--mem", help="host memory per node, e.g. 480G (0: all of it)")
    site.add_argument("--cpus-per-task", type=int, help="CPU cores per rank (default: node cores / ranks per node)")
    site.add_argument("--exclusive", action="store_true", default=None, help="whole nodes for this job")
    site.add_argument("--setup", action="append", metavar="LINE",
                      help="a shell line run before the ranks start, e.g. --setup 'module load cuda/12.8' (repeatable)")
    site.add_argument("--container-image", help="run the ranks in this pyxis/enroot image")
    site.add_argument("--container-mounts", help="more container mounts, SRC:DST[:FLAGS],...")
    site.add_argument("--python", help="the Python that runs the ranks")
    site.add_argument("--signal-seconds", type=int,
                      help="USR1 this long before the time limit: the ranks save and stop (default 120)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="an environment variable for every rank, e.g. --env NCCL_SOCKET_IFNAME=ib0 (repeatable); "
                             "NCCL_*, TORCH_NCCL_*, GLOO_SOCKET_IFNAME and FI_* set where you submit are passed on too")
    parser.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                        help="extra sbatch option, e.g. --sbatch-arg=--reservation=big (repeatable)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the job script and the sbatch commands; write and submit nothing")
    parser.add_argument("--gpu", default="h100", help="GPU model for the preflight's memory and step-time checks "
                                                      "(harness check --gpu)")
    parser.add_argument("--no-check", action="store_true", help="skip the preflight (harness check) before submitting")
    return parser.parse_intermixed_args(argv)


def apply_flags(slurm, args: argparse.Namespace) -> None:
    """The flags given on the command line replace the config's slurm.* values."""
    for name in SLURM_FLAGS:
        value = getattr(args, name)
        if value is None:
            continue
        if name == "container_mounts":
            value = [mount for mount in value.split(",") if mount]
        setattr(slurm, name, value)
    validate_slurm(slurm)


def _validate(args: argparse.Namespace) -> None:
    for flag in ("nodes", "gpus_per_node", "chain"):
        if getattr(args, flag) < 1:
            raise HarnessError(f"--{flag.replace('_', '-')} must be >= 1 (got {getattr(args, flag)})")
    for item in args.env:
        key, sep, _ = item.partition("=")
        if not sep or not _ENV_KEY.match(key):
            raise HarnessError(f"--env {item!r} is not KEY=VALUE (e.g. --env NCCL_SOCKET_IFNAME=ib0)")


# Network settings a cluster's admins tell users to set (interfaces, HCAs, debug): recorded in
# the job script, so the job runs with them even where sbatch does not export the environment.
_PASSED_ON = ("NCCL_", "TORCH_NCCL_", "GLOO_SOCKET_IFNAME", "FI_", "UCX_")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def job_environment(args: argparse.Namespace, environ: dict[str, str], python: str, run_dir: str) -> dict[str, str]:
    """The variables the job script exports: harness's own, the network settings of the
    submitting shell, then --env (which wins)."""
    env = {"HARNESS_ROOT": str(ROOT), "HARNESS_PYTHON": python, "HARNESS_RUN_DIR": run_dir}
    env.update({k: v for k, v in sorted(environ.items()) if k.startswith(_PASSED_ON)})
    env.update(dict(item.split("=", 1) for item in args.env))
    return env


def sbatch_command(args: argparse.Namespace, script_path: Path, link: int, previous: str) -> list[str]:
    """The sbatch command of job `link` (1-based) of the chain; job k > 1 waits for job k-1
    (`previous`) to end however it ended (afterany: a job stopped at its time limit has saved), and
    knows its place in the chain."""
    options = [f"--export=ALL,HARNESS_CHAIN_LINK={link},HARNESS_CHAIN_LENGTH={args.chain}"] if args.chain > 1 else []
    if link > 1:
        options.append(f"--dependency=afterany:{previous},singleton")
    return ["sbatch", "--parsable", *options, str(script_path), str(Path(args.config).resolve()), *args.overrides]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        _validate(args)
        cfg = load_config(args.config, args.overrides)
        apply_flags(cfg.slurm, args)
        world = args.nodes * args.gpus_per_node
        validate_for_world(cfg, world)
        checked = "skipped (--no-check)" if args.no_check else _preflight(cfg, args, world)
        job = Job(
            name=args.job_name or f"harness-{cfg.run.name}", nodes=args.nodes, ranks_per_node=args.gpus_per_node,
            launcher=args.launcher,
            request_gpus=args.gpus == "yes" or (args.gpus == "auto" and (args.dry_run or has_gpus(cfg.slurm.partition))),
            cpus_per_task=cores_per_rank(cfg.slurm, args.gpus_per_node), run_dir=cfg.run.dir, slurm=cfg.slurm,
            extra_sbatch=args.sbatch_arg)
        env = job_environment(args, dict(os.environ), ranks_python(cfg.slurm, sys.executable), cfg.run.dir)
        script = render(job, env)
        script_path = ROOT / "runs" / "slurm" / f"{job.name}.sbatch"
        if args.dry_run:
            print(script, end="")
            for link in range(1, args.chain + 1):
                print(f"# would run: {' '.join(sbatch_command(args, script_path, link, f'<job {link - 1}>'))}")
            print(f"# a submission would write {script_path} and the run would live in {ROOT / cfg.run.dir} "
                  "(nothing was written or submitted)")
            return 0
        job_ids = _submit(args, script_path, script)
    except HarnessError as exc:
        print(f"harness: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"submitted job {job_ids[0]}: {args.nodes} node(s) x {args.gpus_per_node} rank(s), {args.launcher}"
          + (f"; cores per rank {job.cpus_per_task}" if job.cpus_per_task else ""))
    for previous, job_id in zip(job_ids, job_ids[1:]):
        print(f"chained job {job_id}: starts after job {previous} ends and continues the run")
    print(f"run dir: {ROOT / cfg.run.dir}")
    print(f"log: {ROOT}/runs/slurm/{job.name}-<job id>.out")
    print(f"preflight: {checked}")
    return 0


def _preflight(cfg, args: argparse.Namespace, world: int) -> str:
    """harness check, before anything reaches the queue: every finding on its own line; returns
    what fits (said once the job is submitted)."""
    from harness.cli.check import preflight
    from harness.estimate.step_time import GPUS

    if args.gpu not in GPUS:
        raise HarnessError(f"--gpu {args.gpu!r} is not one of {', '.join(sorted(GPUS))}")
    checks = argparse.Namespace(world_size=world, nodes=args.nodes, gpu=args.gpu, device_gb=None, host_gb=None,
                                signal_seconds=None)
    findings, summary = preflight(cfg, checks)
    for line in findings:
        print(f"harness: check: {line}", file=sys.stderr)
    if findings:
        raise HarnessError(f"the preflight found {len(findings)} problem(s), listed above; nothing was submitted "
                           "(fix them, or submit with --no-check)")
    return summary


def _submit(args: argparse.Namespace, script_path: Path, script: str) -> list[str]:
    if shutil.which("sbatch") is None:
        raise HarnessError("sbatch not found on PATH: run harness submit on a Slurm login node (or install slurm-client)")
    script_path.parent.mkdir(parents=True, exist_ok=True)
    script_path.write_text(script)  # sbatch keeps its own copy; this one is for the record
    job_ids: list[str] = []
    for link in range(1, args.chain + 1):
        command = sbatch_command(args, script_path, link, job_ids[-1] if job_ids else "")
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
        if result.returncode != 0:
            reason = " ".join(result.stderr.strip().splitlines()) or f"exit code {result.returncode}"
            queued = f" (jobs {', '.join(job_ids)} are queued: scancel them or let them run)" if job_ids else ""
            raise HarnessError(f"sbatch refused the job: {reason}{queued}")
        job_ids.append(result.stdout.strip().split(";")[0])
    return job_ids


if __name__ == "__main__":
    from harness.runtime.process import exit_process

    exit_process(main())
