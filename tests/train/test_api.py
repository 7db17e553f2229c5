"""The Python API (harness.Trainer) against the CLI, and the two examples, each on 2 real gloo ranks
started by torchrun as a user would start them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.spawns

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
QUIET = ["log.progress=off"]
API_SCRIPT = """
import sys
import harness
cfg = harness.load_config(sys.argv[1], overrides=sys.argv[2:])
harness.Trainer(cfg).fit()
harness.exit_process(0)
"""


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _numbers(rows: list[dict]) -> list[tuple]:
    return [(r["step"], r["loss"], r["grad_norm"], r.get("eval_loss")) for r in rows]


def test_the_api_run_of_an_hf_model_equals_the_cli_run_bit_for_bit(tmp_path):
    overrides = ["precision=fp32", "train.steps=4", "eval.every=2", *QUIET]
    _run(["launch/local.sh", "2", "configs/tiny.yaml", f"run.dir={tmp_path / 'cli'}", *overrides])
    script = tmp_path / "api_run.py"
    script.write_text(API_SCRIPT)
    _run([*TORCHRUN, str(script), "configs/tiny.yaml", f"run.dir={tmp_path / 'api'}", *overrides])
    cli, api = _rows(tmp_path / "cli"), _rows(tmp_path / "api")
    assert len(cli) == 4 and cli[1]["eval_loss"] is not None
    assert _numbers(api) == _numbers(cli)


def test_a_plain_torch_transformer_trains_with_the_same_init_on_fsdp2_and_zero3(tmp_path):
    example = "examples/plain_torch_transformer.py"
    losses = {}
    for backend in ("parallel.backend=fsdp2", "parallel.backend=deepspeed"):
        run_dir = tmp_path / backend.split("=")[1]
        result = _run([*TORCHRUN, example, f"run.dir={run_dir}", "train.steps=6", "eval.every=0", "checkpoint.every=6",
                       backend, *QUIET])
        assert "final loss" in result.stdout
        losses[backend] = [r["loss"] for r in _rows(run_dir)]
        # The checkpoint names the model's class (there is no transformers config to record).
        described = json.loads((run_dir / "checkpoints" / "step-00000006" / "model_config.json").read_text())
        assert described == {"harness_custom_model": "__main__.TinyGPT"}
    fsdp2, zero3 = losses.values()
    assert fsdp2[-1] < fsdp2[0] - 0.3, fsdp2  # it learns
    # Sharded init from each layer's reset_parameters(): the same weights whatever the sharding.
    assert zero3 == pytest.approx(fsdp2, abs=1e-5)


def test_a_custom_dataset_and_loss_resume_exactly(tmp_path):
    example = "examples/custom_data_and_loss.py"
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    result = _run([*TORCHRUN, example, f"run.dir={whole}", "train.steps=4", "eval.every=2", "checkpoint.every=2",
                   *QUIET])
    assert "copy task: eval loss" in result.stdout  # the callback ran
    _run([*TORCHRUN, example, f"run.dir={resumed}", "train.steps=4", "eval.every=2",
          f"resume={whole / 'checkpoints' / 'step-00000002'}", *QUIET])
    assert _numbers(_rows(resumed)) == _numbers(_rows(whole))[2:]


def _python_blocks(markdown: Path) -> list[str]:
    """The ```python blocks of a document, as written."""
    text, blocks = markdown.read_text(), []
    while "```python\n" in text:
        text = text.split("```python\n", 1)[1]
        block, text = text.split("```", 1)
        blocks.append(block)
    return blocks


def _in_a_checkout(tmp_path: Path, source: str) -> Path:
    """The snippet as train.py in a folder with the repo's configs/ (it names configs/tiny.yaml and
    writes runs/<name>, as in a checkout), so the suite's runs stay out of the real runs/."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    (tmp_path / "train.py").write_text(source)
    return tmp_path / "train.py"


def _spawn(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("document", ["README.md", "docs/api.md"])
def test_the_documented_api_snippet_runs_as_written_under_torchrun(tmp_path, document):
    blocks = _python_blocks(ROOT / document)
    assert blocks, f"{document} shows no Python"
    script = _in_a_checkout(tmp_path, blocks[0])
    result = _spawn([*TORCHRUN, str(script)], tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert [row["step"] for row in _rows(run_dir)] == list(range(1, 21))


def test_a_user_mistake_through_the_api_is_one_line_from_one_rank(tmp_path):
    """The README's snippet without its eval.every=0 (tiny.yaml evaluates every 4 steps, and
    data= brings no eval_data=): one line, from rank 0, exit 2 on every rank; under
    launch/local.sh that line is the whole output and the job's exit code."""
    readme = _python_blocks(ROOT / "README.md")[0]
    assert '"eval.every=0", ' in readme
    script = _in_a_checkout(tmp_path, readme.replace('"eval.every=0", ', ""))
    under_torchrun = _spawn([*TORCHRUN, str(script)], tmp_path)
    said = [line for line in (under_torchrun.stdout + under_torchrun.stderr).splitlines() if "harness: error:" in line]
    assert said == ["harness: error: eval.every=4 with harness.Trainer(data=...) needs eval_data=... (held-out items), "
                    "or set eval.every=0"], under_torchrun.stderr[-3000:]
    assert "exitcode  : 2" in under_torchrun.stderr and "exitcode  : 1" not in under_torchrun.stderr
    assert 'File "' + str(script) not in under_torchrun.stderr  # no rank printed a traceback
    launched = _spawn([str(ROOT / "launch" / "local.sh"), "2", str(script)], tmp_path)
    assert launched.returncode == 2
    assert [line for line in (launched.stdout + launched.stderr).splitlines() if line.strip()] == said
