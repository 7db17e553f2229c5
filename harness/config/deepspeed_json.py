"""Users' DeepSpeed JSON, read the way HF Trainer reads it, and the JSON harness hands DeepSpeed.

`merge_into_config`: every DeepSpeed setting that has a harness equivalent (batch sizes, precision,
the fp16 loss-scale knobs, gradient clipping, ZeRO stage, AdamW and warmup/decay schedule) lands
in the harness config, so FSDP2 and ZeRO runs of the same config mean the same thing. "auto" takes
the harness value. A concrete value is adopted unless the harness config set that key itself and
disagrees, which is an error naming both values.

`runtime_config`: what deepspeed.initialize receives. Loss scaling, clipping, the optimizer and the
learning rate belong to harness (grad_scale.py, optim.py), so DeepSpeed gets a static loss scale
that harness overrides every step, no clipping and a client optimizer; the user's other settings
(ZeRO bucket sizes, overlap_comm, ...) pass through, with "auto" sizes filled as HF Trainer does.

Pure Python on purpose: harness.config imports no torch.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

from harness.config.fp8 import compute_precision
from harness.config.merge import AUTO, Merger, integer
from harness.config.merge import get_dotted as _get
from harness.errors import ConfigError

_OWNED_BY_HARNESS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "fp16",
    "bf16",
    "bfloat16",
    "optimizer",
    "scheduler",
)
_SCHEDULES = {"warmuplr": "constant", "warmupdecaylr": "linear", "warmupcosinelr": "cosine"}
# The JSON sections that set parallel.offload, and what each means there (params implies optimizer).
_OFFLOAD_SECTIONS = (("offload_param", "params"), ("offload_optimizer", "optimizer"))


def read_json(path: str) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"parallel.deepspeed_config {path!r} not found; point it at a DeepSpeed JSON file")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"parallel.deepspeed_config {path!r} is not valid JSON (line {exc.lineno}: {exc.msg}); fix the file"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"parallel.deepspeed_config {path!r} must hold a JSON object")
    return data


def merge_into_config(cfg, explicit: set[str]) -> None:
    """Fold the JSON at cfg.parallel.deepspeed_config into cfg (see the module docstring)."""
    path = cfg.parallel.deepspeed_config
    data = read_json(path)
    m = Merger(cfg, explicit, f"deepspeed_config {Path(path).name}:", fix='make them equal or write "auto" in the JSON')

    m.number(data, "train_micro_batch_size_per_gpu", "train.micro_batch_size", integer)
    m.number(data, "gradient_accumulation_steps", "train.grad_accum", integer)
    m.number(data, "gradient_clipping", "train.grad_clip")
    _merge_precision(data, m)
    _merge_fp16_scaler(data, m)
    _merge_zero(data, m)
    _merge_optimizer(data, m)
    _merge_scheduler(data, m)
    check_data_types(data, m.source, m.harness_value("precision"))


def _enabled(data: dict[str, Any], section: str) -> Optional[bool]:
    value = _get(data, f"{section}.enabled")
    if value is None or value == AUTO:
        return None
    if not isinstance(value, bool):
        raise ConfigError(f'deepspeed_config {section}.enabled must be true, false or "auto" (got {value!r})')
    return value


def _merge_precision(data: dict[str, Any], m: Merger) -> None:
    fp16 = _enabled(data, "fp16")
    bf16 = _enabled(data, "bf16")
    if bf16 is None:
        bf16 = _enabled(data, "bfloat16")
    if fp16 and bf16:
        raise ConfigError(f'{m.source} enables both fp16 and bf16; enable one (or write "auto")')
    if fp16:
        m.adopt("fp16.enabled", True, "precision", "fp16")
        return
    if bf16:
        if m.harness_value("precision") == "fp8":  # bf16 with FP8 matmuls: DeepSpeed's bf16 is right
            return
        m.adopt("bf16.enabled", True, "precision", "bf16")
        return
    disabled = [name for name, flag in (("fp16", fp16), ("bf16", bf16)) if flag is False]
    if not disabled:
        return
    # What DeepSpeed itself would run with these sections is fp32; a harness precision the JSON
    # does not mention (bf16 beside "fp16": false) is no contradiction and stands.
    current = m.harness_value("precision")
    if "precision" in m.explicit and current not in disabled:
        return
    m.adopt(f"{disabled[0]}.enabled", False, "precision", "fp32")


def _merge_fp16_scaler(data: dict[str, Any], m: Merger) -> None:
    power = _get(data, "fp16.initial_scale_power")
    if power is not None and power != AUTO:
        m.adopt("fp16.initial_scale_power", power, "scaler.init_scale", float(2.0 ** integer(power)))
    m.number(data, "fp16.loss_scale_window", "scaler.growth_interval", integer)
    m.number(data, "fp16.hysteresis", "scaler.hysteresis", integer)
    m.number(data, "fp16.min_loss_scale", "scaler.min_scale")
    consecutive = _get(data, "fp16.consecutive_hysteresis")
    if isinstance(consecutive, bool):
        m.adopt("fp16.consecutive_hysteresis", consecutive, "scaler.consecutive_hysteresis", consecutive)
    static = _get(data, "fp16.loss_scale")
    if static is not None and static != AUTO:
        if float(static) > 0:
            # DeepSpeed: loss_scale > 0 is a static scale of that value.
            m.adopt("fp16.loss_scale", static, "scaler.dynamic", False)
            m.adopt("fp16.loss_scale", static, "scaler.init_scale", float(static))
        else:
            m.adopt("fp16.loss_scale", static, "scaler.dynamic", True)


def _merge_zero(data: dict[str, Any], m: Merger) -> None:
    zero = data.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise ConfigError(f"{m.source} zero_optimization must be an object")
    stage = zero.get("stage")
    if stage is not None and stage != AUTO:
        if stage not in (1, 2, 3):
            raise ConfigError(
                f"{m.source} zero_optimization.stage={stage!r}: harness runs ZeRO stages 1, 2 or 3 "
                "(stage 0 is plain data parallel: use parallel.backend=fsdp2)"
            )
        m.adopt("zero_optimization.stage", stage, "parallel.zero_stage", stage)
    offload = offload_from_json(zero, m.source)
    if offload is not None:
        their_key, their_value, value = offload
        m.adopt(f"zero_optimization.{their_key}", their_value, "parallel.offload", value)


def offload_from_json(zero: dict[str, Any], source: str) -> Optional[tuple[str, Any, str]]:
    """(the JSON key, its value, the parallel.offload it means) for a zero_optimization section,
    or None when it says nothing about offload."""
    if zero.get("cpu_offload") is True:  # the pre-0.3.16 spelling of offload_optimizer: cpu
        return "cpu_offload", True, "optimizer"
    said = None
    for key, value in _OFFLOAD_SECTIONS:
        section = zero.get(key)
        if section is None or section == AUTO:
            continue
        device = section.get("device", "none") if isinstance(section, dict) else section
        if device == AUTO:
            continue
        if device in ("none", None):
            said = said or (key, section, "none")
            continue
        if device != "cpu":
            raise ConfigError(
                f"{source} zero_optimization.{key}.device={device!r}: harness offloads to host memory only; "
                'use "cpu" or "none"'
            )
        return key, section, value
    return said


_COMPUTE_DTYPE_NAMES = {"bf16": ("bf16", "bfloat16"), "fp16": ("fp16", "float16", "half"), "fp32": ("fp32", "float32", "float")}


def check_data_types(data: dict[str, Any], source: str, precision: str) -> None:
    """A user's `data_types` section runs as written or is refused here, in one line.

    harness accumulates and reduces gradients in fp32 on every backend (FSDP2 does so by design),
    so that ZeRO and FSDP2 compute the same thing; parameters run in the precision's dtype and
    buffers keep their loaded dtype, as under FSDP2.
    """
    section = data.get("data_types")
    if section is None:
        return
    if not isinstance(section, dict):
        raise ConfigError(f"{source} data_types must be an object")
    for key, value in section.items():
        if value in (AUTO, None) or key == "keep_in_fp32_modules":
            continue  # keep_in_fp32_modules only keeps more buffers in fp32: DeepSpeed applies it as written
        if key == "grad_accum_dtype":
            if value not in _COMPUTE_DTYPE_NAMES["fp32"]:
                raise ConfigError(
                    f"{source} data_types.grad_accum_dtype={value!r}: harness accumulates gradients in fp32 on every "
                    'backend, as FSDP2 does; write "fp32" or remove it'
                )
        elif key == "param_dtype":
            if value not in _COMPUTE_DTYPE_NAMES[precision]:
                raise ConfigError(
                    f"{source} data_types.param_dtype={value!r} contradicts precision={precision}; "
                    'remove it or write "auto"'
                )
        elif key == "buffer_dtype":
            raise ConfigError(
                f"{source} data_types.buffer_dtype={value!r}: harness keeps buffers (e.g. rotary frequencies) in their "
                'loaded dtype on every backend; remove it or write "auto"'
            )
        else:
            raise ConfigError(f"{source} data_types.{key} is not a DeepSpeed data type harness knows; remove it")


def _merge_optimizer(data: dict[str, Any], m: Merger) -> None:
    optimizer = data.get("optimizer")
    if not optimizer:
        return
    kind = str(optimizer.get("type", "")).lower()
    if kind not in ("adam", "adamw"):
        raise ConfigError(f"{m.source} optimizer.type={optimizer.get('type')!r}: harness trains with AdamW; use Adam/AdamW")
    params = optimizer.get("params") or {}
    m.number(params, "lr", "train.lr")
    m.number(params, "eps", "train.eps")
    m.number(params, "weight_decay", "train.weight_decay")
    betas = params.get("betas")
    if isinstance(betas, list) and len(betas) == 2:
        for i, key in enumerate(("train.beta1", "train.beta2")):
            if betas[i] != AUTO:
                m.adopt(f"optimizer.params.betas[{i}]", betas[i], key, float(betas[i]))


def _merge_scheduler(data: dict[str, Any], m: Merger) -> None:
    scheduler = data.get("scheduler")
    if not scheduler:
        return
    kind = str(scheduler.get("type", ""))
    if kind.lower() not in _SCHEDULES:
        supported = ", ".join(("WarmupLR", "WarmupDecayLR", "WarmupCosineLR"))
        raise ConfigError(f"{m.source} scheduler.type={kind!r} has no harness equivalent; use one of {supported}")
    m.adopt("scheduler.type", kind, "train.lr_schedule", _SCHEDULES[kind.lower()])
    params = scheduler.get("params") or {}
    m.number(params, "warmup_num_steps", "train.warmup_steps", integer)
    m.number(params, "warmup_max_lr", "train.lr")
    m.number(params, "total_num_steps", "train.steps", integer)
    ratio = params.get("cos_min_ratio")
    if ratio is not None and ratio != AUTO:
        m.adopt("scheduler.params.cos_min_ratio", ratio, "train.min_lr", float(ratio) * m.harness_value("train.lr"))


def check_train_batch_size(cfg, world_size: int) -> None:
    """train_batch_size needs the world size, so it is checked when the job starts."""
    if not cfg.parallel.deepspeed_config:
        return
    value = read_json(cfg.parallel.deepspeed_config).get("train_batch_size")
    if value is None or value == AUTO:
        return
    t = cfg.train
    ours = t.micro_batch_size * t.grad_accum * world_size
    if value != ours:
        raise ConfigError(
            f"deepspeed_config train_batch_size={value} contradicts train.micro_batch_size x train.grad_accum x "
            f"world size = {t.micro_batch_size} x {t.grad_accum} x {world_size} = {ours}; fix one, or write \"auto\""
        )


def check_hierarchy(cfg, world_size: int) -> None:
    """A JSON's hpZ / MiCS settings must say what parallel.replicate says (which decides)."""
    zero = read_json(cfg.parallel.deepspeed_config).get("zero_optimization") or {}
    if not isinstance(zero, dict):
        return
    if zero.get("mics_shard_size", -1) not in (-1, AUTO, None):
        raise ConfigError(
            f"{cfg.parallel.deepspeed_config}: zero_optimization.mics_shard_size: harness shards hierarchically "
            "with hpZ; remove it and set parallel.replicate=<number of shard groups> (e.g. the number of nodes)"
        )
    theirs = zero.get("zero_hpz_partition_size")
    if theirs in (None, AUTO, 0, 1) and cfg.parallel.replicate == 1:
        return
    ours = world_size // cfg.parallel.replicate if cfg.parallel.replicate > 1 else 1
    if theirs not in (None, AUTO) and theirs != ours:
        replicas = world_size // theirs if isinstance(theirs, int) and theirs > 0 and world_size % theirs == 0 else None
        fix = f"set parallel.replicate={replicas}" if replicas else f"use a divisor of the world size {world_size}"
        raise ConfigError(
            f"{cfg.parallel.deepspeed_config}: zero_optimization.zero_hpz_partition_size={theirs!r} but "
            f"parallel.replicate={cfg.parallel.replicate} on {world_size} ranks means {ours}: {fix}, or remove the key"
        )


