"""accelerate users: harness under `accelerate launch`, and accelerate config files mapped onto the
harness config (FSDP and DeepSpeed), with one-line errors for what does not map."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness.config import load_config
from harness.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.spawns
def test_runs_under_accelerate_launch_with_its_fsdp_config(tmp_path):
    result = subprocess.run(
        [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "harness", "train",
         "configs/tiny-accelerate-fsdp.yaml", f"run.dir={tmp_path}", "train.steps=3", "log.progress=off"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fsdp2 over 2 rank(s), compute bf16" in result.stdout
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


@pytest.mark.spawns
def test_from_accelerate_config_flag_selects_deepspeed_zero2_fp16(tmp_path):
    result = subprocess.run(
        ["launch/local.sh", "2", "configs/tiny-accelerate-fsdp.yaml", "--from-accelerate-config",
         "configs/accelerate/deepspeed-zero2.yaml", f"run.dir={tmp_path}", "train.steps=2", "log.progress=off"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "deepspeed ZeRO-2 over 2 rank(s), compute fp16" in result.stdout
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["parallel"]["accelerate_config"] == "configs/accelerate/deepspeed-zero2.yaml"


def _with(tmp_path, accelerate: dict, *overrides: str):
    path = tmp_path / "accelerate.yaml"
    path.write_text(yaml.safe_dump(accelerate))
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  config:\n    model_type: gpt2\n")
    return load_config(base, [f"parallel.accelerate_config={path}", *overrides])


def test_mapping(tmp_path):
    fsdp = _with(tmp_path, {"distributed_type": "FSDP", "mixed_precision": "fp16",
                            "fsdp_config": {"fsdp_sharding_strategy": "SHARD_GRAD_OP",
                                            "fsdp_activation_checkpointing": True}})
    assert (fsdp.parallel.backend, fsdp.precision, fsdp.parallel.reshard_after_forward) == ("fsdp2", "fp16", False)
    assert fsdp.model.gradient_checkpointing is True
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"fp16": {"enabled": "auto", "initial_scale_power": 10}}))
    ds = _with(tmp_path, {"distributed_type": "DEEPSPEED", "mixed_precision": "fp16",
                          "deepspeed_config": {"deepspeed_config_file": "ds.json", "zero3_init_flag": True}})
    assert ds.parallel.backend == "deepspeed" and ds.parallel.deepspeed_config == str(ds_json)
    assert ds.scaler.init_scale == 1024.0  # the JSON went through the DeepSpeed mapping too
    hybrid = _with(tmp_path, {"distributed_type": "FSDP", "num_machines": 4,
                              "fsdp_config": {"fsdp_sharding_strategy": "HYBRID_SHARD_ZERO2"}})
    assert (hybrid.parallel.replicate, hybrid.parallel.reshard_after_forward) == (4, False)  # HSDP, one node per group
    single = _with(tmp_path, {"distributed_type": "NO", "mixed_precision": "no"})
    assert single.precision == "fp32" and single.parallel.backend == "fsdp2"


@pytest.mark.parametrize(
    "accelerate, overrides, message",
    [
        ({"distributed_type": "MULTI_GPU"}, [], "distributed_type=MULTI_GPU is plain DDP"),
        ({"distributed_type": "XLA"}, [], "distributed_type=XLA has no harness equivalent"),
        ({"mixed_precision": "fp8"}, [], "mixed_precision=fp8 is not supported"),
        ({"distributed_type": "FSDP", "fsdp_config": {"fsdp_offload_params": True}}, ["parallel.offload=none"],
         "fsdp_offload_params=true contradicts parallel.offload=none"),
        ({"distributed_type": "FSDP", "fsdp_config": {"fsdp_sharding_strategy": "NO_SHARD"}}, [],
         "NO_SHARD (plain DDP) has no equivalent"),
        ({"distributed_type": "FSDP", "num_machines": 4, "fsdp_config": {"fsdp_sharding_strategy": "HYBRID_SHARD"}},
         ["parallel.replicate=2"], "contradicts parallel.replicate=2"),
        ({"distributed_type": "FSDP", "fsdp_config": {"fsdp_magic": 1}}, [], "fsdp_config.fsdp_magic has no harness"),
        ({"distributed_type": "DEEPSPEED", "deepspeed_config": {"offload_optimizer_device": "nvme"}}, [],
         "offload_optimizer_device=nvme: harness offloads to host memory only"),
        ({"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 0}}, [], "stages 1, 2 or 3"),
        ({"mixed_precision": "bf16"}, ["precision=fp16"], 'mixed_precision="bf16" contradicts precision=fp16'),
    ],
)
def test_what_does_not_map_is_a_one_line_error(tmp_path, accelerate, overrides, message):
    with pytest.raises(ConfigError) as err:
        _with(tmp_path, accelerate, *overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_file_is_a_clean_cli_error():
    result = subprocess.run([sys.executable, "-m", "harness", "train", "configs/tiny.yaml", "--check",
                             "--from-accelerate-config", "nope.yaml"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == ("harness: check: parallel.accelerate_config 'nope.yaml' not found; "
                                     "point it at an `accelerate config` YAML")


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_accelerate_file_maps(path):
    cfg = load_config(ROOT / "configs" / "tiny-accelerate-fsdp.yaml", [f"parallel.accelerate_config={path}"])
    assert cfg.parallel.backend in ("fsdp2", "deepspeed")


@pytest.mark.parametrize(
    "name, backend, stage, offload",
    [
        ("fsdp-offload.yaml", "fsdp2", None, "params"),
        ("deepspeed-zero3-offload.yaml", "deepspeed", 3, "params"),
        ("deepspeed-zero2.yaml", "deepspeed", 2, "none"),
        ("fsdp.yaml", "fsdp2", None, "none"),
    ],
)
def test_accelerate_offload_settings_are_adopted(name, backend, stage, offload):
    cfg = load_config(ROOT / "configs" / "tiny-accelerate-fsdp.yaml", [f"parallel.accelerate_config=configs/accelerate/{name}"])
    assert (cfg.parallel.backend, cfg.parallel.offload) == (backend, offload)
    if stage is not None:
        assert cfg.parallel.zero_stage == stage


def test_accelerate_optimizer_only_offload(tmp_path):
    cfg = _with(tmp_path, {"distributed_type": "DEEPSPEED",
                           "deepspeed_config": {"zero_stage": 2, "offload_optimizer_device": "cpu", "offload_param_device": "none"}})
    assert (cfg.parallel.zero_stage, cfg.parallel.offload) == (2, "optimizer")
