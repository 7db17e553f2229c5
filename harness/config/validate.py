"""Checks that need more than one field's type, section by section, and the ones that need the
world size. Each raises ConfigError with one line naming the key and what it accepts."""

from __future__ import annotations

from harness.config import accelerate, deepspeed_json
from harness.config.fp8 import validate_fp8
from harness.config.layouts import layout_of
from harness.config.lora import validate_lora
from harness.config.schema import Config, DataConfig
from harness.config.slurm import validate_slurm
from harness.errors import ConfigError


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Every section's checks; raises ConfigError naming the key."""
    for check in (_train, _eval, _data, _lora, _model, _scaler, _faults, _log, _checkpoint, _parallel, _slurm, _fp8):
        check(cfg)


def _train(cfg: Config) -> None:
    t = cfg.train
    _require(t.steps >= 1, f"train.steps must be >= 1 (got {t.steps})")
    _require(t.micro_batch_size >= 1, f"train.micro_batch_size must be >= 1 (got {t.micro_batch_size})")
    _require(t.grad_accum >= 1, f"train.grad_accum must be >= 1 (got {t.grad_accum})")
    _require(t.seq_len >= 2, f"train.seq_len must be >= 2 (got {t.seq_len})")
    # lr=0 is allowed: it runs the whole step path and leaves the weights exactly as they are.
    _require(t.lr >= 0, f"train.lr must be >= 0 (got {t.lr})")
    _require(0 <= t.min_lr <= t.lr, f"train.min_lr must be between 0 and train.lr={t.lr} (got {t.min_lr})")
    # A warmup longer than the run is valid: the LR never reaches its peak (short fine-tunes, smoke runs).
    _require(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0 (got {t.warmup_steps})")
    _require(t.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 disables clipping; got {t.grad_clip})")
    _require(t.weight_decay >= 0, f"train.weight_decay must be >= 0 (got {t.weight_decay})")
    for name in ("beta1", "beta2"):
        beta = getattr(t, name)
        _require(0 <= beta < 1, f"train.{name} must be in [0, 1) (got {beta})")
    _require(t.eps > 0, f"train.eps must be > 0 (got {t.eps})")
    _require(
        t.loss_chunk_tokens >= 0,
        f"train.loss_chunk_tokens must be >= 0 (0 disables chunked cross-entropy; got {t.loss_chunk_tokens})",
    )
    sp = t.spike
    _require(sp.factor > 1, f"train.spike.factor must be > 1 (a loss above factor x its running median is a spike; got {sp.factor:g})")
    _require(sp.window >= 1, f"train.spike.window must be >= 1 (got {sp.window})")
    _require(sp.max_rollbacks >= 0, f"train.spike.max_rollbacks must be >= 0 (got {sp.max_rollbacks})")


def _eval(cfg: Config) -> None:
    for i, prompt in enumerate(cfg.eval.prompts):
        messages = prompt if isinstance(prompt, list) else []
        _require(isinstance(prompt, str) or (messages and all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant", "tool")
            and isinstance(m.get("content"), str) for m in messages)),
            f"eval.prompts[{i}] must be a string or a list of {{role, content}} messages with roles "
            f"system/user/assistant/tool (got {str(prompt)[:60]!r})")
    _require(cfg.eval.max_new_tokens >= 1, f"eval.max_new_tokens must be >= 1 (got {cfg.eval.max_new_tokens})")
    _require(cfg.eval.every >= 0, f"eval.every must be >= 0 (0 disables evaluation; got {cfg.eval.every})")
    _require(cfg.eval.sequences >= 1, f"eval.sequences must be >= 1 (got {cfg.eval.sequences})")
    _require(
        cfg.eval.every == 0 or cfg.data.val_fraction > 0,
        f"eval.every={cfg.eval.every} needs held-out data: set data.val_fraction > 0 (e.g. 0.05) or eval.every=0",
    )


def _data(cfg: Config) -> None:
    d = cfg.data
    _require(0 <= d.val_fraction < 1, f"data.val_fraction must be in [0, 1) (got {d.val_fraction})")
    _require(d.num_proc >= 0, f"data.num_proc must be >= 0 (0: every core available; got {d.num_proc})")
    if d.sources:
        _require(
            d.path == DataConfig.path,
            f"data.sources replaces data.path; remove data.path={d.path!r} (or list it as one of the sources)",
        )
        names = [source.display_name() for source in d.sources]
        for i, source in enumerate(d.sources):
            _require(bool(source.path), f"data.sources[{i}].path is empty; give each source a path")
            _require(source.weight > 0, f"data.sources[{i}].weight must be > 0 (got {source.weight})")
        duplicate = next((n for n in names if names.count(n) > 1), None)
        _require(duplicate is None, f"two data.sources are named {duplicate!r}; give them distinct names (data.sources[i].name)")
    _require(d.shard_mb >= 1, f"data.shard_mb must be >= 1 (got {d.shard_mb})")
    _require(d.wait_timeout_s >= 1, f"data.wait_timeout_s must be >= 1 (got {d.wait_timeout_s})")
    _require(
        d.token_dtype is None or d.format == "tokens",
        f"data.token_dtype={d.token_dtype} only applies to data.format=tokens (got data.format={d.format})",
    )
    if d.format in ("chat", "prompt_completion"):
        _require(not d.sources, f"data.format={d.format} reads one dataset (data.path); data.sources mixes text "
                                "corpora: merge the instruction datasets into one, or drop data.sources")
    _require(not d.chat_template or d.format in ("chat", "prompt_completion"),
             f"data.chat_template applies to data.format=chat (got data.format={d.format})")
    _require(bool(d.path), "data.path is empty: use bundled:shakespeare, a local file/folder, or a hub dataset name")


