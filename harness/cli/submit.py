"""`harness submit CONFIG.yaml [overrides] --nodes N --gpus-per-node G [...]`: a Slurm job in one command.

Renders slurm/train.sbatch (or slurm/deepspeed.sbatch with --launcher deepspeed) with the
requested sbatch options, submits it with sbatch (whatever cluster sbatch reaches; SLURM_CONF
is honoured), and prints the job id and the run dir. --dry-run prints the script instead.

--gpus-per-node G is the number of ranks per node. GPUs are requested (--gpus-per-node=G) when
the cluster has GPU resources (sinfo reports a gpu GRES) or with --gpus yes; on a CPU-only
cluster the same command runs G CPU ranks per node.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from harness.config import load_config, validate_for_world
from harness.errors import HarnessError

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = {"srun": ROOT / "slurm" / "train.sbatch", "deepspeed": ROOT / "slurm" / "deepspeed.sbatch"}
BLOCK = re.compile(r"# --- sbatch options.*?\n(.*?)# --- end of sbatch options ---\n", re.S)
_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$|^\d+$")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="harness submit", description=__doc__.split("\n\n")[1])
    parser.add_argument("config", help="YAML config")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides for the job")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=1, help="ranks per node: GPUs, or CPU ranks on CPU nodes")
    parser.add_argument("--partition", help="Slurm partition")
    parser.add_argument("--time", help="time limit, e.g. 04:00:00 or 2-00:00:00")
    parser.add_argument("--account", help="Slurm account")
    parser.add_argument("--qos", help="Slurm QOS")
    parser.add_argument("--job-name", help="job name (default: harness-<run.name>)")
    parser.add_argument("--cpus-per-task", type=int, help="CPU cores per rank")
    parser.add_argument("--launcher", choices=sorted(TEMPLATES), default="srun",
                        help="srun: one srun task per rank (default); deepspeed: the deepspeed launcher")
    parser.add_argument("--gpus", choices=("auto", "yes", "no"), default="auto",
                        help="request GPUs: auto asks sinfo whether the cluster has any")
    parser.add_argument("--signal-seconds", type=int, default=120,
                        help="ask Slurm for USR1 this long before the time limit (checkpoint + requeue)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="an environment variable for every rank, e.g. --env NCCL_SOCKET_IFNAME=ib0 (repeatable); "
                             "NCCL_*, TORCH_NCCL_*, GLOO_SOCKET_IFNAME and FI_* set where you submit are passed on too")
    parser.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                        help="extra sbatch option, e.g. --sbatch-arg=--exclusive (repeatable)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the job script and the sbatch command; write and submit nothing")
    parser.add_argument("--gpu", default="h100", help="GPU model for the preflight's memory and step-time checks "
                                                      "(harness check --gpu)")
    parser.add_argument("--no-check", action="store_true", help="skip the preflight (harness check) before submitting")
    return parser.parse_intermixed_args(argv)


def cluster_has_gpus(partition: Optional[str]) -> bool:
    if shutil.which("sinfo") is None:
        return False
    cmd = ["sinfo", "-h", "-o", "%G"] + (["-p", partition] if partition else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    return out.returncode == 0 and "gpu" in out.stdout


def sbatch_options(args: argparse.Namespace, job_name: str, request_gpus: bool) -> list[str]:
    options = [
        f"--job-name={job_name}",
        f"--nodes={args.nodes}",
        f"--ntasks-per-node={args.gpus_per_node}",
    ]
    if request_gpus:
        options.append(f"--gpus-per-node={args.gpus_per_node}")
    if args.cpus_per_task:
        options.append(f"--cpus-per-task={args.cpus_per_task}")
    for flag in ("partition", "time", "account", "qos"):
        value = getattr(args, flag)
        if value:
            options.append(f"--{flag}={value}")
    # srun ranks are tasks of a job step and get the signal themselves; the deepspeed launcher's
    # ranks on the first node are children of the job script, which passes it on.
    target = "" if args.launcher == "srun" else "B:"
    options += [
        f"--signal={target}USR1@{args.signal_seconds}",
        "--requeue",
        "--open-mode=append",
        f"--chdir={ROOT}",
        f"--output={ROOT}/runs/slurm/%x-%j.out",
        *args.sbatch_arg,
    ]
    return options


def render(template: Path, options: list[str], env: dict[str, str]) -> str:
    text = template.read_text()
    header = "# --- sbatch options (rendered by harness submit) ---\n"
    header += "".join(f"#SBATCH {option}\n" for option in options)
    header += "# --- end of sbatch options ---\n"
    header += "".join(f"export {key}={shlex.quote(value)}\n" for key, value in env.items())
    rendered, count = BLOCK.subn(lambda _: header, text)
    if count != 1:
        raise HarnessError(f"{template} lost its '# --- sbatch options' block; restore it from git")
    return rendered


def _validate(args: argparse.Namespace) -> None:
    if args.nodes < 1:
        raise HarnessError(f"--nodes must be >= 1 (got {args.nodes})")
    if args.gpus_per_node < 1:
        raise HarnessError(f"--gpus-per-node must be >= 1 (got {args.gpus_per_node})")
    if args.time and not _TIME.match(args.time):
        raise HarnessError(f"--time {args.time!r} is not a Slurm time (minutes, HH:MM:SS or D-HH:MM:SS)")
    if args.signal_seconds < 1:
        raise HarnessError(f"--signal-seconds must be >= 1 (got {args.signal_seconds})")
    for item in args.env:
        key, sep, _ = item.partition("=")
        if not sep or not _ENV_KEY.match(key):
            raise HarnessError(f"--env {item!r} is not KEY=VALUE (e.g. --env NCCL_SOCKET_IFNAME=ib0)")


# Network settings a cluster's admins tell users to set (interfaces, HCAs, debug): recorded in
# the job script, so the job runs with them even where sbatch does not export the environment.
_PASSED_ON = ("NCCL_", "TORCH_NCCL_", "GLOO_SOCKET_IFNAME", "FI_", "UCX_")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def job_environment(args: argparse.Namespace, environ: dict[str, str]) -> dict[str, str]:
    """The variables the job script exports: harness's own, the network settings of the
    submitting shell, then --env (which wins)."""
    env = {"HARNESS_ROOT": str(ROOT), "HARNESS_PYTHON": sys.executable}
    env.update({k: v for k, v in sorted(environ.items()) if k.startswith(_PASSED_ON)})
    env.update(dict(item.split("=", 1) for item in args.env))
    return env


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        _validate(args)
        cfg = load_config(args.config, args.overrides)
        world = args.nodes * args.gpus_per_node
        validate_for_world(cfg, world)
        checked = "skipped (--no-check)" if args.no_check else _preflight(cfg, args, world)
        job_name = args.job_name or f"harness-{cfg.run.name}"
        request_gpus = args.gpus == "yes" or (args.gpus == "auto" and (args.dry_run or cluster_has_gpus(args.partition)))
        env = job_environment(args, dict(os.environ))
        explicit_run_dir = any(o.startswith("run.dir=") for o in args.overrides) or _config_sets_run_dir(args.config)
        if explicit_run_dir:
            env["HARNESS_RUN_DIR"] = cfg.run.dir
        script = render(TEMPLATES[args.launcher], sbatch_options(args, job_name, request_gpus), env)
        script_path = ROOT / "runs" / "slurm" / f"{job_name}.sbatch"
        command = ["sbatch", "--parsable", str(script_path), str(Path(args.config).resolve()), *args.overrides]
        if args.dry_run:
            print(script, end="")
            print(f"# a submission would write {script_path} and run: {' '.join(command)} (nothing was written or "
                  "submitted)")
            return 0
        job_id = _sbatch(command, script_path, script)
    except HarnessError as exc:
        print(f"harness: error: {exc}", file=sys.stderr)
        return exc.exit_code
    run_dir = cfg.run.dir if explicit_run_dir else f"runs/{job_name}-{job_id}"
    print(f"submitted job {job_id}: {args.nodes} node(s) x {args.gpus_per_node} rank(s), {args.launcher}")
    print(f"run dir: {ROOT / run_dir}")
    print(f"log: {ROOT}/runs/slurm/{job_name}-{job_id}.out")
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
                                signal_seconds=args.signal_seconds)
    findings, summary = preflight(cfg, checks)
    for line in findings:
        print(f"harness: check: {line}", file=sys.stderr)
    if findings:
        raise HarnessError(f"the preflight found {len(findings)} problem(s), listed above; nothing was submitted "
                           "(fix them, or submit with --no-check)")
    return summary


def _config_sets_run_dir(config: str) -> bool:
    import yaml

    raw = yaml.safe_load(Path(config).read_text()) or {}
    return bool((raw.get("run") or {}).get("dir"))


def _sbatch(command: list[str], script_path: Path, script: str) -> str:
    if shutil.which("sbatch") is None:
        raise HarnessError("sbatch not found on PATH: run harness submit on a Slurm login node (or install slurm-client)")
    script_path.parent.mkdir(parents=True, exist_ok=True)
    script_path.write_text(script)  # sbatch keeps its own copy; this one is for the record
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    if result.returncode != 0:
        reason = " ".join(result.stderr.strip().splitlines()) or f"exit code {result.returncode}"
        raise HarnessError(f"sbatch refused the job: {reason}")
    return result.stdout.strip().split(";")[0]


if __name__ == "__main__":
    from harness.runtime.process import exit_process

    exit_process(main())
