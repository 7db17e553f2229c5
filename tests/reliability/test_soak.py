"""The soak's short form (bench/soak.sh runs 3,000 steps): a 2-rank run with async checkpoints,
its memory, file descriptors, threads, processes and checkpoint folder checked at the end."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.reliability.drills import ROOT

pytestmark = pytest.mark.spawns


def test_short_soak_leaks_nothing(tmp_path):
    result = subprocess.run(
        [sys.executable, "bench/soak.py", "--steps", "120", "--checkpoint-every", "20", "--sample-every", "20",
         "--run-dir", str(tmp_path / "soak")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "soak: ok" in result.stdout
    assert sorted(p.name for p in (tmp_path / "soak" / "checkpoints").iterdir()) == ["step-00000100", "step-00000120"]