def _model(cfg: Config) -> None:
    m = cfg.model
    _require(m.vocab_multiple_of >= 1, f"model.vocab_multiple_of must be >= 1 (1: no padding; got {m.vocab_multiple_of})")
    _require(
        m.pretrained is not None or "model_type" in m.config,
        "model.config.model_type is required when model.pretrained is not set (e.g. model.config.model_type=gpt2)",
    )
    if m.pretrained is not None:
        _pretrained_overrides(m.pretrained, m.config)
    _require(
        m.selective_ac == "op" or (isinstance(m.selective_ac, int) and m.selective_ac >= 1),
        f"model.selective_ac must be op or a positive integer k (every k-th block); got {m.selective_ac!r}",
    )
    _require(
        not (m.gradient_checkpointing and m.activation_checkpointing == "selective"),
        "model.gradient_checkpointing=true asks for full activation checkpointing but "
        "model.activation_checkpointing=selective: keep one (gradient_checkpointing is the same as activation_checkpointing=full)",
    )


# model.config keys that change how a pretrained checkpoint runs, not what it is.
RUNTIME_MODEL_KEYS = ("attn_implementation", "rope_scaling", "max_position_embeddings", "use_cache",
                      "output_router_logits", "router_aux_loss_coef", "pad_token_id")


def _pretrained_overrides(pretrained: str, overrides: dict) -> None:
    """With model.pretrained, model.config may tune how the checkpoint runs (attention kernel,
    rope scaling for a longer context, dropout, use_cache...), never its architecture: a changed
    width, depth or vocabulary would load weights into a model they do not belong to."""
    shaping = [key for key in overrides if not (key in RUNTIME_MODEL_KEYS or key.endswith(("dropout", "pdrop")))]
    named = ", ".join(f"model.config.{key}" for key in shaping[:4]) + (" ..." if len(shaping) > 4 else "")
    _require(not shaping, f"{named} would change what model.pretrained {pretrained!r} is (architecture keys); with "
                          f"model.pretrained, model.config takes only keys that change how it runs "
                          f"({', '.join(RUNTIME_MODEL_KEYS)}, *dropout): remove them (model.config={{}} drops the block)")


def _scaler(cfg: Config) -> None:
    s = cfg.scaler
    _require(s.init_scale > 0, f"scaler.init_scale must be > 0 (got {s.init_scale})")
    _require(s.growth_factor >= 1, f"scaler.growth_factor must be >= 1 (got {s.growth_factor})")
    _require(0 < s.backoff_factor < 1, f"scaler.backoff_factor must be in (0, 1) (got {s.backoff_factor})")
    _require(s.growth_interval >= 1, f"scaler.growth_interval must be >= 1 (got {s.growth_interval})")
    _require(s.hysteresis >= 1, f"scaler.hysteresis must be >= 1 (got {s.hysteresis})")
    _require(
        0 < s.min_scale <= s.init_scale,
        f"scaler.min_scale must be in (0, scaler.init_scale={s.init_scale}] (got {s.min_scale})",
    )
    _require(
        s.max_consecutive_skips >= 1, f"scaler.max_consecutive_skips must be >= 1 (got {s.max_consecutive_skips})"
    )


def _faults(cfg: Config) -> None:
    f, steps = cfg.faults, cfg.train.steps
    for step in f.nonfinite_grad_steps:
        _require(1 <= step <= steps, f"faults.nonfinite_grad_steps has step {step}, outside 1..train.steps={steps}")
    if isinstance(f.nonfinite_value, list):
        _require(
            len(f.nonfinite_value) == len(f.nonfinite_grad_steps),
            f"faults.nonfinite_value has {len(f.nonfinite_value)} values for "
            f"{len(f.nonfinite_grad_steps)} faults.nonfinite_grad_steps; give one value, or one per step",
        )
    _require(0 <= f.kill_at_step <= steps, f"faults.kill_at_step must be in 0..train.steps={steps} (got {f.kill_at_step})")
    _require(0 <= f.crash_at_step <= steps, f"faults.crash_at_step must be in 0..train.steps={steps} (got {f.crash_at_step})")
    _require(f.nonfinite_grad_rank >= 0, f"faults.nonfinite_grad_rank must be >= 0 (got {f.nonfinite_grad_rank})")
    _require(f.loss_spike_factor > 0, f"faults.loss_spike_factor must be > 0 (got {f.loss_spike_factor:g})")
    _require(f.hang_s > 0 and f.hang_at_step >= 0, "faults.hang_s must be > 0 and faults.hang_at_step >= 0")