def runtime_config(cfg, world_size: int, hidden_size: int, pin_memory: bool = False) -> dict[str, Any]:
    """The dict passed to deepspeed.initialize for this run. pin_memory: offload buffers may be
    page-locked (a GPU run; the JSON can still say false)."""
    user = read_json(cfg.parallel.deepspeed_config) if cfg.parallel.deepspeed_config else {}
    ds = {k: copy.deepcopy(v) for k, v in user.items() if k not in _OWNED_BY_HARNESS}
    t = cfg.train
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = t.grad_accum
    ds["train_batch_size"] = t.micro_batch_size * t.grad_accum * world_size
    # harness clips (grad_scale.py) and folds the clip into the loss scale it gives DeepSpeed.
    ds["gradient_clipping"] = 0.0
    if cfg.precision == "fp16":
        # A static scale that harness overrides before every backward and step.
        ds["fp16"] = {"enabled": True, "loss_scale": 1.0}
    elif compute_precision(cfg.precision) == "bf16":
        # Explicit: older DeepSpeed builds applied a non-finite bf16 update (the default changed in
        # PR #8035). harness's own check decides, and DeepSpeed's must agree (deepspeed.py).
        ds["bf16"] = {"enabled": True, "check_grad_overflow": True}
    # Accumulate across micro-batches and reduce in fp32, as FSDP2 does: DeepSpeed's default
    # accumulates in the compute dtype. check_data_types refused anything else the user wrote.
    data_types = dict(ds.get("data_types") or {})
    data_types["grad_accum_dtype"] = "fp32"
    data_types = {k: v for k, v in data_types.items() if v != AUTO}
    ds["data_types"] = data_types
    ds.setdefault("communication_data_type", "fp32")
    ds.setdefault("steps_per_print", 2**31 - 1)
    ds.setdefault("wall_clock_breakdown", False)
    zero = dict(ds.get("zero_optimization") or {})
    zero["stage"] = cfg.parallel.zero_stage
    _set_offload(zero, cfg.parallel.offload, pin_memory)
    if cfg.parallel.replicate > 1:
        # hpZ: backward gathers parameters from a secondary copy sharded within the group.
        zero["zero_hpz_partition_size"] = world_size // cfg.parallel.replicate
    _fill_auto_sizes(zero, hidden_size)
    ds["zero_optimization"] = zero
    _drop_remaining_auto(ds)
    return ds


