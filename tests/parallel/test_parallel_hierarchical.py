"""Past one node, on real gloo ranks: HSDP (parallel.replicate on FSDP2) and hpZ (on ZeRO-3)
compute what the flat layouts compute, make the same fp16 decisions, and write checkpoints that
resume on any backend and world size; and the step's collective bytes predicted from the
sharding plan (harness.estimate.communication) equal the bytes counted on every run here.

Three spawns: 4 ranks (references, HSDP, hpZ, fp16 schedules, the chain's first leg), 2 ranks
(the chain's FSDP2 leg, the 2-rank layouts), 4 ranks (the chain's ZeRO-3 leg)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.distributed import run_on_ranks

pytestmark = pytest.mark.spawns

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
COMMON = ["eval.every=0", "log.progress=off", "debug.count_syncs=true"]
FP16_FAULTS = ["precision=fp16", "train.steps=6", "scaler.init_scale=1024", "scaler.hysteresis=2",
               "scaler.growth_interval=3", "faults.nonfinite_grad_steps=[3,4]", "faults.nonfinite_grad_rank=1"]
CHAIN = ["precision=fp32", "train.steps=9", "checkpoint.every=3"]
# Shapes that do not divide by 2 or 4 ranks, so every padding rule of the plan is exercised.
ODD = ["model.config.n_embd=30", "model.config.n_head=2"]
DEEPSPEED = ["parallel.backend=deepspeed"]
# No persistent parameters, nothing kept gathered for reuse: every use gathers, so hpZ's
# secondary copies serve every gather after the first one of a step.
EAGER_RELEASE = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                       "stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0,
                                       "stage3_max_live_parameters": 0}}


def _fit_all(root: str, runs: dict) -> dict:
    """Every run of `runs` (label -> overrides) through fit(), one after another on these ranks."""
    from harness.config import load_config
    from harness.runtime import dist as hdist
    from harness.train.build import build_loop

    info = hdist.rank_info_from_env()
    if not torch.distributed.is_initialized():
        hdist.init_process_group(info, "gloo", 120, torch.device("cpu"))
    out = {}
    for label, extra in runs.items():
        run_dir = Path(root, label)
        cfg = load_config(TINY, [f"run.dir={run_dir}", *COMMON, *extra])
        build_loop(cfg, info, torch.device("cpu")).fit()
        if info.rank == 0:
            out[label] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return out


def four_rank_runs(eager_json: str) -> dict:
    eager = [f"parallel.deepspeed_config={eager_json}"]
    return {
        "fsdp2": CHAIN,
        "hsdp": [*CHAIN, "parallel.replicate=2"],
        "fsdp2_fp16": FP16_FAULTS,
        "hsdp_fp16": [*FP16_FAULTS, "parallel.replicate=2"],
        "zero3_fp16": [*FP16_FAULTS, *DEEPSPEED],
        "zero3_eager": ["precision=fp32", "train.steps=3", *DEEPSPEED, *eager],
        "hpz_eager": ["precision=fp32", "train.steps=3", *DEEPSPEED, *eager, "parallel.replicate=2"],
        "zero3_module_eager": ["precision=fp32", "train.steps=3", *DEEPSPEED, *eager, "parallel.zero3_unit=module"],
        "hsdp_odd_accum": ["precision=bf16", "train.steps=3", "train.grad_accum=2", "parallel.replicate=2", *ODD],
        "zero1_odd": ["precision=fp16", "train.steps=3", *DEEPSPEED, "parallel.zero_stage=1", *ODD],
        "zero2_odd_accum": ["precision=bf16", "train.steps=3", "train.grad_accum=2", *DEEPSPEED,
                            "parallel.zero_stage=2", *ODD],
        "zero3_odd_accum": ["precision=bf16", "train.steps=3", "train.grad_accum=2", *DEEPSPEED, *ODD],
    }


def two_rank_runs(hsdp_checkpoint: str) -> dict:
    return {
        # The chain's second leg: 4 ranks x 1 micro-batch -> 2 ranks x 2, the same global batch.
        "fsdp2_from_hsdp": [*CHAIN, "train.grad_accum=2", f"resume={hsdp_checkpoint}"],
        "fsdp2_odd_every": ["precision=bf16", "train.steps=3", "train.grad_accum=2",
                            "parallel.reduce_every_micro_batch=true", *ODD],
        "replicas_only": ["precision=bf16", "train.steps=3", "parallel.replicate=2", *ODD],
        "zero1_odd_accum": ["precision=bf16", "train.steps=3", "train.grad_accum=2", *DEEPSPEED,
                            "parallel.zero_stage=1", *ODD],
        "zero2_odd": ["precision=fp32", "train.steps=3", *DEEPSPEED, "parallel.zero_stage=2", *ODD],
        "zero3_odd": ["precision=fp32", "train.steps=3", *DEEPSPEED, *ODD],
        "zero3_module_odd_accum": ["precision=bf16", "train.steps=3", "train.grad_accum=2", *DEEPSPEED, *ODD,
                                   "parallel.zero3_unit=module"],
    }


def zero3_leg_runs(checkpoint: str) -> dict:
    """The chain's third leg: ZeRO-3 on 4 ranks from the 2-rank FSDP2 checkpoint."""
    return {"zero3_from_fsdp2": [*CHAIN, *DEEPSPEED, f"resume={checkpoint}"]}


