"""bench/ in its seconds-long form: every benchmark script runs end to end on CPU and prints its
tables (the numbers are not asserted: they belong to bench/RESULTS.md, measured side by side)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.spawns

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], tmp_path: Path, **env: str) -> str:
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_make_bench_quick_form_writes_every_table(tmp_path):
    out = tmp_path / "results.md"
    _run(["bench/run_all.sh", str(out)], tmp_path, BENCH_QUICK="1")
    text = out.read_text()
    assert text.startswith("### make bench: ") and "commit" in text
    for header in ("| case | harness s/step | hand-written s/step | harness / hand |",
                   "| variant | step s | tokens/s | vs base (time) |",
                   "staged / cat: save time",
                   "| case | measured s/step | predicted s/step | predicted / measured |"):
        assert header in text, header
    for row in ("| fsdp2 fp32 |", "| fsdp2 bf16 |", "| zero3 fp32 |", "| base |", "| no_batch_prefetch |",
                "| ac_selective_op |", "| fsdp2 | ", "zero3-module "):
        assert row in text, row
    assert "failed:" not in text


def test_gpu_script_runs_end_to_end_without_a_gpu(tmp_path):
    out = _run(["bench/gpu.sh", str(tmp_path / "gpu")], tmp_path, GPU_SH_SMOKE="1")
    assert "a smoke run with a tiny model" in out
    assert "| base |" in out and "| fp16 |" in out and "| plain |" in out
    syncs = (tmp_path / "gpu" / "syncs.txt").read_text().splitlines()
    # Rows are read at steps 1 and 4: only those wait for the device; step 2's overflow is
    # skipped on the device.
    assert [line.split()[:2] for line in syncs] == [["1", "applied"], ["2", "skipped"], ["3", "applied"], ["4", "applied"]]
    assert [int(line.split("host_syncs ")[1].split()[0]) for line in syncs] == [1, 0, 0, 1]


def test_gpu_tune_script_and_the_step_profile_run_without_a_gpu(tmp_path):
    out = _run(["bench/gpu_tune.sh", str(tmp_path / "tune")], tmp_path)
    assert "a smoke run with a tiny model" in out
    for row in ("| base |", "| compile |", "| compile_mb16 |", "| compile_mb16_chunked_ce |", "| zero3 |", "| zero3_compile |",
                "| zero3_prefetch |", "| zero3_module |"):
        assert row in out, row
    assert "failed:" not in out
    profile = (tmp_path / "tune" / "profile.log").read_text()
    assert "ms/step" in profile and "| matmul |" in profile


def test_scaling_table_quick_form(tmp_path):
    import sys

    out = _run([sys.executable, "bench/scaling_table.py", "--quick"], tmp_path)
    rows = [line for line in out.splitlines() if line.startswith("| 1B")]
    # 8 GPUs: one node, flat FSDP2 only; 64: flat and HSDP with a node per shard group.
    assert [row.split(" | ")[1:3] for row in rows] == [["8", "FSDP2"], ["64", "FSDP2"], ["64", "HSDP 8x8"]]
    assert all(row.rstrip(" |").split(" | ")[-1] for row in rows)


def test_prepare_data_bench_quick_form(tmp_path):
    import sys

    out = _run([sys.executable, "bench/prepare_data.py", "--megabytes", "2", "--workdir", str(tmp_path)], tmp_path)
    assert "| corpus | tokens | prepare-data tokens/s | tokenizer alone tokens/s |" in out
    assert "| 2 MB |" in out and "| 4 MB |" in out


def test_export_memory_bench_quick_form_prints_its_table(tmp_path):
    out = _run([sys.executable, "bench/export_memory.py", "--quick"], tmp_path)
    assert "| export | peak above start, GiB | / fp32 model |" in out
    for row in ("| fp32, one file |", "| bf16, one file |", "| fp32, 1 GiB shards |"):
        assert row in out, row


def test_prepare_memory_bench_quick_form_prints_every_layout(tmp_path):
    out = _run([sys.executable, "bench/prepare_memory.py", "--quick"], tmp_path)
    assert "| layout | tokens | peak PSS, whole tree | peak PSS, largest worker |" in out
    for row in ("| 70 KB files |", "| 5 MB files |", "| one file |", "| JSONL, 5 MB rows |"):
        assert row in out, row


def test_lora_memory_bench_quick_form_prints_every_method_and_backend(tmp_path):
    out = _run([sys.executable, "bench/lora_memory.py", "--quick"], tmp_path)
    assert "| method | backend | ranks | step peak host, GiB |" in out
    for row in ("| full | fsdp2 |", "| lora | fsdp2 |", "| full | zero3 |", "| lora | zero3 |"):
        assert row in out, row


def test_gpu_fp8_lora_script_smoke_form_prints_the_lora_rows(tmp_path):
    # The lora part (a base written, then two runs through the script's one run function); every
    # part's smoke form is the heavy test below.
    out = _run(["bash", "bench/gpu_fp8_lora.sh", str(tmp_path / "out")], tmp_path, GPU_SH_SMOKE="1", PART="lora")
    for run in ("full-ft", "lora-r16"):
        assert f"| {run} | 0 |" in out, run
    assert "| fp8-tensorwise |" not in out  # PART picks the parts


@pytest.mark.heavy
def test_gpu_fp8_lora_script_smoke_form_prints_every_row(tmp_path):
    out = _run(["bash", "bench/gpu_fp8_lora.sh", str(tmp_path / "out")], tmp_path, GPU_SH_SMOKE="1")
    for run in ("bf16", "fp8-tensorwise", "fp8-rowwise", "loss-bf16", "loss-fp8", "fsdp2-fp8", "zero3-fp8",
                "zero3-compile", "full-ft", "lora-r16"):
        assert f"| {run} | 0 |" in out, run
    assert "loss gap loss-fp8 vs loss-bf16:" in out
