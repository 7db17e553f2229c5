"""parallel.offload on 2 real gloo ranks: FSDP2's CPUOffloadPolicy, ZeRO-1/2/3 offload_optimizer and
ZeRO-3 offload_param give the same fp32 losses as the same backends without offload, and the same
skip / loss-scale decisions under one fp16 fault schedule (the shared scaler reads the offloaded
gradient partitions). On a CPU the "host" is the device itself: this checks what offload computes;
its memory and speed on a GPU are bench/gpu.sh's business. One spawn for all scenarios."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.distributed import run_on_ranks
from tests.parallel.test_parallel_deepspeed import DRILL, TINY, _common

pytestmark = pytest.mark.spawns

STEPS = 5
OFFLOADED = {
    "fsdp2": ["parallel.backend=fsdp2", "parallel.offload=params"],
    "zero1": ["parallel.backend=deepspeed", "parallel.zero_stage=1", "parallel.offload=optimizer"],
    "zero2": ["parallel.backend=deepspeed", "parallel.zero_stage=2", "parallel.offload=optimizer"],
    "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3", "parallel.offload=optimizer"],
    "zero3_params": ["parallel.backend=deepspeed", "parallel.zero_stage=3", "parallel.offload=params"],
}
TORCH_ADAM = ["parallel.offload_adam=torch"]
# Each precision without a loss scale and each offloaded optimizer once (ZeRO-2's and ZeRO-3's).
SKIP_RUNS = [("fp32", "zero3"), ("bf16", "zero2")]


def _losses(trainer, cfg) -> tuple[list[float], list[float]]:
    from harness.numerics.optim import lr_at

    losses, norms = [], []
    for step in range(1, STEPS + 1):
        local_loss = trainer.forward_backward(step, loss_scale=None)
        decision = trainer.apply_gradients(step, lr_at(step, cfg.train), local_loss).read()
        losses.append(decision.mean_loss)
        norms.append(decision.grad_norm)
    return losses, norms


def _piece_sums(backend) -> dict[str, float]:
    """Global sum of squares of each kind of state piece (what checkpoints and export read)."""
    import torch.distributed as dist

    pieces = backend.state_pieces()
    sums = torch.tensor([sum(float(p.tensors[kind].double().square().sum()) for p in pieces)
                         for kind in ("param", "exp_avg", "exp_avg_sq")], dtype=torch.float64)
    dist.all_reduce(sums)
    return dict(zip(("param", "exp_avg", "exp_avg_sq"), sums.tolist()))


def _rank_scenarios(run_root: str) -> dict:
    from harness.config import load_config
    from harness.runtime import dist as hdist
    from harness.train.build import build_loop

    info = hdist.rank_info_from_env()
    device = torch.device("cpu")
    hdist.init_process_group(info, "gloo", 120, device)
    out: dict = {"fp32": {}, "names": {}}
    runs = {"reference": ["parallel.backend=fsdp2"]}
    runs.update({label: args + TORCH_ADAM for label, args in OFFLOADED.items()})
    runs["zero2_cpu_adam"] = OFFLOADED["zero2"] + ["parallel.offload_adam=deepspeed"]
    for label, args in runs.items():
        cfg = load_config(TINY, _common(f"{run_root}/fp32-{label}", "precision=fp32", f"train.steps={STEPS}", *args))
        trainer = build_loop(cfg, info, device)
        out["fp32"][label] = _losses(trainer, cfg)
        out["names"][label] = trainer.backend.name
        out.setdefault("pieces", {})[label] = _piece_sums(trainer.backend)
        if label == "zero2_cpu_adam":
            out["cpu_adam_state"] = sorted({type(s["step"]).__name__ for s in trainer.backend.torch_optimizer.state.values()})

    for label, args in OFFLOADED.items():
        cfg = load_config(TINY, _common(f"{run_root}/drill-{label}", *DRILL, *args, *TORCH_ADAM))
        build_loop(cfg, info, device).fit()
    # fp32 and bf16 have no loss scale: DeepSpeed still has to skip where harness decided to.
    for precision, label in SKIP_RUNS:
        cfg = load_config(TINY, _common(f"{run_root}/skip-{precision}-{label}", f"precision={precision}",
                                        "train.steps=4", "faults.nonfinite_grad_steps=[2]", "faults.nonfinite_grad_rank=1",
                                        "log.per_rank=true", *OFFLOADED[label], *TORCH_ADAM))
        build_loop(cfg, info, device).fit()
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("offload")
    return root, run_on_ranks(_rank_scenarios, 2, str(root))


def test_offloaded_fp32_runs_equal_the_same_run_without_offload(ranks):
    _, results = ranks
    for r in results:
        ref_losses, ref_norms = r["fp32"]["reference"]
        for label in OFFLOADED:
            losses, norms = r["fp32"][label]
            assert losses == pytest.approx(ref_losses, rel=1e-5), label
            assert norms == pytest.approx(ref_norms, rel=1e-5), label
            assert "offloaded to host memory" in r["names"][label], label
    assert results[0]["fp32"] == results[1]["fp32"]
    # The state checkpoints and export read: the same masters and AdamW moments with offload.
    reference = results[0]["pieces"]["reference"]
    for label in OFFLOADED:
        assert results[0]["pieces"][label] == pytest.approx(reference, rel=1e-5), label


def test_deepspeed_cpu_adam_steps_offloaded_state_like_torch_adamw(ranks):
    _, results = ranks
    losses, _ = results[0]["fp32"]["zero2_cpu_adam"]
    assert losses == pytest.approx(results[0]["fp32"]["zero2"][0], rel=1e-5)
    assert "stepped by DeepSpeed's CPU Adam" in results[0]["names"]["zero2_cpu_adam"]
    assert "stepped by torch AdamW" in results[0]["names"]["zero2"]
    assert results[0]["cpu_adam_state"] == ["int"]  # its own step counter, as its C++ kernel wants


def test_harness_skips_reach_deepspeed_in_fp32_and_bf16_with_offload(ranks):
    root, _ = ranks
    for precision, label in SKIP_RUNS:
        for rank in (0, 1):
            path = Path(root, f"skip-{precision}-{label}", "ranks", f"rank-{rank}.jsonl")
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            assert [r["skipped"] for r in rows] == [False, True, False, False], (precision, label, rank)


def test_fault_schedule_gives_the_same_decisions_with_offload(ranks):
    root, _ = ranks
    # The schedule and expectations of tests/parallel/test_parallel_deepspeed.py, now with offload.
    expected_skips = [s in (2, 3, 6) for s in range(1, 11)]
    expected_scales = [1024, 1024, 1024, 512, 512, 512, 256, 256, 256, 512]
    for label in OFFLOADED:
        for rank in (0, 1):
            rows = [json.loads(line) for line in Path(root, f"drill-{label}", "ranks", f"rank-{rank}.jsonl").read_text().splitlines()]
            assert [r["skipped"] for r in rows] == expected_skips, (label, rank)
            assert [r["loss_scale"] for r in rows] == expected_scales, (label, rank)
