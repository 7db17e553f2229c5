"""Compute dtypes and the device check that refuses a dtype the GPU can only emulate."""

from __future__ import annotations

import pytest
import torch

from harness.errors import HarnessError
from harness.numerics.precision import check_device_supports, precision_policy


def _pretend_gpu(monkeypatch, name: str, capability: tuple[int, int]) -> torch.device:
    # No GPU on the machines that run the suite: the two queries the check makes are answered as
    # the named card would answer them. Everything else (the decision, the message) is real.
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    return torch.device("cuda", 0)


@pytest.mark.parametrize("name, capability, refused", [
    ("Tesla V100-SXM2-32GB", (7, 0), {"bf16"}),
    ("Tesla T4", (7, 5), {"bf16"}),
    ("GeForce GTX TITAN X", (5, 2), {"bf16", "fp16"}),
    ("NVIDIA A100-SXM4-80GB", (8, 0), set()),
    ("NVIDIA H100 80GB HBM3", (9, 0), set()),
])
def test_a_gpu_without_native_half_math_is_refused_with_the_fix(monkeypatch, name, capability, refused):
    device = _pretend_gpu(monkeypatch, name, capability)
    for precision in ("fp32", "fp16", "bf16"):
        policy = precision_policy(precision)
        if precision not in refused:
            check_device_supports(policy, device)
            continue
        with pytest.raises(HarnessError) as error:
            check_device_supports(policy, device)
        message = str(error.value)
        assert f"precision={precision} needs a GPU of compute capability" in message
        assert name in message and f"{capability[0]}.{capability[1]}" in message
        assert "use precision=" in message and "\n" not in message


def test_a_cpu_runs_every_precision():
    for precision in ("fp32", "fp16", "bf16"):
        check_device_supports(precision_policy(precision), torch.device("cpu"))


def test_only_fp16_uses_a_loss_scale():
    assert [precision_policy(p).uses_loss_scaling for p in ("fp32", "bf16", "fp16")] == [False, False, True]
    assert [precision_policy(p).is_mixed for p in ("fp32", "bf16", "fp16")] == [False, True, True]