def _checkpoint(root: Path, label: str, step: int) -> str:
    return str(root / label / "checkpoints" / f"step-{step:08d}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hierarchical")
    eager_json = root / "eager-release.json"
    eager_json.write_text(json.dumps(EAGER_RELEASE))
    tables = {4: four_rank_runs(str(eager_json)), 2: two_rank_runs(_checkpoint(root, "hsdp", 3))}
    four = run_on_ranks(_fit_all, 4, str(root), tables[4])[0]
    two = run_on_ranks(_fit_all, 2, str(root), tables[2])[0]
    leg = zero3_leg_runs(_checkpoint(root, "fsdp2_from_hsdp", 6))
    four.update(run_on_ranks(_fit_all, 4, str(root), leg)[0])
    tables[4].update(leg)
    return {"root": root, 4: four, 2: two, "tables": tables}


def _column(rows: list[dict], field: str) -> list:
    return [row[field] for row in rows]


def test_hsdp_computes_what_flat_fsdp2_computes(runs):
    flat, hsdp = runs[4]["fsdp2"], runs[4]["hsdp"]
    assert _column(hsdp, "loss") == pytest.approx(_column(flat, "loss"), rel=1e-6)
    # One global norm over the whole mesh: each replica's copy counted once, not R times.
    assert _column(hsdp, "grad_norm") == pytest.approx(_column(flat, "grad_norm"), rel=1e-6)
    ops = hsdp[1]["collectives"]
    assert set(ops["all_gather_into_tensor"]["groups"]) == {"2"}  # gathers stay in the shard group
    assert set(ops["all_reduce"]["groups"]) == {"2", "4"}  # replicas' gradients + harness's agreements


def test_fp16_decisions_are_the_same_on_hsdp_fsdp2_and_zero3(runs):
    fsdp2 = runs[4]["fsdp2_fp16"]
    assert _column(fsdp2, "skipped") == [step in (3, 4) for step in range(1, 7)]
    for label in ("hsdp_fp16", "zero3_fp16"):
        other = runs[4][label]
        assert _column(other, "skipped") == _column(fsdp2, "skipped"), label
        assert _column(other, "loss_scale") == _column(fsdp2, "loss_scale"), label


def test_hpz_matches_plain_zero3_and_gathers_within_its_group(runs):
    plain, hpz = runs[4]["zero3_eager"], runs[4]["hpz_eager"]
    assert _column(hpz, "loss") == _column(plain, "loss")
    assert _column(hpz, "grad_norm") == _column(plain, "grad_norm")
    gathers = hpz[2]["collectives"]["all_gather_into_tensor"]["groups"]
    assert set(gathers) == {"2", "4"} and gathers["2"]["count"] > gathers["4"]["count"]
    assert set(plain[2]["collectives"]["all_gather_into_tensor"]["groups"]) == {"4"}


def test_checkpoint_chain_hsdp_then_fsdp2_on_two_ranks_then_zero3_on_four(runs):
    reference = runs[4]["hsdp"]
    fsdp2 = runs[2]["fsdp2_from_hsdp"]
    zero3 = runs[4]["zero3_from_fsdp2"]
    assert _column(fsdp2, "step") == list(range(4, 10)) and _column(zero3, "step") == [7, 8, 9]
    assert _column(fsdp2, "loss") == pytest.approx(_column(reference[3:], "loss"), rel=1e-5)
    assert _column(zero3, "loss") == pytest.approx(_column(reference[6:], "loss"), rel=1e-5)
    manifest = json.loads(Path(_checkpoint(runs["root"], "hsdp", 3), "manifest.json").read_text())
    # Only the first replica wrote its pieces: every element is in the checkpoint once.
    assert len([f for f in manifest["files"] if f["file"].endswith(".safetensors")]) == 4


def _predicted(overrides: list[str], world_size: int) -> dict:
    from harness.config import load_config
    from harness.estimate.communication import collective_plan
    from harness.estimate.memory import _meta_model

    # A resume changes where the weights come from, not what a step sends.
    cfg = load_config(TINY, [*COMMON, *(o for o in overrides if not o.startswith("resume="))])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
    return collective_plan(_meta_model(cfg, dtype), cfg, world_size).by_op()


def _bytes_by_group(ops: dict) -> dict:
    return {op: {size: group["bytes"] for size, group in entry["groups"].items()} for op, entry in ops.items()}


@pytest.mark.parametrize("world_size", [2, 4])
def test_predicted_collective_bytes_equal_the_counted_ones(runs, world_size):
    """Every op, every group size, exactly, on every run of this file (a steady-state step: the
    last one, unlogged rows have the same traffic)."""
    layouts = set()
    for label, rows in runs[world_size].items():
        predicted = _predicted(runs["tables"][world_size][label], world_size)
        assert _bytes_by_group(predicted) == _bytes_by_group(rows[-1]["collectives"]), label
        layouts.add(label.split("_")[0])
    assert {"fsdp2", "zero1", "zero2", "zero3"} <= layouts
