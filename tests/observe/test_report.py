"""`harness report` on three real runs of the same config in fp32, bf16 and fp16."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HARNESS = str(Path(sys.executable).parent / "harness")


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    runs = []
    for precision in ("fp32", "bf16", "fp16"):
        run_dir = root / precision
        extra = ["faults.nonfinite_grad_steps=[2]"] if precision == "fp16" else []
        result = subprocess.run(
            ["launch/local.sh", "2", "configs/tiny.yaml", f"run.dir={run_dir}", f"run.name=tiny-{precision}",
             f"precision={precision}", "train.steps=4", "eval.every=2", "log.progress=off", *extra],
            cwd=ROOT, capture_output=True, text=True, timeout=600,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        runs.append(run_dir)
    return root, runs


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([HARNESS, "report", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.spawns
def test_png_and_markdown_with_the_right_numbers(three_runs):
    root, runs = three_runs
    result = report(*map(str, runs), "--out", str(root / "out" / "report.md"))
    assert result.returncode == 0, result.stderr
    png = (root / "out" / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    text = (root / "out" / "report.md").read_text()
    ref_eval = rows(runs[0])[-1]["eval_loss"]
    for run_dir, precision in zip(runs, ("fp32", "bf16", "fp16")):
        data = rows(run_dir)
        final = statistics.fmean(r["loss"] for r in data[-5:])
        line = next(line for line in text.splitlines() if line.startswith(f"| tiny-{precision} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == precision and cells[2] == "4"
        assert cells[3] == f"{final:.4f}"
        assert cells[4] == "-" if precision == "fp32" else cells[4].endswith("%")
        assert cells[7] == f"{data[-1]['eval_loss']:.4f}"
        assert cells[9] == str(sum(r["skipped"] for r in data))
        assert cells[10] == f"{data[-1]['loss_scale']:g}"
        if precision != "fp32":
            delta = (data[-1]["eval_loss"] - ref_eval) / ref_eval
            numbers = f"({data[-1]['eval_loss']:.4f} vs {ref_eval:.4f}, {delta:+.2%}"
            if abs(delta) <= 0.005:
                expected = f"{precision} (tiny-{precision}) within 0.5% of fp32 eval loss {numbers})"
            else:
                side = "above" if delta > 0 else "below"
                expected = f"{precision} (tiny-{precision}) is {abs(delta):.1%} {side} fp32 eval loss {numbers}; "
            assert expected in result.stdout
    assert "| tiny-fp16 | fp16 | 4 |" in text and "| 1 | 65536 |" in text  # one skipped step


@pytest.mark.spawns
def test_html_is_self_contained_and_png_alone(three_runs, tmp_path):
    _, runs = three_runs
    assert report(*map(str, runs), "--out", str(tmp_path / "r.html")).returncode == 0
    page = (tmp_path / "r.html").read_text()
    assert "data:image/png;base64," in page and "of fp32 eval loss" in page and "<table>" in page
    assert report(*map(str, runs), "--out", str(tmp_path / "r.png")).returncode == 0
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.spawns
def test_verdict_follows_the_tolerance(three_runs, tmp_path):
    _, runs = three_runs
    strict = report(*map(str, runs), "--out", str(tmp_path / "r.md"), "--tolerance", "0")
    lenient = report(*map(str, runs), "--out", str(tmp_path / "r.md"), "--tolerance", "0.5")
    assert strict.stdout.count(" within ") == 0 and strict.stdout.count("tolerance 0.0%") == 2
    assert lenient.stdout.count(" within 50.0% of fp32 eval loss") == 2


def test_bad_input(tmp_path):
    result = report(str(tmp_path), "--out", str(tmp_path / "r.md"))
    assert result.returncode == 2 and "has no metrics.jsonl" in result.stderr
