"""The lora: section's checks (harness.config.lora), before anything is built."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.config import load_config
from harness.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
LORA = ROOT / "configs" / "smollm2-135m-lora.yaml"


@pytest.mark.parametrize("overrides, message", [
    (["model.pretrained=null"], r"^lora.r=16 trains adapters on a pretrained base: set model.pretrained"),
    (["precision=fp8"], r"^lora.r=16 with precision=fp8 is not supported"),
    (["lora.dropout=1.0"], r"^lora.dropout must be in \[0, 1\)"),
    (["lora.alpha=0"], r"^lora.alpha must be > 0"),
    (["parallel.backend=deepspeed", "parallel.zero_stage=1"], r"^lora.r=16 with ZeRO-1 would keep a whole base model"),
    (["parallel.backend=deepspeed", "parallel.zero_stage=2"], r"^lora.r=16 with ZeRO-2 would keep a whole base model on "
                                                              r"every rank; use parallel.zero_stage=3 or parallel.backend=fsdp2"),
])
def test_lora_settings_that_cannot_run_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(LORA, overrides)


def test_lora_is_off_by_default_and_zero3_or_fsdp2_take_it():
    assert not load_config(ROOT / "configs" / "tiny.yaml").lora.enabled
    cfg = load_config(LORA, ["parallel.backend=deepspeed", "parallel.zero_stage=3"])
    assert cfg.lora.r == 16 and cfg.lora.alpha == 32 and cfg.lora.target_modules == []
