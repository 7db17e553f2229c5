"""Users' DeepSpeed JSON: "auto" filled from the harness config, concrete values adopted or
refused with both values named, and the JSON DeepSpeed finally receives."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from harness.config import load_config, validate_for_world
from harness.config.deepspeed_json import runtime_config
from harness.errors import ConfigError
from harness.numerics.grad_scale import build_grad_scaler

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"


def _with_json(tmp_path, data: dict, *overrides: str):
    """A harness config that sets nothing but the model, plus `overrides`, plus the JSON."""
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  config:\n    model_type: gpt2\n    n_layer: 1\n")
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(data))
    return load_config(base, [f"parallel.deepspeed_config={path}", *overrides])


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_deepspeed_json_is_used_by_a_config_and_accepted(path):
    users = [c for c in sorted((ROOT / "configs").glob("*.yaml")) if f"configs/deepspeed/{path.name}" in c.read_text()]
    assert users, f"no config under configs/ uses {path.name}"
    for config in users:
        cfg = load_config(config)
        validate_for_world(cfg, 2)
        ds = runtime_config(cfg, 2, hidden_size=32)
        assert "auto" not in json.dumps(ds)


def test_hf_template_auto_values_come_from_the_harness_config():
    cfg = load_config(ROOT / "configs" / "tiny-ds-json.yaml", ["train.grad_accum=2"])
    assert cfg.parallel.deepspeed_config == "configs/deepspeed/zero3-hf.json"
    assert cfg.precision == "fp32"  # "auto" keeps the harness precision
    assert cfg.train.micro_batch_size == 2 and cfg.train.grad_accum == 2 and cfg.train.grad_clip == 1.0
    assert cfg.parallel.zero_stage == 3
    assert cfg.train.lr_schedule == "linear"  # WarmupDecayLR
    assert cfg.scaler.init_scale == 2.0**16 and cfg.scaler.growth_interval == 1000 and cfg.scaler.hysteresis == 2
    ds = runtime_config(cfg, world_size=2, hidden_size=32)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 8
    assert ds["gradient_clipping"] == 0.0  # harness clips
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["overlap_comm"] is True
    assert zero["reduce_bucket_size"] == 32 * 32
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 32 * 32)
    assert zero["stage3_param_persistence_threshold"] == 320
    assert "optimizer" not in ds and "scheduler" not in ds and "fp16" not in ds
    assert ds["communication_data_type"] == "fp32"


def test_concrete_values_are_adopted_when_the_harness_did_not_set_them(tmp_path):
    cfg = _with_json(
        tmp_path,
        {
            "gradient_clipping": 0.5,
            "fp16": {"enabled": True, "initial_scale_power": 12, "loss_scale_window": 50, "hysteresis": 3,
                     "consecutive_hysteresis": True, "min_loss_scale": 2},
            "zero_optimization": {"stage": 1},
            "bf16": {"enabled": False},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.8, 0.9], "eps": 1e-6,
                                                      "weight_decay": 0.01}},
        },
    )
    s = cfg.scaler
    assert (s.init_scale, s.growth_interval, s.hysteresis, s.consecutive_hysteresis, s.min_scale) == (
        4096.0, 50, 3, True, 2.0)
    assert cfg.train.grad_clip == 0.5 and cfg.parallel.zero_stage == 1
    assert cfg.precision == "fp16"
    assert (cfg.train.lr, cfg.train.beta1, cfg.train.beta2, cfg.train.eps, cfg.train.weight_decay) == (
        1e-4, 0.8, 0.9, 1e-6, 0.01)
    ds = runtime_config(cfg, 2, 32)
    assert ds["fp16"] == {"enabled": True, "loss_scale": 1.0}  # harness drives the scale


def test_fp16_json_alone_selects_fp16_and_static_loss_scale(tmp_path):
    cfg = load_config(ROOT / "configs/tiny-zero2-fp16.yaml")
    assert cfg.precision == "fp16" and cfg.parallel.zero_stage == 2
    assert cfg.scaler.init_scale == 4096.0 and cfg.scaler.growth_interval == 100
    static = _with_json(tmp_path, {"fp16": {"enabled": True, "loss_scale": 128}}, "precision=fp16")
    assert static.scaler.dynamic is False and static.scaler.init_scale == 128.0


def test_json_scale_settings_give_deepspeeds_own_trajectory(deepspeed_scaler_cls, tmp_path):
    fp16 = {"enabled": True, "initial_scale_power": 10, "loss_scale_window": 3, "hysteresis": 2, "min_loss_scale": 1}
    cfg = _with_json(tmp_path, {"fp16": fp16}, "precision=fp16")
    ours = build_grad_scaler(cfg.scaler, uses_loss_scaling=True, grad_clip=1.0, device=None).loss_scale
    # What DeepSpeed's engine builds from the same section (runtime/fp16 + config.py defaults).
    theirs = deepspeed_scaler_cls(init_scale=2**10, scale_window=3, min_scale=1, delayed_shift=2,
                                  consecutive_hysteresis=False)
    rng = random.Random(7)
    for _ in range(40):
        overflow = rng.random() < 0.3 and not ours.at_floor()
        ours.update(overflow)
        theirs.update_scale(overflow)
        assert ours.scale == theirs.cur_scale


@pytest.mark.parametrize(
    "data, overrides, message",
    [
        ({"train_micro_batch_size_per_gpu": 8}, ["train.micro_batch_size=2"],
         "train_micro_batch_size_per_gpu=8 contradicts train.micro_batch_size=2"),
        ({"gradient_accumulation_steps": 4}, ["train.grad_accum=1"],
         "gradient_accumulation_steps=4 contradicts train.grad_accum=1"),
        ({"gradient_clipping": 0.3}, ["train.grad_clip=1.0"], "gradient_clipping=0.3 contradicts train.grad_clip=1.0"),
        ({"fp16": {"enabled": True}}, ["precision=bf16"], "fp16.enabled=true contradicts precision=bf16"),
        ({"bf16": {"enabled": True}}, ["precision=fp32"], "bf16.enabled=true contradicts precision=fp32"),
        ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, [], "enables both fp16 and bf16"),
        ({"zero_optimization": {"stage": 0}}, [], "harness runs ZeRO stages 1, 2 or 3"),
        ({"zero_optimization": {"stage": 3}}, ["parallel.zero_stage=2"],
         "zero_optimization.stage=3 contradicts parallel.zero_stage=2"),
        ({"scheduler": {"type": "WarmupDecayLR"}}, ["train.lr_schedule=cosine"], 'scheduler.type="WarmupDecayLR" contradicts train.lr_schedule=cosine'),
        ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}}, [],
         "zero_optimization.offload_optimizer.device='nvme': harness offloads to host memory only"),
        ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}, ["parallel.offload=none"],
         'zero_optimization.offload_param={"device": "cpu"} contradicts parallel.offload=none'),
        ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, ["parallel.backend=deepspeed"],
         "parallel.offload=params needs partitioned parameters, and ZeRO-2 keeps them whole"),
        ({"optimizer": {"type": "SGD"}}, [], "harness trains with AdamW"),
        ({"scheduler": {"type": "OneCycle"}}, [], "scheduler.type='OneCycle' has no harness equivalent"),
        ({"gradient_clipping": "lots"}, [], 'gradient_clipping="lots" is not a number'),
        ({"data_types": {"grad_accum_dtype": "bf16"}}, ["precision=bf16"],
         "data_types.grad_accum_dtype='bf16': harness accumulates gradients in fp32"),
        ({"data_types": {"param_dtype": "fp16"}}, ["precision=bf16"],
         "data_types.param_dtype='fp16' contradicts precision=bf16"),
        ({"data_types": {"buffer_dtype": "bf16"}}, [], "data_types.buffer_dtype='bf16': harness keeps buffers"),
        ({"data_types": {"master_dtype": "fp32"}}, [], "data_types.master_dtype is not a DeepSpeed data type"),
    ],
)
def test_contradictions_and_unsupported_settings_are_one_line_errors(tmp_path, data, overrides, message):
    with pytest.raises(ConfigError) as err:
        _with_json(tmp_path, data, *overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_train_batch_size_is_checked_against_the_world_size(tmp_path):
    cfg = _with_json(tmp_path, {"train_batch_size": 4}, "train.micro_batch_size=2")
    validate_for_world(cfg, 2)  # 2 x 1 x 2
    with pytest.raises(ConfigError, match=r"train_batch_size=4 contradicts .* = 2 x 1 x 4 = 8"):
        validate_for_world(cfg, 4)


def test_bad_json_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(TINY, ["parallel.deepspeed_config=/nope.json"])
    bad = tmp_path / "bad.json"
    bad.write_text("{ 'single quotes': 1 }")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_config(TINY, [f"parallel.deepspeed_config={bad}"])


@pytest.mark.parametrize(
    "data, overrides, precision",
    [
        ({"fp16": {"enabled": False}}, [], "fp32"),  # what DeepSpeed itself would run
        ({"fp16": {"enabled": False}}, ["precision=bf16"], "bf16"),  # bf16 is not contradicted
        ({"fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"}}, ["precision=fp16"], "fp16"),
    ],
)
def test_precision_resolution(tmp_path, data, overrides, precision):
    assert _with_json(tmp_path, data, *overrides).precision == precision


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_deepspeed_accumulates_in_fp32_and_checks_bf16_overflow_explicitly(tmp_path, precision):
    data_types = {"grad_accum_dtype": "auto", "param_dtype": "auto", "keep_in_fp32_modules": ["norm"]}
    cfg = _with_json(tmp_path, {"data_types": data_types}, f"precision={precision}")
    ds = runtime_config(cfg, 2, 32)
    assert ds["data_types"] == {"grad_accum_dtype": "fp32", "keep_in_fp32_modules": ["norm"]}
    assert ds["communication_data_type"] == "fp32"
    if precision == "bf16":
        assert ds["bf16"] == {"enabled": True, "check_grad_overflow": True}


def test_data_types_that_say_what_harness_does_are_accepted(tmp_path):
    cfg = _with_json(tmp_path, {"data_types": {"grad_accum_dtype": "fp32", "param_dtype": "bf16"}}, "precision=bf16")
    assert runtime_config(cfg, 2, 32)["data_types"] == {"grad_accum_dtype": "fp32", "param_dtype": "bf16"}


@pytest.mark.parametrize("found, ok", [("0.19.8", True), ("0.19.12", False), ("0.19.7", False), ("0.20.0", False)])
def test_deepspeed_outside_the_tested_releases_is_one_line(found, ok):
    from harness.errors import HarnessError
    from harness.parallel.deepspeed.compat import check_deepspeed_version

    if ok:
        check_deepspeed_version(found)
        return
    with pytest.raises(HarnessError, match=rf"DeepSpeed {found} is installed.*pip install 'deepspeed==0.19.8'"):
        check_deepspeed_version(found)


@pytest.mark.parametrize(
    "json_name, stage, offload, sections",
    [
        ("zero2-offload-hf.json", 2, "optimizer", {"offload_optimizer"}),
        ("zero3-offload-hf.json", 3, "params", {"offload_optimizer", "offload_param"}),
    ],
)
@pytest.mark.parametrize("on_gpu", [False, True])
def test_transformers_offload_templates_are_adopted(json_name, stage, offload, sections, on_gpu):
    cfg = load_config(ROOT / "configs" / json_name.replace("-hf.json", ".yaml").replace("zero", "tiny-zero"))
    assert cfg.parallel.deepspeed_config == f"configs/deepspeed/{json_name}"
    assert (cfg.parallel.zero_stage, cfg.parallel.offload) == (stage, offload)
    zero = runtime_config(cfg, 2, 32, pin_memory=on_gpu)["zero_optimization"]
    assert {k for k in zero if k.startswith("offload")} == sections
    for key in sections:
        # The JSON asks for pinned buffers; only a GPU run can have them.
        assert zero[key] == {"device": "cpu", "pin_memory": on_gpu}


@pytest.mark.parametrize("offload", ["none", "optimizer", "params"])
def test_parallel_offload_decides_the_sections_deepspeed_gets(tmp_path, offload):
    # "auto" device: the JSON leaves offload to harness and keeps its other settings.
    data = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "auto", "buffer_count": 8}}}
    cfg = _with_json(tmp_path, data, f"parallel.offload={offload}")
    zero = runtime_config(cfg, 2, 32)["zero_optimization"]
    assert ("offload_optimizer" in zero) == (offload != "none")
    assert ("offload_param" in zero) == (offload == "params")
    if offload != "none":
        assert zero["offload_optimizer"] == {"device": "cpu", "buffer_count": 8, "pin_memory": False}


def test_legacy_cpu_offload_flag_means_optimizer_offload(tmp_path):
    cfg = _with_json(tmp_path, {"zero_optimization": {"stage": 2, "cpu_offload": True}})
    assert cfg.parallel.offload == "optimizer"
    zero = runtime_config(cfg, 2, 32)["zero_optimization"]
    assert "cpu_offload" not in zero and zero["offload_optimizer"]["device"] == "cpu"
