"""wandb through real offline run files: one run per job, every metric and the config logged, the
same run continued after a resume, and nothing wandb-related when tracking is off."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from harness.observe.wandb_file import find_runs, read_run

pytestmark = pytest.mark.spawns

ROOT = Path(__file__).resolve().parents[2]


def local(run_dir: Path, wandb_dir: Path, *overrides: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_DIR=str(wandb_dir), WANDB_SILENT="true")
    result = subprocess.run(
        ["launch/local.sh", "2", "configs/tiny.yaml", f"run.dir={run_dir}", "log.progress=off", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env,
    )
    if ok:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def crashed_and_resumed(tmp_path_factory):
    root = tmp_path_factory.mktemp("wandb")
    run_dir, wandb_dir = root / "run", root / "wandb-dir"
    wandb_dir.mkdir()
    args = ("log.wandb=true", "log.wandb_project=harness-tests", "log.wandb_tags=[ci,tiny]", "checkpoint.every=4")
    first = local(run_dir, wandb_dir, *args, "faults.kill_at_step=6", ok=False)
    assert first.returncode != 0
    first_id = (run_dir / "wandb_run_id").read_text().strip()
    local(run_dir, wandb_dir, *args, "resume=auto")
    return run_dir, wandb_dir, first_id


def test_one_run_per_job_with_every_metric_and_the_config(crashed_and_resumed):
    run_dir, wandb_dir, first_id = crashed_and_resumed
    files = find_runs(wandb_dir)
    # One run folder per attempt (rank 0 only), both in WANDB_DIR, none in the run dir.
    assert len(files) == 2 and not (run_dir / "wandb").exists()
    resumed = read_run(files[-1])
    assert resumed["run_id"] == first_id
    assert resumed["config"]["precision"] == "fp32"
    assert resumed["config"]["train"]["seq_len"] == 32
    logged = {row["step"]: row for row in resumed["history"]}
    # Steps 1-4 are re-logged from metrics.jsonl when the killed attempt's run file lacks them
    # (a SIGKILLed job's wandb service never wrote them); 5-8 come from the resumed attempt.
    assert sorted(logged) == list(range(1, 9))
    for row in metrics(run_dir):
        got = logged[row["step"]]
        for key, value in row.items():
            if value is None or isinstance(value, bool):
                assert got[key] == value, key
            else:
                assert got[key] == pytest.approx(value), key
    assert logged[8]["eval_loss"] == pytest.approx(metrics(run_dir)[-1]["eval_loss"])


def test_a_fresh_run_in_the_same_folder_gets_a_new_wandb_run(crashed_and_resumed, tmp_path):
    run_dir, _, first_id = crashed_and_resumed
    fresh_dir = tmp_path / "run"
    fresh_dir.mkdir()
    (fresh_dir / "wandb_run_id").write_text(first_id + "\n")
    local(fresh_dir, tmp_path, "log.wandb=true", "train.steps=2")
    assert (fresh_dir / "wandb_run_id").read_text().strip() != first_id


def test_no_wandb_when_tracking_is_off(tmp_path):
    local(tmp_path / "run", tmp_path, "train.steps=2")
    assert find_runs(tmp_path) == [] and not (tmp_path / "wandb").exists()
    assert not (tmp_path / "run" / "wandb_run_id").exists()


@pytest.mark.parametrize("server", ["https://wandb.invalid", "http://10.255.255.1:9"], ids=["no-dns", "no-wandb-answer"])
def test_online_without_a_reachable_server_logs_offline_within_the_timeout(server, tmp_path):
    """A compute node without internet: the run does not hang in wandb.init; it logs offline and
    says how to upload the run later. Either the name does not resolve, or something answers that
    is not a wandb server (networks that intercept connections)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    # A key (wandb checks only its shape before talking to the server), and a server that is not there.
    env.update(WANDB_API_KEY="0123456789abcdef0123456789abcdef01234567", WANDB_BASE_URL=server, WANDB_SILENT="true")
    result = subprocess.run(
        ["launch/local.sh", "2", "configs/tiny.yaml", f"run.dir={tmp_path}", "log.progress=off", "eval.every=0",
         "train.steps=2", "log.wandb=true", "log.wandb_mode=online", "log.wandb_connect_timeout_s=3"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    warnings = [line for line in result.stdout.splitlines() if "not reachable" in line]
    assert len(warnings) == 1 and f"wandb sync {tmp_path}/wandb/offline-run-*" in warnings[0], result.stdout[-2000:]
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    offline = [path for path in find_runs(tmp_path, run_id) if "offline-run" in str(path)]
    assert len(offline) == 1 and [row["step"] for row in read_run(offline[0])["history"]] == [1, 2]