def _set_offload(zero: dict[str, Any], offload: str, pin_memory: bool) -> None:
    """parallel.offload decides; the user's other settings in the sections (buffer sizes, ratio)
    stay. harness offloads to host memory (device "cpu")."""
    zero.pop("cpu_offload", None)
    wanted = {"offload_optimizer": offload in ("optimizer", "params"), "offload_param": offload == "params"}
    for key, on in wanted.items():
        section = zero.get(key)
        section = dict(section) if isinstance(section, dict) else {}
        if not on:
            zero.pop(key, None)
            continue
        section["device"] = "cpu"
        # Pinned (page-locked) buffers only help GPU copies, and need a GPU to allocate.
        section["pin_memory"] = pin_memory and section.get("pin_memory") is not False
        zero[key] = section


def _fill_auto_sizes(zero: dict[str, Any], hidden: int) -> None:
    # The same fills as HF Trainer's HfTrainerDeepSpeedConfig.
    fills = {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    for key, value in fills.items():
        if zero.get(key) == AUTO:
            zero[key] = value


def _drop_remaining_auto(node: dict[str, Any]) -> None:
    """Any "auto" harness has no value for falls back to DeepSpeed's default."""
    for key in list(node):
        if node[key] == AUTO:
            del node[key]
        elif isinstance(node[key], dict):
            _drop_remaining_auto(node[key])
