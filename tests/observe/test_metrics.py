"""Metric files and the MFU peak table."""

from __future__ import annotations

import json

import torch

from harness.numerics.precision import precision_policy
from harness.observe.metrics import MetricsWriter, device_peak_tflops, strict_json


def test_non_finite_floats_become_null():
    assert strict_json({"a": float("inf"), "b": float("nan"), "c": 1.5}) == {"a": None, "b": None, "c": 1.5}


def test_rank0_writes_main_file_every_rank_its_own(tmp_path):
    row = {"step": 1, "loss": 2.0, "loss_scale": 8.0, "skipped": False, "grad_norm": float("nan"), "mem_gb": 1.0,
           "lr": 0.1}
    MetricsWriter(tmp_path, rank=0, per_rank=True).write(row)
    MetricsWriter(tmp_path, rank=1, per_rank=True).write(row)
    main = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert main == [dict(row, grad_norm=None)]
    rank1 = json.loads((tmp_path / "ranks/rank-1.jsonl").read_text())
    assert rank1 == {"step": 1, "loss": 2.0, "loss_scale": 8.0, "skipped": False, "grad_norm": None, "mem_gb": 1.0}


def test_mfu_peak_is_none_on_cpu_unless_configured():
    cpu = torch.device("cpu")
    assert device_peak_tflops(cpu, precision_policy("bf16"), None) is None
    assert device_peak_tflops(cpu, precision_policy("bf16"), 1.5) == 1.5


def test_resume_keeps_rows_up_to_the_checkpoint_step(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3, 4)] + ['{"step": 5, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    writer = MetricsWriter(tmp_path, rank=0, per_rank=False, resume_step=2)
    writer.write({"step": 3, "loss": 0.5})
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
