"""Slurm end to end on a real slurmctld + two slurmd on this machine: harness submit, the srun
and deepspeed job scripts, two-node rendezvous, and the preemption drill (SIGTERM -> checkpoint
-> requeue -> resume -> the same losses as an uninterrupted run, in the same wandb run)."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tempfile
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
def test_srun_job_on_one_node_with_two_ranks_and_a_second_submission_continues_it(cluster, tmp_path):
    job_id, run_dir = submit(cluster, "configs/tiny.yaml", "train.steps=4", "log.progress=lines",
                             f"run.dir={tmp_path / 'run'}", "--nodes", "1", "--gpus-per-node", "2")
    state = cluster.wait_for(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
    assert state == "COMPLETED", job_log("harness-tiny", job_id)
    assert run_dir == tmp_path / "run"
    assert [r["step"] for r in rows(run_dir)] == [1, 2, 3, 4]
    assert "fsdp2 over 2 rank(s)" in node_log(run_dir, 0)

    # The same config submitted again, for longer: the same run dir, continued from step 4.
    again, run_dir_again = submit(cluster, "configs/tiny.yaml", "train.steps=6", "log.progress=lines",
                                  f"run.dir={tmp_path / 'run'}", "--nodes", "1", "--gpus-per-node", "2")
    assert cluster.wait_for(again, {"COMPLETED"}) == "COMPLETED"
    assert run_dir_again == run_dir
    assert f"resuming from {run_dir}/checkpoints/step-00000004" in node_log(run_dir, 0)
    assert [r["step"] for r in rows(run_dir)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.spawns
@pytest.mark.parametrize("config, backend", [("configs/tiny.yaml", "fsdp2"), ("configs/tiny-zero3.yaml", "ZeRO-3")])
def test_two_nodes_rendezvous(cluster, config, backend, tmp_path):
    # ZeRO under plain srun: DeepSpeed needs LOCAL_RANK, which srun does not set.
    job_id, run_dir = submit(cluster, config, "train.steps=3", "log.per_rank=true", f"run.dir={tmp_path}",
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
def test_deepspeed_launcher_job(cluster, nodes, ranks_per_node, hostfile, tmp_path):
    # One node: the launcher starts the ranks itself. Two: it starts them with srun.
    job_id, run_dir = submit(cluster, "configs/tiny-zero3.yaml", "train.steps=3", f"run.dir={tmp_path}", "--launcher", "deepspeed",
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


@functools.cache
def uninterrupted_drill() -> list[dict]:
    """The drill's 40 steps on 2 local ranks in one go: what an interrupted run must reproduce."""
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(["launch/local.sh", "2", *DRILL[:-1], f"run.dir={tmp}/reference"], cwd=ROOT,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        return rows(Path(tmp) / "reference")


def assert_continued_after(run_dir: Path, signal_name: str) -> list[dict]:
    """The drill's run stopped on the signal after a step, saved, resumed from that step's
    checkpoint and ran to step 40 with the losses of an uninterrupted run; returns its rows."""
    log0 = node_log(run_dir, 0)
    stopped_at = int(re.search(rf"stopped by {signal_name} after step (\d+)", log0).group(1))
    assert 5 <= stopped_at < 40
    assert f"resume=auto: resuming from {run_dir}/checkpoints/step-{stopped_at:08d}" in log0
    got = rows(run_dir)
    assert [r["step"] for r in got] == list(range(1, 41))
    assert [r["loss"] for r in got] == [r["loss"] for r in uninterrupted_drill()]
    return got


@pytest.mark.spawns
def test_preemption_drill_saves_requeues_resumes_and_matches_an_uninterrupted_run(cluster, tmp_path):
    cluster.env.update(WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
    try:
        job_id, run_dir = submit(cluster, *DRILL, f"run.dir={tmp_path / 'drill'}", "--nodes", "1", "--gpus-per-node", "2",
                                 "--job-name", "harness-drill")
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
    got = assert_continued_after(run_dir, "SIGTERM")
    reference = uninterrupted_drill()
    assert [r.get("eval_loss") for r in got] == [r.get("eval_loss") for r in reference]

    # The same wandb run continues; together the attempts' run files hold every step once more
    # (wandb's service dies on the SIGTERM without writing its buffer; the resume re-logs it).
    assert (run_dir / "wandb_run_id").read_text().strip() == first_id
    files = find_runs(tmp_path)
    assert len(files) == 2 and files == find_runs(tmp_path, first_id)
    steps = set()
    for f in files:
        steps |= {row["step"] for row in read_run(f)["history"]}
    assert steps == set(range(1, 41))


@pytest.mark.spawns
def test_a_chain_of_two_jobs_continues_the_run_with_the_losses_of_an_uninterrupted_one(cluster, tmp_path):
    """--chain 2: job 2 waits for job 1 (afterany), which stops on the time-limit signal (sent here
    with scancel --signal=USR1, as Slurm sends it at time limit minus slurm.signal_seconds), saves
    and exits 0 instead of requeueing; job 2 resumes and finishes the run."""
    result = cluster.run([HARNESS, "submit", *DRILL[:-1], f"run.dir={tmp_path / 'run'}", "--nodes", "1",
                          "--gpus-per-node", "2", "--job-name", "harness-chain", "--chain", "2"], cwd=ROOT)
    assert result.returncode == 0, result.stderr
    first = re.search(r"submitted job (\d+)", result.stdout).group(1)
    second = re.search(r"chained job (\d+): starts after job (\d+)", result.stdout)
    assert second and second.group(2) == first
    run_dir = tmp_path / "run"
    deadline = time.time() + 300
    while len(rows(run_dir)) < 5:
        assert time.time() < deadline and cluster.state(first) in {"PENDING", "RUNNING"}, job_log("harness-chain", first)
        time.sleep(0.5)
    assert cluster.state(second.group(1)) == "PENDING"
    assert cluster.run(["scancel", "--signal=USR1", first]).returncode == 0
    assert cluster.wait_for(first, {"COMPLETED"}, timeout=300) == "COMPLETED"
    assert "job 2 of 2 in the chain continues the run" in job_log("harness-chain", first)
    assert cluster.wait_for(second.group(1), {"COMPLETED"}, timeout=600) == "COMPLETED"
    assert_continued_after(run_dir, "SIGUSR1")


def _activate_script(tmp_path: Path) -> Path:
    """A venv-like folder whose activate script puts a `python` on PATH that records, per rank,
    the environment it was started with, then runs the real interpreter."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    python = bin_dir / "python"
    python.write_text(f"""#!/bin/bash
env | grep -E '^(OMP_NUM_THREADS|SETUP_MARK|SLURM_CPUS_PER_TASK|SLURM_MEM_PER_NODE)=' | sort > {tmp_path}/rank-$SLURM_PROCID
exec {sys.executable} "$@"
""")
    python.chmod(0o755)
    return bin_dir / "activate"


@pytest.mark.spawns
def test_setup_lines_memory_and_cores_per_rank_reach_every_rank(cluster, tmp_path):
    activate = _activate_script(tmp_path)
    job_id, run_dir = submit(cluster, "configs/tiny.yaml", "train.steps=2", f"run.dir={tmp_path / 'run'}",
                             "slurm.cpus_per_task=1", "--nodes", "2", "--gpus-per-node", "1", "--job-name", "harness-site",
                             "--setup", f"source {activate}", "--setup", "export SETUP_MARK=from-setup", "--mem", "1G")
    assert cluster.wait_for(job_id, {"COMPLETED"}) == "COMPLETED", job_log("harness-site", job_id)
    show = cluster.run(["scontrol", "show", "job", job_id]).stdout
    assert "MinMemoryNode=1G" in show and "CPUs/Task=1" in show
    for rank in (0, 1):  # one rank on each node: srun carried the setup's environment to both
        assert (tmp_path / f"rank-{rank}").read_text().split() == [
            "OMP_NUM_THREADS=1", "SETUP_MARK=from-setup", "SLURM_CPUS_PER_TASK=1", "SLURM_MEM_PER_NODE=1024"]
    assert f"the ranks run {activate.parent}/python" in job_log("harness-site", job_id)
    assert [r["step"] for r in rows(run_dir)] == [1, 2]


@pytest.mark.spawns
def test_a_failing_setup_line_stops_the_job_and_names_the_line(cluster, tmp_path):
    job_id, run_dir = submit(cluster, "configs/tiny.yaml", f"run.dir={tmp_path / 'run'}", "--job-name", "harness-badsetup",
                             "--setup", "module load cuda/99.9", "--no-check")
    assert cluster.wait_for(job_id, {"FAILED", "COMPLETED"}) == "FAILED"
    assert "harness: slurm.setup line failed: module load cuda/99.9" in job_log("harness-badsetup", job_id)
    assert not (run_dir / "metrics.jsonl").exists()


@pytest.mark.spawns
@pytest.mark.parametrize("ranks_per_node, cores", [(1, 2), (2, 1)])
def test_cores_per_rank_default_to_the_nodes_cores_over_its_ranks(cluster, ranks_per_node, cores):
    result = cluster.run([HARNESS, "submit", "configs/tiny.yaml", "--gpus-per-node", str(ranks_per_node), "--dry-run"],
                         cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert f"#SBATCH --cpus-per-task={cores}\n" in result.stdout  # the test nodes have 2 cores (sinfo)


def test_container_lines_are_rendered_as_pyxis_documents_them(tmp_path):
    result = subprocess.run(
        [HARNESS, "submit", "configs/tiny.yaml", f"run.dir={tmp_path / 'run'}", "--nodes", "2", "--dry-run",
         "--container-image", "nvcr.io#nvidia/pytorch:25.01-py3", "--container-mounts", "/scratch:/scratch,/data:/data:ro"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=_without_network_settings())
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("HARNESS_SRUN_ARGS=")]
    assert line == ("HARNESS_SRUN_ARGS=('--container-image=nvcr.io#nvidia/pytorch:25.01-py3' "
                    f"--container-mounts={ROOT}:{ROOT},{tmp_path / 'run'}:{tmp_path / 'run'},/scratch:/scratch,"
                    f"/data:/data:ro --container-workdir={ROOT})")
    assert 'srun ${HARNESS_SRUN_ARGS[@]+"${HARNESS_SRUN_ARGS[@]}"} --kill-on-bad-exit=1' in result.stdout
    assert "export HARNESS_PYTHON=python\n" in result.stdout  # the container's python, not this machine's
    # The rendered srun line expands to pyxis's flags (bash, as the job runs it).
    words = subprocess.run(["bash", "-c", line + '; printf "%s\\n" "${HARNESS_SRUN_ARGS[@]}"'], capture_output=True,
                           text=True).stdout.splitlines()
    assert words[0] == "--container-image=nvcr.io#nvidia/pytorch:25.01-py3" and len(words) == 3


def test_chain_dry_run_lists_one_sbatch_per_job_each_after_the_last():
    result = subprocess.run([HARNESS, "submit", "configs/tiny.yaml", "--chain", "3", "--time", "1-00:00:00", "--dry-run"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, env=_without_network_settings())
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if line.startswith("# would run: sbatch")]
    assert len(commands) == 3
    assert "--dependency" not in commands[0] and "HARNESS_CHAIN_LINK=1,HARNESS_CHAIN_LENGTH=3" in commands[0]
    assert "--dependency=afterany:<job 1>,singleton" in commands[1]
    assert "--dependency=afterany:<job 2>,singleton" in commands[2] and "HARNESS_CHAIN_LINK=3" in commands[2]
    assert f"the run would live in {ROOT}/runs/tiny " in result.stdout


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
        (["--time", "soon"], {}, "slurm.time 'soon' is not a Slurm time"),
        (["--mem", "lots"], {}, "slurm.mem 'lots' is not a Slurm memory size"),
        (["--chain", "0"], {}, "--chain must be >= 1"),
        (["--container-mounts", "/a:/a"], {}, "slurm.container_mounts needs slurm.container_image"),
        (["--container-image", "img.sqsh", "--launcher", "deepspeed"], {}, "slurm.container_image needs --launcher srun"),
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


@pytest.mark.spawns
def test_srun_harness_doctor_measures_across_two_nodes(cluster, tmp_path):
    out = tmp_path / "doctor.json"
    wrap = f"srun {HARNESS} doctor --sizes 64K,1M --iterations 2 --out {out}"
    result = cluster.run(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/job.out",
                          "--wrap", wrap], cwd=ROOT)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip().split(";")[0]
    state = cluster.wait_for(job_id, {"COMPLETED", "FAILED"}, timeout=300)
    assert state == "COMPLETED", (tmp_path / "job.out").read_text()[-3000:]
    report = json.loads(out.read_text())
    assert (report["world_size"], report["nodes"], report["ranks_per_node"]) == (2, 2, 1)
    assert {(row["op"], row["group"], row["ranks"]) for row in report["collectives"]} == {
        ("all_reduce", "inter", 2), ("all_gather", "inter", 2)}  # one rank per node: nothing within a node
    assert report["fabric"]["inter_gbit_s"] > 0 and report["fabric"]["intra_gbit_s"] is None
    assert "inter-node" in (tmp_path / "job.out").read_text()
