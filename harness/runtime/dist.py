"""Who am I in the job, and the process group.

Every launcher we support describes the rank in the environment: torchrun, the deepspeed launcher
and `accelerate launch` set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; Slurm's srun sets
SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID/... With none of them, the process is a world of one.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, MutableMapping

import torch
import torch.distributed as dist

from harness.errors import HarnessError, first_line


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str
    """Which environment described the rank: torchrun, slurm or none."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_info_from_env(env: Mapping[str, str] = os.environ) -> RankInfo:
    if "RANK" in env and "WORLD_SIZE" in env:
        return _from_torch_env(env)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return _from_slurm_env(env)
    return RankInfo(0, 1, 0, 1, "127.0.0.1", 0, "none")


def _int_env(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None:
        if default is None:
            raise HarnessError(f"environment variable {name} is missing; start ranks with torchrun, srun or deepspeed")
        return default
    try:
        return int(value)
    except ValueError:
        raise HarnessError(f"environment variable {name}={value!r} is not an integer") from None


def _from_torch_env(env: Mapping[str, str]) -> RankInfo:
    world = _int_env(env, "WORLD_SIZE")
    rank = _int_env(env, "RANK")
    if not 0 <= rank < world:
        raise HarnessError(f"RANK={rank} is outside WORLD_SIZE={world}; check the launcher's settings")
    if world > 1 and "MASTER_ADDR" not in env:
        raise HarnessError("MASTER_ADDR is not set; torchrun/deepspeed set it, or export it with MASTER_PORT")
    return RankInfo(
        rank=rank,
        world_size=world,
        local_rank=_int_env(env, "LOCAL_RANK", 0),
        local_world_size=_int_env(env, "LOCAL_WORLD_SIZE", world),
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_int_env(env, "MASTER_PORT", 29500),
        launcher="torchrun",
    )


def _from_slurm_env(env: Mapping[str, str]) -> RankInfo:
    job_id = _int_env(env, "SLURM_JOB_ID", 0)
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
    return RankInfo(
        rank=_int_env(env, "SLURM_PROCID"),
        world_size=_int_env(env, "SLURM_NTASKS"),
        local_rank=_int_env(env, "SLURM_LOCALID", 0),
        local_world_size=_local_tasks(env),
        master_addr=env.get("MASTER_ADDR") or node_address(first_host(nodelist)),
        master_port=_int_env(env, "MASTER_PORT", port_for_job(job_id)),
        launcher="slurm",
    )


def _local_tasks(env: Mapping[str, str]) -> int:
    # SLURM_TASKS_PER_NODE looks like "2(x3),1"; the first entry is this job's first node.
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
    match = re.match(r"(\d+)", spec)
    return int(match.group(1)) if match else 1


# Below Linux's default ephemeral range (32768-60999), where the kernel hands out the source
# ports of outgoing connections: a port in it can be taken by any client socket on the node.
RENDEZVOUS_PORTS = range(10000, 30000)


def port_for_job(job_id: int) -> int:
    """A rendezvous port derived from the job id, so concurrent jobs on a node do not collide."""
    return RENDEZVOUS_PORTS.start + job_id % len(RENDEZVOUS_PORTS)


def first_host(nodelist: str) -> str:
    """The first host of a Slurm nodelist such as 'node[03-05,9],gpu1'."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10, check=True
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    match = re.match(r"([^,\[]+)(?:\[(\d+))?", nodelist)
    if not match:
        return nodelist
    return match.group(1) + (match.group(2) or "")


def node_address(host: str) -> str:
    """The address Slurm itself reaches a node at (its NodeAddr), which a Slurm node name need not
    resolve to on the network; the name where scontrol cannot say."""
    try:
        out = subprocess.run(["scontrol", "show", "node", host, "-o"], capture_output=True, text=True, timeout=10,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return host
    match = re.search(r"\bNodeAddr=(\S+)", out)
    return match.group(1) if match else host


# --------------------------------------------------------------------------------------------


def pick_dist_backend(requested: str) -> str:
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise HarnessError("parallel.dist_backend=nccl needs CUDA, and no GPU is visible; use gloo or auto")
    return requested


def device_for(info: RankInfo, dist_backend: str, cuda_count=torch.cuda.device_count) -> torch.device:
    """The device this rank computes on: the CPU under gloo, its GPU under nccl."""
    if dist_backend != "nccl":
        return torch.device("cpu")
    index = gpu_index(info, cuda_count())
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def gpu_index(info: RankInfo, visible: int) -> int:
    """Which of the visible GPUs is this rank's.

    Launchers bind GPUs in two ways: every rank sees the node's GPUs (torchrun, the deepspeed
    launcher, plain srun) and takes the LOCAL_RANK-th; or each task sees exactly its own
    (srun --gpus-per-task / --gpu-bind, a CUDA_VISIBLE_DEVICES per rank) and takes cuda:0.
    Anything between would put two ranks on one GPU or leave one idle, so it is refused.
    """
    if visible == 1:
        return 0
    if visible >= info.local_world_size and info.local_rank < visible:
        return info.local_rank
    if visible == 0:
        raise HarnessError(
            f"rank {info.rank} sees no GPU although parallel.dist_backend is nccl; check CUDA_VISIBLE_DEVICES "
            "and the job's GPU request (--gpus-per-node / --gpus-per-task)"
        )
    raise HarnessError(
        f"rank {info.rank} (local rank {info.local_rank} of {info.local_world_size} on its node) sees {visible} GPUs; "
        "give every rank all of the node's GPUs or exactly one (srun --gpus-per-task=1)"
    )


def publish_rank_env(info: RankInfo, env: MutableMapping[str, str] = os.environ) -> None:
    """Describe the rank with torchrun's variables too. Libraries read them (DeepSpeed asserts on
    LOCAL_RANK), and srun or a bare process sets none of them. What is set already stays."""
    described = {"RANK": info.rank, "WORLD_SIZE": info.world_size, "LOCAL_RANK": info.local_rank,
                 "LOCAL_WORLD_SIZE": info.local_world_size}
    if info.launcher != "none":  # a world of one has no rendezvous address
        described.update(MASTER_ADDR=info.master_addr, MASTER_PORT=info.master_port)
    for name, value in described.items():
        env.setdefault(name, str(value))


def init_process_group(info: RankInfo, dist_backend: str, timeout_s: int, device: torch.device) -> None:
    timeout = timedelta(seconds=timeout_s)
    publish_rank_env(info)
    # Binding the group to its GPU lets NCCL set up eagerly and keeps barrier() off the guesswork.
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    if info.world_size == 1 and info.launcher == "none":
        # A world of one needs no rendezvous port; FSDP2 still wants a process group.
        dist.init_process_group(dist_backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout, **kwargs)
        return
    try:
        dist.init_process_group(
            dist_backend,
            init_method=f"tcp://{info.master_addr}:{info.master_port}",
            rank=info.rank,
            world_size=info.world_size,
            timeout=timeout,
            **kwargs,
        )
    except (RuntimeError, ValueError) as exc:
        raise HarnessError(
            f"rank {info.rank} could not join the process group at {info.master_addr}:{info.master_port} "
            f"({first_line(exc)}); check MASTER_ADDR/MASTER_PORT and that every rank was started"
        ) from None


def is_communication_failure(exc: BaseException) -> bool:
    """An exception a collective raises when it cannot complete (torch.distributed's DistError,
    or the RuntimeError gloo and older NCCL builds raise). Whether a peer is really gone is a
    question for the evidence (harness.runtime.watchdog.Watchdog.peers_gone), not the message."""
    return isinstance(exc, (dist.DistError, RuntimeError))


def shutdown() -> None:
    """Leave the process group cleanly. gloo can abort at interpreter exit otherwise (pytorch #190489)."""
    if dist.is_initialized():
        try:
            dist.barrier()
        except RuntimeError:
            pass
        dist.destroy_process_group()


def start(dist_backend: str = "auto", timeout_s: int = 600) -> tuple[RankInfo, torch.device]:
    """This process's rank (from the launcher's environment), its device, and the process group
    joined: what every entry point and benchmark does first."""
    info = rank_info_from_env()
    backend = pick_dist_backend(dist_backend)
    device = device_for(info, backend)
    init_process_group(info, backend, timeout_s, device)
    return info, device


def record_error_for_launcher(exc: BaseException) -> None:
    """Call inside `except`: under torchrun (TORCHELASTIC_ERROR_FILE set), write the rank's error
    where torchrun reads it (torch's error handler), so the launcher's last line can name the rank
    that failed first and its error, with the time it failed rather than the time it was reaped."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    get_error_handler().record_exception(exc)
