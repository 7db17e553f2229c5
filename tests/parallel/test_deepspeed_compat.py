"""The one list of private DeepSpeed names: checked against the installed DeepSpeed, and each guard
fails in one line naming what is missing. (The spawned ZeRO tests build every layout for real,
so a name missing there fails them too.)"""

from __future__ import annotations

import re

import pytest

from harness.errors import HarnessError
from harness.parallel.deepspeed import compat


def _owner_class(owner: str):
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return {"DeepSpeedZeroOptimizer": DeepSpeedZeroOptimizer, "DeepSpeedZeroOptimizer_Stage3": DeepSpeedZeroOptimizer_Stage3,
            "BF16_Optimizer": BF16_Optimizer}.get(owner)


def test_the_installed_deepspeed_is_a_tested_release():
    from importlib.metadata import version

    assert version("deepspeed") in compat.TESTED_DEEPSPEED


def test_every_listed_method_exists_on_the_installed_deepspeed_classes():
    """Methods are class attributes; instance attributes (flats, groups) are checked when a real
    optimizer is built (check_internals in layouts.layout_of, run by every ZeRO test)."""
    for private in compat.EVERY_PRIVATE_NAME:
        cls = _owner_class(private.owner)
        if cls is None or private.use == "read":
            continue
        assert hasattr(cls, private.name), f"{private.owner}.{private.name}"


def test_a_missing_name_is_one_line_naming_it_and_the_tested_release():
    class Optimizer:
        bit16_groups = []

    with pytest.raises(HarnessError) as caught:
        compat.check_internals(Optimizer(), compat.ZERO_1_2, [])
    message = str(caught.value)
    assert "\n" not in message
    assert "DeepSpeedZeroOptimizer.averaged_gradients" in message and "DeepSpeedZeroOptimizer.bit16_groups" not in message
    assert "deepspeed==0.19.8" in message


def test_a_parameter_without_zero3_attributes_is_named():
    class Optimizer:
        pass

    for private in compat.ZERO_3:
        if private.owner != "param":
            setattr(Optimizer, private.name, None)
    with pytest.raises(HarnessError, match=r"param\.ds_numel, param\.ds_shape"):
        compat.check_internals(Optimizer(), compat.ZERO_3, [object()])


def test_replaced_checks_must_have_been_called_after_the_first_applied_step():
    class Optimizer:
        def has_overflow(self):
            return "deepspeed's own"

    optimizer = Optimizer()
    checks = compat.ReplacedChecks(optimizer)
    checks.replace("has_overflow", lambda: "harness's")
    checks.replace("scaled_global_norm", lambda: 1.0)
    assert optimizer.has_overflow() == "harness's"
    with pytest.raises(HarnessError, match=r"step\(\) did not call scaled_global_norm, which harness replaces"):
        checks.assert_called(("has_overflow", "scaled_global_norm"))
    optimizer.scaled_global_norm()
    checks.assert_called(("has_overflow", "scaled_global_norm"))
    assert checks.confirmed


@pytest.mark.parametrize("failure, named", [
    (RuntimeError("Error building extension 'cpu_adam'\nninja: build stopped"), "RuntimeError: Error building extension 'cpu_adam'"),
    (OSError("[Errno 2] No such file or directory: 'c++'"), "OSError: [Errno 2] No such file or directory: 'c++'"),
])
def test_cpu_adam_that_does_not_build_falls_back_naming_what_failed(monkeypatch, failure, named):
    import deepspeed.ops.adam
    import torch

    from harness.config import TrainConfig
    from harness.parallel.deepspeed.backend import host_adamw

    def refuse(*args, **kwargs):
        raise failure

    monkeypatch.setattr(deepspeed.ops.adam, "DeepSpeedCPUAdam", refuse)
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))]}]
    optimizer, name = host_adamw(groups, TrainConfig(), "auto")
    assert isinstance(optimizer, torch.optim.AdamW)
    assert name == f"torch AdamW (DeepSpeed's CPU Adam did not build: {named})"
    with pytest.raises(HarnessError, match=re.escape(f"offload_adam=deepspeed: DeepSpeed's CPU Adam did not build ({named})")):
        host_adamw(groups, TrainConfig(), "deepspeed")


def test_a_bug_in_building_cpu_adam_keeps_its_traceback(monkeypatch):
    import deepspeed.ops.adam
    import torch

    from harness.config import TrainConfig
    from harness.parallel.deepspeed.backend import host_adamw

    def bug(*args, **kwargs):
        raise TypeError("__init__() got an unexpected keyword argument 'adamw_mode'")

    monkeypatch.setattr(deepspeed.ops.adam, "DeepSpeedCPUAdam", bug)
    with pytest.raises(TypeError, match="adamw_mode"):
        host_adamw([{"params": [torch.nn.Parameter(torch.zeros(2))]}], TrainConfig(), "auto")


def test_a_zero_section_deepspeed_would_reject_is_one_line_naming_the_key(tmp_path, capsys):
    import json
    from pathlib import Path

    from harness.cli.train import main

    compat.check_zero_section({"zero_optimization": {"stage": 3, "reduce_bucket_size": 5}}, "ok.json")
    with pytest.raises(HarnessError, match=r"z3.json: zero_optimization.reduce_bucket_size=0 is rejected by DeepSpeed "
                                           r"0\.19\.8 \(Input should be greater than 0\)"):
        compat.check_zero_section({"zero_optimization": {"stage": 3, "reduce_bucket_size": 0}}, "z3.json")
    # transformers' own tests/deepspeed/ds_config_zero3.json does this; the launch scripts' config check
    # (--config-only) refuses it before any rank starts, in one line, and --check (harness check) finds it.
    bad = tmp_path / "ds_config_zero3.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": 0,
                                                     "stage3_prefetch_bucket_size": "auto"},
                               "train_micro_batch_size_per_gpu": "auto"}))
    tiny = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
    assert main([tiny, "parallel.backend=deepspeed", f"parallel.deepspeed_config={bad}", "--config-only",
                 "--world-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "zero_optimization.reduce_bucket_size=0 is rejected" in err and err.strip().count("\n") == 0
    assert main([tiny, "parallel.backend=deepspeed", f"parallel.deepspeed_config={bad}", "--check",
                 "--world-size", "2"]) == 2
    assert "harness: check: " in capsys.readouterr().err
