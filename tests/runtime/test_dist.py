"""Rank discovery from each launcher's environment."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from harness.errors import HarnessError
from harness.runtime import dist
from harness.runtime.dist import first_host, port_for_job, publish_rank_env, rank_info_from_env


def test_no_launcher_is_a_world_of_one():
    info = rank_info_from_env({})
    assert (info.rank, info.world_size, info.launcher) == (0, 1, "none")


def test_torchrun_and_deepspeed_launcher_env():
    env = dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", MASTER_ADDR="n1", MASTER_PORT="2345")
    info = rank_info_from_env(env)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (3, 8, 1, 2)
    assert (info.master_addr, info.master_port, info.launcher) == ("n1", 2345, "torchrun")


def test_slurm_srun_env():
    env = dict(
        SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_JOB_ID="4242",
        SLURM_TASKS_PER_NODE="4(x2)", SLURM_JOB_NODELIST="gpu-node-does-not-exist[07-08]",
    )
    info = rank_info_from_env(env)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (5, 8, 1, 4)
    assert info.master_addr == "gpu-node-does-not-exist07"
    assert info.master_port == port_for_job(4242) == 14242
    assert info.launcher == "slurm"


@pytest.mark.parametrize("job_id", [0, 4242, 22767, 32768, 67_043_328, 10**12 + 7])
def test_rendezvous_port_lies_outside_the_ephemeral_range(job_id):
    assert 1024 < port_for_job(job_id) < 32768


def test_srun_ranks_are_published_as_torchrun_variables():
    # DeepSpeed asserts on LOCAL_RANK; under srun only SLURM_* is set.
    env = dict(SLURM_PROCID="3", SLURM_NTASKS="4", SLURM_LOCALID="1", SLURM_JOB_ID="7",
               SLURM_TASKS_PER_NODE="2(x2)", SLURM_JOB_NODELIST="n[1-2]", MASTER_ADDR="10.0.0.1")
    published = dict(env)
    publish_rank_env(rank_info_from_env(env), published)
    assert {k: v for k, v in published.items() if k not in env or k == "MASTER_ADDR"} == dict(
        RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", MASTER_ADDR="10.0.0.1",
        MASTER_PORT=str(port_for_job(7)))
    assert rank_info_from_env(published) == replace(rank_info_from_env(env), launcher="torchrun")  # same rank


def test_torch_env_wins_over_slurm_when_torchrun_runs_inside_srun():
    env = dict(RANK="1", WORLD_SIZE="2", MASTER_ADDR="x", MASTER_PORT="1", SLURM_PROCID="0", SLURM_NTASKS="1")
    assert rank_info_from_env(env).launcher == "torchrun"


@pytest.mark.parametrize(
    "env, message",
    [
        (dict(RANK="2", WORLD_SIZE="2", MASTER_ADDR="x"), "RANK=2 is outside WORLD_SIZE=2"),
        (dict(RANK="a", WORLD_SIZE="2"), "RANK='a' is not an integer"),
        (dict(RANK="1", WORLD_SIZE="2"), "MASTER_ADDR is not set"),
    ],
)
def test_bad_rank_env(env, message):
    with pytest.raises(HarnessError, match=message):
        rank_info_from_env(env)


def test_first_host_parsing_without_scontrol():
    assert first_host("a-nonexistent-host") == "a-nonexistent-host"
    assert first_host("nonexistent[3-5,9],other") == "nonexistent3"


@pytest.mark.parametrize("script", ["slurm/train.sbatch", "slurm/deepspeed.sbatch"])
def test_job_scripts_derive_the_same_rendezvous_port(script):
    root = Path(__file__).resolve().parents[2]
    line = next(line for line in (root / script).read_text().splitlines() if "MASTER_PORT=$((" in line)
    formula = line.split("MASTER_PORT=", 1)[1]
    for job_id in (7, 4242, 123_456_789):
        out = subprocess.run(["bash", "-c", f"SLURM_JOB_ID={job_id}; echo {formula}"], capture_output=True, text=True)
        assert int(out.stdout) == port_for_job(job_id), script


def _local(rank: int, of: int) -> dist.RankInfo:
    return dist.RankInfo(rank, of, rank, of, "127.0.0.1", 29500, "torchrun")


@pytest.mark.parametrize(
    "local_rank, local_world, visible, expected",
    [
        (3, 8, 8, 3),  # torchrun / deepspeed launcher: every rank sees the node's GPUs
        (3, 4, 8, 3),  # fewer ranks than GPUs on the node
        (3, 8, 1, 0),  # srun --gpus-per-task=1 or CUDA_VISIBLE_DEVICES per rank
        (0, 1, 1, 0),
    ],
)
def test_gpu_index_follows_how_the_launcher_bound_gpus(local_rank, local_world, visible, expected):
    assert dist.gpu_index(_local(local_rank, local_world), visible) == expected


@pytest.mark.parametrize("visible, message", [(0, "sees no GPU"), (2, "sees 2 GPUs; give every rank")])
def test_gpu_counts_that_fit_no_binding_are_one_line_errors(visible, message):
    with pytest.raises(HarnessError, match=message) as exc:
        dist.gpu_index(_local(3, 8), visible)
    assert "\n" not in str(exc.value)


def test_device_for_uses_the_mocked_gpu_count(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert dist.device_for(_local(5, 8), "nccl", cuda_count=lambda: 8) == torch.device("cuda", 5)
    assert dist.device_for(_local(5, 8), "nccl", cuda_count=lambda: 1) == torch.device("cuda", 0)
    assert chosen == [5, 0]
    assert dist.device_for(_local(5, 8), "gloo", cuda_count=lambda: 8) == torch.device("cpu")
