"""The fast tier's one spawn (`make test-fast`): 2 real gloo ranks run the harness end to end.

- fp32 on FSDP2 and ZeRO-1/2/3 equals a plain single-process loop;
- one fp16 fault schedule skips the same steps with the same loss scales on every backend and rank;
- a save and a resume continue the run bit for bit.

The full suite covers each of these in depth (tests/parallel, tests/checkpoint, tests/reliability).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed import run_on_ranks
from tests.parallel.test_parallel_deepspeed import BACKENDS
from tests.reference import reference_fp32

pytestmark = [pytest.mark.spawns, pytest.mark.smoke]

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
STEPS = 4
FAULTS = ["precision=fp16", "train.steps=6", "log.per_rank=true", "scaler.init_scale=1024", "scaler.hysteresis=2",
          "faults.nonfinite_grad_steps=[2,3]", "faults.nonfinite_grad_rank=1"]


def _common(run_dir: str, *extra: str) -> list[str]:
    return [f"run.dir={run_dir}", "log.progress=off", "log.every=1", "eval.every=0", *extra]


def _scenarios(root: str) -> None:
    from harness.config import load_config
    from harness.runtime import dist as hdist
    from harness.train.build import build_loop

    info = hdist.rank_info_from_env()
    device = hdist.device_for(info, "gloo")
    hdist.init_process_group(info, "gloo", 120, device)

    def fit(name: str, *overrides: str) -> None:
        build_loop(load_config(TINY, _common(f"{root}/{name}", *overrides)), info, device).fit()

    for label, backend in BACKENDS.items():
        fit(f"fp32-{label}", "precision=fp32", f"train.steps={STEPS}", *backend)
    for label in ("fsdp2", "zero2"):
        fit(f"faults-{label}", *FAULTS, *BACKENDS[label])
    fit("whole", "precision=fp32", f"train.steps={STEPS}", "checkpoint.every=2", "checkpoint.keep_last=2")
    fit("resumed", "precision=fp32", f"train.steps={STEPS}", f"resume={root}/whole/checkpoints/step-00000002")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("smoke")
    run_on_ranks(_scenarios, 2, str(root))
    return root


def test_fp32_on_every_backend_equals_the_single_process_loop(runs, tmp_path):
    reference, _ = reference_fp32(TINY, _common(str(tmp_path), "precision=fp32", f"train.steps={STEPS}"))
    for label in BACKENDS:
        losses = [row["loss"] for row in _rows(runs / f"fp32-{label}" / "metrics.jsonl")]
        assert losses == pytest.approx(reference, abs=1e-5), label


def test_one_fault_schedule_gives_the_same_decisions_on_every_backend_and_rank(runs):
    # Steps 2 and 3 overflow on rank 1: hysteresis 2 spends its spare at step 2, halves at 3.
    expected = [(1, False, 1024.0), (2, True, 1024.0), (3, True, 1024.0), (4, False, 512.0), (5, False, 512.0),
                (6, False, 512.0)]
    for label in ("fsdp2", "zero2"):
        for rank in (0, 1):
            rows = _rows(runs / f"faults-{label}" / "ranks" / f"rank-{rank}.jsonl")
            assert [(r["step"], r["skipped"], r["loss_scale"]) for r in rows] == expected, (label, rank)


def test_a_resumed_run_continues_bit_for_bit(runs):
    whole = _rows(runs / "whole" / "metrics.jsonl")
    resumed = _rows(runs / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [3, 4]
    assert [(r["loss"], r["grad_norm"]) for r in resumed] == [(r["loss"], r["grad_norm"]) for r in whole[2:]]
