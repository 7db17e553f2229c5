"""Learning-rate schedule and parameter groups."""

from __future__ import annotations

import pytest
import torch

from harness.config import TrainConfig
from harness.numerics.optim import lr_at, param_groups


def test_warmup_then_cosine_to_min_lr():
    cfg = TrainConfig(steps=10, lr=1.0, min_lr=0.1, warmup_steps=2, lr_schedule="cosine")
    lrs = [lr_at(s, cfg) for s in range(1, 11)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_linear_and_constant():
    linear = TrainConfig(steps=4, lr=1.0, min_lr=0.0, lr_schedule="linear")
    assert [lr_at(s, linear) for s in range(1, 5)] == pytest.approx([0.75, 0.5, 0.25, 0.0])
    constant = TrainConfig(steps=4, lr=0.3, warmup_steps=1, lr_schedule="constant")
    assert [lr_at(s, constant) for s in range(1, 5)] == pytest.approx([0.3] * 4)


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3


def test_a_warmup_longer_than_the_run_never_reaches_the_peak():
    cfg = TrainConfig(steps=4, lr=1.0, warmup_steps=10)
    assert [lr_at(step, cfg) for step in range(1, 5)] == [0.1, 0.2, 0.3, 0.4]


def test_only_an_optimizer_that_skips_on_the_device_is_accepted_for_fsdp2():
    from harness.errors import HarnessError
    from harness.numerics.optim import check_skips_on_device

    params = [torch.nn.Parameter(torch.zeros(4))]
    check_skips_on_device(torch.optim.AdamW(params, fused=True))
    for refused in (torch.optim.AdamW(params, foreach=True), torch.optim.AdamW(params, foreach=False),
                    torch.optim.SGD(params, lr=0.1)):
        with pytest.raises(HarnessError, match=r"cannot skip a step on the device.*fused=True"):
            check_skips_on_device(refused)
