"""Slurm end to end on a real slurmctld + two slurmd on this machine: harness submit, the srun
and deepspeed job scripts, two-node rendezvous, and the preemption drill (SIGTERM -> checkpoint
-> requeue -> resume -> the same losses as an uninterrupted run, in the same wandb run)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.observe.wandb_file import find_runs, read_run
from tests.slurm_cluster import Cluster, SlurmUnavailable, ensure_installed
from tests.unavailable import unavailable

# The preemption drill times a signal against Slurm's KillWait: alone on the machine.
pytestmark = pytest.mark.exclusive

ROOT = Path(__file__).resolve().parents[2]
HARNESS = str(Path(sys.executable).parent / "harness")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        ensure_installed()
        c = Cluster(tmp_path_factory.mktemp("slurm"))
        c.start()
    except SlurmUnavailable as exc:
        unavailable(f"SLURM TESTS SKIPPED: {exc}")
    yield c
    c.stop()


def submit(cluster: Cluster, *args: str) -> tuple[str, Path]:
    result = cluster.run([HARNESS, "submit", *args], cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = re.search(r"submitted job (\d+)", result.stdout).group(1)
    run_dir = Path(re.search(r"run dir: (\S+)", result.stdout).group(1))
    return job_id, run_dir


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def job_log(job_name: str, job_id: str) -> str:
    path = ROOT / "runs" / "slurm" / f"{job_name}-{job_id}.out"
    return path.read_text() if path.exists() else ""


@pytest.mark.spawns
def test_srun_job_on_one_node_with_two_ranks(cluster, tmp_path):
    job_id, run_dir = submit(cluster, "configs/tiny.yaml", "train.steps=4", "log.progress=lines",
                             "--nodes", "1", "--gpus-per-node", "2")
    state = cluster.wait_for(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
    assert state == "COMPLETED", job_log("harness-tiny", job_id)
    assert run_dir.name == f"harness-tiny-{job_id}"
    got = rows(run_dir)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert "fsdp2 over 2 rank(s)" in node_log(run_dir, 0)


@pytest.mark.spawns
@pytest.mark.parametrize("config, backend", [("configs/tiny.yaml", "fsdp2"), ("configs/tiny-zero3.yaml", "ZeRO-3")])
def test_two_nodes_rendezvous(cluster, config, backend):
    # ZeRO under plain srun: DeepSpeed needs LOCAL_RANK, which srun does not set.
    job_id, run_dir = submit(cluster, config, "train.steps=3", "log.per_rank=true",
                             "--nodes", "2", "--gpus-per-node", "1", "--job-name", "harness-2nodes")
    state = cluster.wait_for(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
    assert state == "COMPLETED", job_log("harness-2nodes", job_id) + "".join(
        p.read_text()[-2000:] for p in (run_dir / "logs").glob("*"))
    logs = sorted(p.name.split("-")[0] for p in (run_dir / "logs").iterdir())
    assert logs == ["node0", "node1"]  # one log per node
    assert f"{backend} over 2 rank(s)" in node_log(run_dir, 0)
    ranks = [rows_of(run_dir / "ranks" / f"rank-{r}.jsonl") for r in (0, 1)]
    assert [r["grad_norm"] for r in ranks[0]] == [r["grad_norm"] for r in ranks[1]]
    assert "on node[1-2]" in job_log("harness-2nodes", job_id)


def node_log(run_dir: Path, node_index: int) -> str:
    (path,) = (run_dir / "logs").glob(f"node{node_index}-*.log")
    return path.read_text()


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.spawns
@pytest.mark.parametrize("nodes, ranks_per_node, hostfile", [(1, 2, "node1 slots=2\n"),
                                                              (2, 1, "node1 slots=1\nnode2 slots=1\n")])
def test_deepspeed_launcher_job(cluster, nodes, ranks_per_node, hostfile):
    # One node: the launcher starts the ranks itself. Two: it starts them with srun.
    job_id, run_dir = submit(cluster, "configs/tiny-zero3.yaml", "train.steps=3", "--launcher", "deepspeed",
                             "--nodes", str(nodes), "--gpus-per-node", str(ranks_per_node), "--job-name", "harness-ds")
    state = cluster.wait_for(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
    launcher_logs = "".join(p.read_text() for p in (run_dir / "logs").glob("launcher-*.log"))
    assert state == "COMPLETED", job_log("harness-ds", job_id) + launcher_logs
    assert (run_dir / "hostfile").read_text() == hostfile
    assert "deepspeed ZeRO-3 over 2 rank(s)" in launcher_logs
    assert ("cmd = srun -n 2" in launcher_logs) == (nodes == 2)
    assert [r["step"] for r in rows(run_dir)] == [1, 2, 3]


DRILL = ["configs/tiny.yaml", "train.steps=40", "checkpoint.every=100", "eval.every=10", "log.progress=lines",
         "log.wandb=true"]


@pytest.mark.spawns
def test_preemption_drill_saves_requeues_resumes_and_matches_an_uninterrupted_run(cluster, tmp_path):
    cluster.env.update(WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
    try:
        job_id, run_dir = submit(cluster, *DRILL, "--nodes", "1", "--gpus-per-node", "2", "--job-name", "harness-drill")
        deadline = time.time() + 300
        while len(rows(run_dir)) < 5:
            assert time.time() < deadline and cluster.state(job_id) in {"PENDING", "RUNNING"}, job_log(
                "harness-drill", job_id)
            time.sleep(0.5)
        first_id = (run_dir / "wandb_run_id").read_text().strip()
        assert cluster.run(["scancel", "--signal=TERM", job_id]).returncode == 0
        cluster.wait_for(job_id, {"PENDING", "REQUEUED"}, timeout=300)
        # A requeued job waits for its BeginTime (about 2 min). Release it once the node has
        # finished cleaning up the first attempt (released earlier, Slurm refuses to start it:
        # "Job credential revoked").
        deadline = time.time() + 120
        while cluster.run(["sinfo", "-h", "-n", "node1", "-o", "%T"]).stdout.strip() != "idle":
            assert time.time() < deadline, "node1 did not go idle after the requeue"
            time.sleep(1)
        time.sleep(5)
        assert cluster.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"]).returncode == 0
        cluster.wait_for(job_id, {"COMPLETED"}, timeout=600)
    finally:
        for key in ("WANDB_MODE", "WANDB_DIR", "WANDB_SILENT"):
            cluster.env.pop(key, None)
    log = job_log("harness-drill", job_id)
    assert "stopped on a signal (exit 75); requeueing job" in log and "(restart 1)" in log
    log0 = node_log(run_dir, 0)
    stopped_at = int(re.search(r"stopped by SIGTERM after step (\d+)", log0).group(1))
    assert 5 <= stopped_at < 40
    assert f"resume=auto: resuming from runs/harness-drill-{job_id}/checkpoints/step-{stopped_at:08d}" in log0
    got = rows(run_dir)
    assert [r["step"] for r in got] == list(range(1, 41))

    reference = tmp_path / "reference"
    result = subprocess.run(["launch/local.sh", "2", *DRILL[:-1], f"run.dir={reference}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [r["loss"] for r in got] == [r["loss"] for r in rows(reference)]
    assert [r.get("eval_loss") for r in got] == [r.get("eval_loss") for r in rows(reference)]

    # The same wandb run continues; together the attempts' run files hold every step once more
    # (wandb's service dies on the SIGTERM without writing its buffer; the resume re-logs it).
    assert (run_dir / "wandb_run_id").read_text().strip() == first_id
    files = find_runs(tmp_path)
    assert len(files) == 2 and files == find_runs(tmp_path, first_id)
    steps = set()
    for f in files:
        steps |= {row["step"] for row in read_run(f)["history"]}
    assert steps == set(range(1, 41))


def _without_network_settings() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(("NCCL_", "TORCH_NCCL_", "GLOO_", "FI_", "UCX_"))}


def test_submit_dry_run_for_4_nodes_x_8_gpus_matches_the_checked_in_script():
    record = ROOT / "runs" / "slurm" / "harness-demo.sbatch"
    before = record.stat().st_mtime_ns if record.exists() else None
    result = subprocess.run([HARNESS, "submit", "configs/demo.yaml", "train.steps=1000", "--nodes", "4",
                             "--gpus-per-node", "8", "--partition", "gpu", "--time", "04:00:00", "--dry-run"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, env=_without_network_settings())
    assert result.returncode == 0, result.stderr
    rendered = result.stdout.replace(str(ROOT), "<ROOT>").replace(sys.executable, "<PYTHON>")
    expected = (Path(__file__).with_name("submit-4x8.sbatch")).read_text()
    assert rendered == expected
    assert (record.stat().st_mtime_ns if record.exists() else None) == before  # a dry run writes nothing


def test_submit_runs_the_preflight_first_and_queues_nothing_on_a_finding(tmp_path):
    result = subprocess.run([HARNESS, "submit", "configs/tiny.yaml", "data.path=/nowhere/corpus.txt", "--nodes", "1",
                             "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env=_without_network_settings())
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "harness: check: data.path '/nowhere/corpus.txt' does not exist; check the path (or use bundled:shakespeare)"
    assert lines[-1].startswith("harness: error: the preflight found 1 problem(s)") and len(lines) == 2
    skipped = subprocess.run([HARNESS, "submit", "configs/tiny.yaml", "data.path=/nowhere/corpus.txt", "--dry-run",
                              "--no-check"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                             env=_without_network_settings())
    assert skipped.returncode == 0 and "nothing was written or submitted" in skipped.stdout


def test_submit_passes_network_settings_on_to_every_rank():
    env = {**_without_network_settings(), "NCCL_DEBUG": "INFO", "NCCL_IB_HCA": "mlx5_0,mlx5_1", "UNRELATED": "x"}
    result = subprocess.run([HARNESS, "submit", "configs/tiny.yaml", "--nodes", "2", "--dry-run",
                             "--env", "NCCL_SOCKET_IFNAME=ib0", "--env", "NCCL_DEBUG=WARN"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    exports = [line for line in result.stdout.splitlines() if line.startswith("export ")]
    assert "export NCCL_IB_HCA=mlx5_0,mlx5_1" in exports
    assert "export NCCL_SOCKET_IFNAME=ib0" in exports
    assert "export NCCL_DEBUG=WARN" in exports and "export NCCL_DEBUG=INFO" not in exports  # --env wins
    assert not any("UNRELATED" in line for line in exports)


@pytest.mark.spawns
@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--env", "NCCL_DEBUG"], {}, "--env 'NCCL_DEBUG' is not KEY=VALUE"),
        (["--nodes", "0"], {}, "--nodes must be >= 1"),
        (["--time", "soon"], {}, "--time 'soon' is not a Slurm time"),
        (["train.stepz=3"], {}, "unknown config key train.stepz"),
        ([], {"PATH": "/nonexistent"}, "sbatch not found on PATH"),
        (["--partition", "no-such-partition"], {"SLURM_CONF": "cluster"}, "sbatch refused the job"),
    ],
)
def test_submit_errors_are_one_line(cluster, args, env, message):
    run_env = dict(cluster.env)
    for key, value in env.items():
        run_env[key] = cluster.env["SLURM_CONF"] if value == "cluster" else value
    result = subprocess.run([HARNESS, "submit", "configs/tiny.yaml", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env=run_env)
    assert result.returncode == 2
    assert result.stderr.startswith("harness: error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
