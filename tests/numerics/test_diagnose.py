"""Overflow and NaN diagnosis: the first non-finite gradient by name and rank, the forward module
with debug.nan_hooks, and repeated overflows summarized instead of repeated."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.spawns

ROOT = Path(__file__).resolve().parents[2]
LAYER = "transformer.h.1.mlp.c_fc.weight"


def local(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["launch/local.sh", "2", "configs/tiny.yaml", f"run.dir={run_dir}", "log.progress=lines", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def test_injected_inf_in_a_named_layer_is_reported_by_name_and_rank_once_per_power_of_two(tmp_path):
    result = local(
        tmp_path, "precision=fp16", "train.steps=10", "scaler.hysteresis=1", "scaler.max_consecutive_skips=10",
        "faults.nonfinite_grad_steps=[2,3,4,5,6]", "faults.nonfinite_grad_rank=1",
        f"faults.nonfinite_grad_param={LAYER}",
    )
    reports = [line for line in result.stdout.splitlines() if ": non-finite gradients" in line]
    assert [line.split(":")[0] for line in reports] == ["step 2", "step 3", "step 5"]  # 1st, 2nd, 4th
    assert reports[0] == (f"step 2: non-finite gradients (inf) in 1 tensor(s); first {LAYER} on rank 1; "
                          "loss scale 65536 -> 32768")
    assert reports[2].endswith("4 overflows with this first offender since step 2")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in rows if r["skipped"]]
    assert [r["step"] for r in skipped] == [2, 3, 4, 5, 6]
    assert {(r["nonfinite_param"], r["nonfinite_rank"], r["nonfinite_kind"]) for r in skipped} == {(LAYER, 1, "inf")}
    assert "nonfinite_param" not in rows[0]
    assert f"overflows    5 skipped; most often first in {LAYER} (inf) (5x)" in result.stdout


def test_bf16_nan_in_a_forward_output_is_traced_to_the_module(tmp_path):
    result = local(
        tmp_path, "precision=bf16", "train.steps=3", "debug.nan_hooks=true",
        "faults.nonfinite_grad_steps=[2]", "faults.nonfinite_value=nan", "faults.nonfinite_grad_rank=1",
        "faults.nonfinite_forward_module=transformer.h.1.mlp",
    )
    report = next(line for line in result.stdout.splitlines() if line.startswith("step 2: non-finite"))
    assert "(nan)" in report and "first non-finite forward output: transformer.h.1.mlp on rank 1" in report
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["skipped"] and rows[1]["nonfinite_module"] == "transformer.h.1.mlp"
    assert rows[1]["nonfinite_module_rank"] == 1 and not rows[2]["skipped"]
