"""An `accelerate config` YAML (FSDP or DeepSpeed) mapped onto the harness config.

`harness train CONFIG.yaml --from-accelerate-config accelerate.yaml` (or
`parallel.accelerate_config=accelerate.yaml`) lets a team keep the accelerate file it already
has. What maps: distributed_type (FSDP -> fsdp2, DEEPSPEED -> deepspeed), mixed_precision, the
FSDP sharding strategy / reshard_after_forward, activation checkpointing and fsdp_offload_params,
the DeepSpeed ZeRO stage, offload devices (cpu), gradient accumulation and clipping, and
deepspeed_config_file (read as a DeepSpeed JSON).
What would change the training semantics and has no harness equivalent (DDP, NVMe offload, hybrid
sharding, fp8) is a one-line error. Launch-only settings (machine_rank, main_process_ip, ...)
belong to the launcher and are ignored, except num_processes: a file written for another machine
(8 processes where the job has 2 ranks) is a one-line error, not a silently different batch.
Pure Python: harness.config.load uses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from harness.config.merge import Merger, integer
from harness.errors import ConfigError

_PRECISION = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}
_BACKEND = {"FSDP": "fsdp2", "DEEPSPEED": "deepspeed"}
_RESHARD = {"FULL_SHARD": True, "1": True, "SHARD_GRAD_OP": False, "2": False,
            "HYBRID_SHARD": True, "4": True, "_HYBRID_SHARD_ZERO2": False, "HYBRID_SHARD_ZERO2": False, "5": False}
# Shard within a node, replicate across nodes: HSDP, parallel.replicate = num_machines.
_HYBRID = {"HYBRID_SHARD", "4", "_HYBRID_SHARD_ZERO2", "HYBRID_SHARD_ZERO2", "5"}
# fsdp_config keys with no effect on what is computed, or that harness decides itself
# (it wraps every block in the model's _no_split_modules, then the root).
_FSDP_IGNORED = {
    "fsdp_auto_wrap_policy", "fsdp_backward_prefetch", "fsdp_forward_prefetch", "fsdp_state_dict_type",
    "fsdp_sync_module_states", "fsdp_use_orig_params", "fsdp_cpu_ram_efficient_loading", "fsdp_version",
    "fsdp_transformer_layer_cls_to_wrap", "fsdp_min_num_params",
}
_DEEPSPEED_IGNORED = {"zero3_init_flag", "zero3_save_16bit_model", "deepspeed_multinode_launcher", "deepspeed_hostfile"}


def read_yaml(path: str) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"parallel.accelerate_config {path!r} not found; point it at an `accelerate config` YAML")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError:
        raise ConfigError(f"parallel.accelerate_config {path!r} is not valid YAML; fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"parallel.accelerate_config {path!r} must hold a mapping")
    return data


def merge_into_config(cfg, explicit: set[str]) -> None:
    path = cfg.parallel.accelerate_config
    data = read_yaml(path)
    m = Merger(cfg, explicit, f"accelerate config {Path(path).name}:", fix="make them agree, or drop one of the two")

    kind = str(data.get("distributed_type", "NO")).upper()
    if kind in _BACKEND:
        m.adopt("distributed_type", kind, "parallel.backend", _BACKEND[kind])
    elif kind in ("MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU"):
        raise ConfigError(
            f"{m.source} distributed_type={kind} is plain DDP (a full model and optimizer copy per rank); "
            "harness shards them: use distributed_type: FSDP or DEEPSPEED"
        )
    elif kind != "NO":
        raise ConfigError(f"{m.source} distributed_type={kind} has no harness equivalent; use FSDP or DEEPSPEED")

    precision = data.get("mixed_precision")
    if precision is not None:
        if str(precision) not in _PRECISION:
            raise ConfigError(f"{m.source} mixed_precision={precision} is not supported; use no, bf16 or fp16")
        m.adopt("mixed_precision", precision, "precision", _PRECISION[str(precision)])

    if kind == "FSDP":
        _merge_fsdp(data.get("fsdp_config") or {}, m, data.get("num_machines", 1))
    if kind == "DEEPSPEED":
        _merge_deepspeed(data.get("deepspeed_config") or {}, m, Path(path))


def _merge_fsdp(fsdp: dict[str, Any], m: Merger, num_machines: Any) -> None:
    unknown = sorted(set(fsdp) - _FSDP_IGNORED - {
        "fsdp_sharding_strategy", "fsdp_reshard_after_forward", "fsdp_offload_params", "fsdp_activation_checkpointing",
    })
    if unknown:
        raise ConfigError(f"{m.source} fsdp_config.{unknown[0]} has no harness equivalent; remove it")
    offload = fsdp.get("fsdp_offload_params")
    if isinstance(offload, bool):
        # FSDP's CPUOffload(offload_params=True) keeps parameters, gradients and the optimizer step on the CPU.
        m.adopt("fsdp_config.fsdp_offload_params", offload, "parallel.offload", "params" if offload else "none")
    for key in ("fsdp_sharding_strategy", "fsdp_reshard_after_forward"):
        value = fsdp.get(key)
        if value is None:
            continue
        reshard = value if isinstance(value, bool) else _RESHARD.get(str(value).upper())
        if reshard is None:
            raise ConfigError(
                f"{m.source} fsdp_config.{key}={value}: harness shards (FULL_SHARD, SHARD_GRAD_OP, HYBRID_SHARD or "
                "HYBRID_SHARD_ZERO2); NO_SHARD (plain DDP) has no equivalent"
            )
        m.adopt(f"fsdp_config.{key}", value, "parallel.reshard_after_forward", reshard)
        if key == "fsdp_sharding_strategy" and str(value).upper() in _HYBRID:
            if not isinstance(num_machines, int) or num_machines < 1:
                raise ConfigError(f"{m.source} num_machines={num_machines!r} must be a positive integer for {value}")
            m.adopt(f"fsdp_config.{key}", value, "parallel.replicate", num_machines)
    checkpointing = fsdp.get("fsdp_activation_checkpointing")
    if isinstance(checkpointing, bool):
        m.adopt("fsdp_config.fsdp_activation_checkpointing", checkpointing, "model.gradient_checkpointing", checkpointing)


def _merge_offload(ds: dict[str, Any], m: Merger) -> None:
    """offload_param_device / offload_optimizer_device: cpu, nvme or none (params implies optimizer)."""
    devices = {key: str(ds.get(key, "none")).lower() for key in ("offload_param_device", "offload_optimizer_device")}
    for key, device in devices.items():
        if device not in ("none", "null", "cpu"):
            raise ConfigError(f"{m.source} deepspeed_config.{key}={ds[key]}: harness offloads to host memory only; use cpu or none")
    if "offload_param_device" not in ds and "offload_optimizer_device" not in ds:
        return
    if devices["offload_param_device"] == "cpu":
        m.adopt("deepspeed_config.offload_param_device", "cpu", "parallel.offload", "params")
    elif devices["offload_optimizer_device"] == "cpu":
        m.adopt("deepspeed_config.offload_optimizer_device", "cpu", "parallel.offload", "optimizer")
    else:
        m.adopt("deepspeed_config.offload_optimizer_device", "none", "parallel.offload", "none")


def _merge_deepspeed(ds: dict[str, Any], m: Merger, accelerate_file: Path) -> None:
    unknown = sorted(set(ds) - _DEEPSPEED_IGNORED - {
        "zero_stage", "gradient_accumulation_steps", "gradient_clipping", "offload_optimizer_device",
        "offload_param_device", "deepspeed_config_file", "offload_optimizer_nvme_path", "offload_param_nvme_path",
    })
    if unknown:
        raise ConfigError(f"{m.source} deepspeed_config.{unknown[0]} has no harness equivalent; remove it")
    _merge_offload(ds, m)
    if "zero_stage" in ds:
        stage = ds["zero_stage"]
        if stage not in (1, 2, 3):
            raise ConfigError(f"{m.source} deepspeed_config.zero_stage={stage}: harness runs ZeRO stages 1, 2 or 3")
        m.adopt("deepspeed_config.zero_stage", stage, "parallel.zero_stage", stage)
    m.number(ds, "gradient_accumulation_steps", "train.grad_accum", integer)
    m.number(ds, "gradient_clipping", "train.grad_clip")
    json_file = ds.get("deepspeed_config_file")
    if json_file:
        # Relative to the accelerate file, as accelerate resolves it from where you launch.
        candidate = Path(json_file)
        if not candidate.is_absolute() and not candidate.exists():
            candidate = accelerate_file.parent / candidate
        m.adopt("deepspeed_config.deepspeed_config_file", json_file, "parallel.deepspeed_config", str(candidate))


def check_world_size(path: str, world_size: int) -> None:
    """The file's num_processes (all machines together, as accelerate counts) must be the job's."""
    data = read_yaml(path)
    wanted = data.get("num_processes")
    if wanted is None or wanted == world_size:
        return
    raise ConfigError(
        f"accelerate config {Path(path).name}: num_processes={wanted} but this job has {world_size} rank(s): the file "
        "was written for another machine; run `accelerate config` here, or set num_processes to the job's rank count"
    )
