"""FSDP2 on 2 real gloo ranks: parity with a plain single-process loop, sharded fp32 state,
global grad norm, and mixed-precision compute. One spawn runs all scenarios (imports cost ~5 s)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.distributed import run_on_ranks
from tests.reference import reference_fp32

pytestmark = pytest.mark.spawns

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
PARITY_STEPS = 6


def _overrides(run_dir: str, precision: str, *extra: str) -> list[str]:
    return [f"run.dir={run_dir}", f"precision={precision}", "log.progress=off", "eval.every=0", *extra]


def _rank_scenarios(run_root: str) -> dict:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard

    from harness.config import load_config
    from harness.numerics.optim import lr_at
    from harness.runtime import dist as hdist
    from harness.train.build import build_loop

    info = hdist.rank_info_from_env()
    device = torch.device("cpu")
    hdist.init_process_group(info, "gloo", 120, device)
    out: dict = {"rank": info.rank}

    # fp32: step by step, checking the guard's global norm against the unsharded gradient.
    cfg = load_config(TINY, _overrides(f"{run_root}/fp32", "fp32", f"train.steps={PARITY_STEPS}"))
    trainer = build_loop(cfg, info, device)
    losses, norms, unsharded, clipped = [], [], [], []

    def global_grad_norm() -> float:  # collective: every rank gathers
        grads = [p.grad.full_tensor().double() for p in trainer.backend.model.parameters()]
        return math.sqrt(sum(g.square().sum().item() for g in grads))

    # What AdamW steps on: the gradients as the device-side decision left them (unscaled, clipped).
    trainer.backend.torch_optimizer.register_step_pre_hook(lambda *_: clipped.append(global_grad_norm()))
    for step in range(1, PARITY_STEPS + 1):
        local_loss = trainer.forward_backward(step, loss_scale=None)
        unsharded.append(global_grad_norm())
        decision = trainer.apply_gradients(step, lr_at(step, cfg.train), local_loss).read()
        loss_and_tokens = local_loss.detach().double()
        dist.all_reduce(loss_and_tokens)
        losses.append((loss_and_tokens[0] / loss_and_tokens[1]).item())
        norms.append(decision.grad_norm)
    out.update(fp32_losses=losses, fp32_norms=norms, fp32_unsharded=unsharded, fp32_clipped=clipped)

    params = list(trainer.backend.model.parameters())
    out["param_types"] = sorted({(type(p).__name__, str(p.dtype)) for p in params})
    out["placements"] = sorted({str(p.placements) for p in params if isinstance(p, DTensor)})
    out["all_shard0"] = all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in params)
    out["local_param_numel"] = sum(p.to_local().numel() for p in params)
    out["full_param_numel"] = sum(p.numel() for p in params)
    state = [v for st in trainer.backend.torch_optimizer.state.values() for v in st.values() if v.numel() > 1]
    out["optim_state_dtypes"] = sorted({str(t.dtype) for t in state})
    out["optim_state_numel"] = sum(t.to_local().numel() for t in state)
    out["piece_numel"] = sum(piece.numel for piece in trainer.backend.state_pieces())

    # bf16 / fp16: whole runs through fit(); the compute dtype is observed inside a block.
    for precision in ("bf16", "fp16"):
        cfg = load_config(
            TINY, _overrides(f"{run_root}/{precision}", precision, "train.steps=12", "train.lr=1.0e-2")
        )
        trainer = build_loop(cfg, info, device)
        seen = set()
        block = trainer.backend.model.transformer.h[0]
        handle = block.register_forward_hook(lambda mod, inp, outp, seen=seen: seen.add(str(outp[0].dtype)))
        summary = trainer.fit()
        handle.remove()
        out[precision] = {
            "first_loss": summary.first_loss,
            "final_loss": summary.final_loss,
            "skipped": summary.skipped,
            "block_output_dtypes": sorted(seen),
            "param_dtypes": sorted({str(p.dtype) for p in trainer.backend.model.parameters()}),
            "local_numel": sum(p.to_local().numel() for p in trainer.backend.model.parameters()),
        }
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_on_ranks(_rank_scenarios, 2, str(tmp_path_factory.mktemp("fsdp2")))


def test_fp32_fsdp2_matches_single_process_reference(ranks, tmp_path):
    ref_losses, ref_norms = reference_fp32(TINY, _overrides(str(tmp_path / "ref"), "fp32", f"train.steps={PARITY_STEPS}"))
    for r in ranks:
        assert len(r["fp32_losses"]) == PARITY_STEPS
        for step, (got, want) in enumerate(zip(r["fp32_losses"], ref_losses), start=1):
            assert got == pytest.approx(want, abs=1e-5), f"rank {r['rank']} step {step}"
        # The first step sees identical parameters, so its norm agrees to fp32 rounding.
        assert r["fp32_norms"][0] == pytest.approx(ref_norms[0], rel=1e-5)
        for got, want in zip(r["fp32_norms"], ref_norms):
            assert got == pytest.approx(want, rel=1e-3)
    assert ref_losses[-1] < ref_losses[0]


def test_global_grad_norm_is_unsharded_norm_and_identical_on_every_rank(ranks):
    for r in ranks:
        for norm, full in zip(r["fp32_norms"], r["fp32_unsharded"]):
            assert norm == pytest.approx(full, rel=1e-6)
    assert ranks[0]["fp32_norms"] == ranks[1]["fp32_norms"]  # bit-identical, not just close
    # train.grad_clip=1.0 and these norms exceed it: after clipping the full gradient has norm 1.
    for r in ranks:
        for norm, after in zip(r["fp32_norms"], r["fp32_clipped"]):
            assert norm > 1.0
            assert after == pytest.approx(1.0, rel=1e-5)


def test_params_and_optimizer_state_are_fp32_and_sharded(ranks):
    full = ranks[0]["full_param_numel"]
    for r in ranks:
        assert r["param_types"] == [("DTensor", "torch.float32")]
        assert r["all_shard0"], r["placements"]
        # Each rank holds about half the elements (dim-0 shards round up per tensor).
        assert abs(r["local_param_numel"] - full / 2) <= 0.01 * full
        assert r["optim_state_dtypes"] == ["torch.float32"]
        assert r["optim_state_numel"] == 2 * r["local_param_numel"]  # exp_avg + exp_avg_sq
        assert r["piece_numel"] == r["local_param_numel"]
    assert sum(r["local_param_numel"] for r in ranks) == full


@pytest.mark.parametrize("precision, dtype", [("bf16", "torch.bfloat16"), ("fp16", "torch.float16")])
def test_mixed_precision_trains_with_fp32_master_weights(ranks, precision, dtype):
    full = ranks[0]["full_param_numel"]
    for r in ranks:
        run = r[precision]
        assert run["block_output_dtypes"] == [dtype]
        assert run["param_dtypes"] == ["torch.float32"]
        assert abs(run["local_numel"] - full / 2) <= 0.01 * full
        assert run["skipped"] == 0
        assert run["final_loss"] < run["first_loss"] - 0.3, run