def _log(cfg: Config) -> None:
    _require(cfg.log.every >= 1, f"log.every must be >= 1 (got {cfg.log.every})")
    _require(
        cfg.log.peak_tflops is None or cfg.log.peak_tflops > 0,
        f"log.peak_tflops must be > 0 or null (got {cfg.log.peak_tflops})",
    )
    _require(cfg.debug.resources_every >= 0, f"debug.resources_every must be >= 0 (got {cfg.debug.resources_every})")


def _fp8(cfg: Config) -> None:
    validate_fp8(cfg.fp8, cfg.precision, layout_of(cfg.parallel))


def _lora(cfg: Config) -> None:
    validate_lora(cfg.lora, cfg.model.pretrained, cfg.precision, layout_of(cfg.parallel))


def _slurm(cfg: Config) -> None:
    validate_slurm(cfg.slurm)


def _checkpoint(cfg: Config) -> None:
    c = cfg.checkpoint
    _require(c.every >= 0, f"checkpoint.every must be >= 0 (0: only at the last step; got {c.every})")
    _require(c.keep_last >= 1, f"checkpoint.keep_last must be >= 1 (got {c.keep_last})")
    _require(bool(cfg.resume.path), "resume must be auto, never or a checkpoint folder (got an empty string)")
    continues = cfg.resume.checkpoint is not None and not cfg.resume.weights_only
    _require(not (cfg.run.fresh and continues),
             f"run.fresh=true starts at step 0 but resume={cfg.resume.path} continues that checkpoint's run; drop "
             "one of them (resume.weights_only=true starts afresh from its weights)")


def _parallel(cfg: Config) -> None:
    p, layout = cfg.parallel, layout_of(cfg.parallel)
    _require(p.timeout_s >= 1, f"parallel.timeout_s must be >= 1 (got {p.timeout_s})")
    _require(p.replicate >= 1, f"parallel.replicate must be >= 1 (1: one flat shard group; got {p.replicate})")
    _require(
        p.replicate == 1 or layout.partitions_parameters,
        f"parallel.replicate={p.replicate} needs partitioned parameters (HSDP on FSDP2, hpZ on ZeRO-3); "
        f"ZeRO-{p.zero_stage} has no hierarchical form: use parallel.zero_stage=3, or parallel.replicate=1",
    )
    _require(p.prefetch >= 0, f"parallel.prefetch must be >= 0 (0: FSDP2's implicit prefetching; got {p.prefetch})")
    _require(
        p.offload != "params" or layout.partitions_parameters,
        f"parallel.offload=params needs partitioned parameters, and ZeRO-{p.zero_stage} keeps them whole on every "
        "rank: use parallel.zero_stage=3, or parallel.offload=optimizer",
    )
    _require(
        not p.reduce_every_micro_batch or layout.chooses_reduce_timing,
        "parallel.reduce_every_micro_batch is an FSDP2 switch; ZeRO decides itself (ZeRO-1 reduces once per step, "
        "ZeRO-2/3 after every micro-batch): remove it, or use parallel.backend=fsdp2",
    )


def validate_for_world(cfg: Config, world_size: int) -> None:
    """Checks that depend on the number of ranks the job was started with."""
    rank = cfg.faults.nonfinite_grad_rank
    _require(
        rank < world_size,
        f"faults.nonfinite_grad_rank={rank} but the job has {world_size} rank(s): use 0..{world_size - 1}",
    )
    _require(
        not cfg.faults.hang_at_step or cfg.faults.hang_rank < world_size,
        f"faults.hang_rank={cfg.faults.hang_rank} but the job has {world_size} rank(s): use 0..{world_size - 1}",
    )
    _require(
        not cfg.faults.crash_at_step or cfg.faults.crash_rank < world_size,
        f"faults.crash_rank={cfg.faults.crash_rank} but the job has {world_size} rank(s): use 0..{world_size - 1}",
    )
    replicas = cfg.parallel.replicate
    _require(
        world_size % replicas == 0,
        f"parallel.replicate={replicas} does not divide the world size {world_size}: every replica needs the same "
        f"number of ranks (use a divisor of {world_size}, e.g. the number of nodes)",
    )
    _require(
        replicas == 1 or world_size // replicas >= layout_of(cfg.parallel).min_ranks_per_shard_group,
        f"parallel.replicate={replicas} on {world_size} rank(s) leaves one rank per ZeRO-3 group, and hpZ needs at "
        f"least 2: use parallel.replicate <= {world_size // 2}, or parallel.backend=fsdp2 (plain replication)",
    )
    if cfg.parallel.accelerate_config:
        accelerate.check_world_size(cfg.parallel.accelerate_config, world_size)
    if cfg.parallel.deepspeed_config:
        deepspeed_json.check_train_batch_size(cfg, world_size)
        deepspeed_json.check_hierarchy(cfg, world_size)
