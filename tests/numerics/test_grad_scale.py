"""The shared loss-scale/clip module: DeepSpeed's scale semantics (checked against DeepSpeed's own
DynamicLossScaler), unscale+clip arithmetic, skip decisions and the abort paths, in a world of 1.
The cross-rank decision is covered with real ranks in test_parallel_fsdp2 and test_train."""

from __future__ import annotations

import random

import pytest
import torch

from harness.config import ScalerConfig
from harness.numerics.grad_scale import DynamicLossScale, GradScaler, GradShard, build_grad_scaler


def _schedules():
    rng = random.Random(1234)
    cases = []
    for _ in range(60):
        cases.append(
            dict(
                init_power=rng.choice([4, 8, 16]),
                window=rng.choice([1, 2, 3, 5]),
                hysteresis=rng.choice([1, 2, 3]),
                consecutive=rng.choice([False, True]),
                min_scale=rng.choice([1.0, 4.0]),
                overflow_rate=rng.choice([0.1, 0.3, 0.6]),
                seed=rng.randrange(10**6),
            )
        )
    return cases


@pytest.mark.parametrize("case", _schedules())
def test_scale_trajectory_equals_deepspeed_dynamic_loss_scaler(deepspeed_scaler_cls, case):
    theirs = deepspeed_scaler_cls(
        init_scale=2.0 ** case["init_power"],
        scale_window=case["window"],
        min_scale=case["min_scale"],
        delayed_shift=case["hysteresis"],
        consecutive_hysteresis=case["consecutive"],
        raise_error_at_min_scale=True,
    )
    ours = DynamicLossScale(
        ScalerConfig(
            init_scale=2.0 ** case["init_power"],
            growth_interval=case["window"],
            hysteresis=case["hysteresis"],
            consecutive_hysteresis=case["consecutive"],
            min_scale=case["min_scale"],
        )
    )
    rng = random.Random(case["seed"])
    for i in range(80):
        overflow = rng.random() < case["overflow_rate"]
        if overflow and ours.at_floor():
            with pytest.raises(Exception, match="minimum"):
                theirs.update_scale(True)
            return
        theirs.update_scale(overflow)
        ours.update(overflow)
        assert ours.scale == theirs.cur_scale, f"update {i}"
        assert ours.hysteresis_left == theirs.cur_hysteresis, f"update {i}"


def test_hysteresis_rule_by_hand():
    s = DynamicLossScale(ScalerConfig(init_scale=1024.0, growth_interval=2, hysteresis=2))
    trajectory = []
    for overflow in [True, True, False, False, False, True, True]:
        s.update(overflow)
        trajectory.append((s.scale, s.hysteresis_left))
    assert trajectory == [
        (1024.0, 1),  # first overflow only spends hysteresis
        (512.0, 1),  # second backs off; the counter does not refill on an overflow
        (512.0, 1),
        (512.0, 1),
        (1024.0, 2),  # growth after the interval refills the counter
        (1024.0, 1),
        (512.0, 1),
    ]


def test_consecutive_hysteresis_refills_after_every_clean_step():
    s = DynamicLossScale(ScalerConfig(init_scale=1024.0, growth_interval=100, hysteresis=2, consecutive_hysteresis=True))
    for overflow in [True, False, True, False, True]:
        s.update(overflow)
    assert s.scale == 1024.0  # never two overflows in a row, so never a back-off


def test_min_scale_floor_and_at_floor():
    s = DynamicLossScale(ScalerConfig(init_scale=4.0, hysteresis=1, min_scale=2.0))
    assert not s.at_floor()
    s.update(True)
    assert s.scale == 2.0 and s.at_floor()


def test_state_dict_round_trip_continues_identically():
    a = DynamicLossScale(ScalerConfig(init_scale=2.0**16, growth_interval=3, hysteresis=2))
    pattern = [False, True, False, False, True, True, False, False, False, False]
    for overflow in pattern:
        a.update(overflow)
    b = DynamicLossScale(ScalerConfig(init_scale=1.0, growth_interval=3, hysteresis=2))
    b.load_state_dict(a.state_dict())
    for overflow in pattern:
        a.update(overflow)
        b.update(overflow)
        assert (a.scale, a.hysteresis_left, a.iteration) == (b.scale, b.hysteresis_left, b.iteration)


def _fp16_scaler(**overrides) -> GradScaler:
    cfg = ScalerConfig(**overrides)
    return build_grad_scaler(cfg, uses_loss_scaling=True, grad_clip=1.0, device=torch.device("cpu"))


def test_unscale_and_clip_fold_into_one_multiplier(world_of_one):
    scaler = _fp16_scaler(init_scale=1024.0)
    true_grads = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]  # global norm 5
    scaled = [g * 1024.0 for g in true_grads]
    decision = scaler.decide([GradShard("a", scaled[0]), GradShard("b", scaled[1])]).read()
    assert not decision.skipped
    assert decision.loss_scale == 1024.0
    assert decision.grad_norm == pytest.approx(5.0)
    assert decision.clip_coef == pytest.approx(1.0 / (5.0 + 1e-6))
    assert decision.grad_multiplier == decision.clip_coef / 1024.0
    torch.testing.assert_close(scaled[0], true_grads[0] * 1024.0)  # deciding reads, never writes
    for got, want in zip(scaled, true_grads):
        torch.testing.assert_close(got * decision.grad_multiplier, want / (5.0 + 1e-6))


def test_no_clip_below_threshold_and_scale_one_is_untouched(world_of_one):
    scaler = build_grad_scaler(ScalerConfig(), uses_loss_scaling=False, grad_clip=10.0, device=torch.device("cpu"))
    grad = torch.tensor([0.3, 0.4])
    decision = scaler.decide([GradShard("w", grad)]).read()
    assert decision.grad_norm == pytest.approx(0.5) and decision.clip_coef == 1.0
    assert decision.grad_multiplier == 1.0


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_nonfinite_skips_names_the_tensor_and_backs_off(world_of_one, bad):
    scaler = _fp16_scaler(init_scale=256.0, hysteresis=1)
    grads = [GradShard("ok", torch.ones(3)), GradShard("broken", torch.tensor([1.0, bad]))]
    decision = scaler.decide(grads).read()
    assert decision.skipped and decision.grad_norm is None
    assert decision.local_nonfinite == (("broken", "nan" if bad != bad else "inf"),)
    assert decision.loss_scale == 256.0 and scaler.scale == 128.0
    assert decision.abort_reason is None


def test_abort_when_scale_is_at_its_floor(world_of_one):
    scaler = _fp16_scaler(init_scale=2.0, min_scale=1.0, hysteresis=1)
    bad = [GradShard("w", torch.tensor([float("inf")]))]
    first = scaler.decide(bad).read()
    assert first.abort_reason is None and scaler.scale == 1.0
    second = scaler.decide([GradShard("w", torch.tensor([float("inf")]))]).read()
    assert second.skipped
    assert "floor" in second.abort_reason and "scaler.min_scale=1" in second.abort_reason


def test_abort_after_too_many_consecutive_skips_in_bf16(world_of_one):
    cfg = ScalerConfig(max_consecutive_skips=3)
    scaler = build_grad_scaler(cfg, uses_loss_scaling=False, grad_clip=1.0, device=torch.device("cpu"))
    reasons = []
    for _ in range(3):
        decision = scaler.decide([GradShard("w", torch.tensor([float("nan")]))]).read()
        assert decision.loss_scale == 1.0
        reasons.append(decision.abort_reason)
    assert reasons[:2] == [None, None]
    assert "3 consecutive steps" in reasons[2]
    # Below the limit, a clean step resets the count.
    scaler = build_grad_scaler(cfg, uses_loss_scaling=False, grad_clip=1.0, device=torch.device("cpu"))
    for grad in ([float("nan")], [float("nan")], [1.0], [float("nan")], [float("nan")]):
        assert scaler.decide([GradShard("w", torch.tensor(grad))]).read().abort_reason is None
    assert scaler.consecutive_skips == 2 and scaler.total_skips == 4


def test_static_scale_never_moves(world_of_one):
    scaler = _fp16_scaler(init_scale=128.0, dynamic=False)
    for grad in ([float("inf")], [1.0], [float("nan")]):
        scaler.decide([GradShard("w", torch.tensor(grad))]).read()
    assert scaler.scale == 128.0


def test_guard_state_dict_round_trip(world_of_one):
    a = _fp16_scaler(init_scale=64.0, hysteresis=1)
    a.decide([GradShard("w", torch.tensor([float("inf")]))])
    b = _fp16_scaler()
    b.load_state_dict(a.state_dict())
    assert (b.scale, b.total_skips, b.consecutive_skips) == (32.0, 1, 1)


def test_deciding_reads_nothing_on_the_host(world_of_one):
    """The decision, the scale update and the skip counters stay on the device: no host read."""
    from harness.observe.step_counter import StepCounter

    scaler = _fp16_scaler(init_scale=1024.0, hysteresis=1)
    counter = StepCounter(torch.device("cpu"))
    with counter:
        for grad in ([1.0], [float("inf")], [2.0]):
            decision = scaler.decide([GradShard("w", torch.tensor(grad) * 1024.0)])
    assert counter.take()["host_syncs"] == 0
    assert decision.read().loss_scale == 512.0 and scaler.total_skips == 1


def test_an_abort_latches_and_every_later_step_is_skipped_unchanged(world_of_one):
    """The host reads a decision only when it logs: after an abort, the steps issued before that
    read must change nothing (no scale update, no counters), and say no new abort."""
    scaler = _fp16_scaler(init_scale=2.0, min_scale=1.0, hysteresis=1)
    inf = [GradShard("w", torch.tensor([float("inf")]))]
    scaler.decide(inf)  # 2 -> 1
    aborting = scaler.decide(inf)  # at the floor: abort
    later = [scaler.decide([GradShard("w", torch.tensor([1.0]))]).read() for _ in range(3)]
    assert "floor" in aborting.read().abort_reason
    assert all(d.skipped and d.abort_reason is None and d.grad_multiplier == 0.0 for d in later)
    assert (scaler.scale, scaler.total_skips, scaler.consecutive_skips) == (1.0, 2, 2)


def test_a_copy_adds_nothing_to_the_norm_but_its_nonfinite_value_still_skips(world_of_one):
    """Per tensor: an HSDP replica's copy of one gradient is left out of the sum, the rank's own
    first copies count in full, and an inf in a copy still makes the step skip."""
    scaler = build_grad_scaler(ScalerConfig(), uses_loss_scaling=False, grad_clip=0.0, device=torch.device("cpu"))
    mine, copy = torch.tensor([3.0, 4.0]), torch.tensor([12.0])
    decision = scaler.decide([GradShard("mine", mine), GradShard("copy", copy, counted=False)]).read()
    assert decision.grad_norm == 5.0
    assert scaler.decide([GradShard("copy", copy, counted=False)]).read().grad_norm == 0.0
    poisoned = scaler.decide([GradShard("mine", mine), GradShard("copy", torch.tensor([float("inf")]), counted=False)])
    assert poisoned.read().skipped
