"""The run configuration: a tree of typed dataclasses, loaded from YAML, overridden from the CLI.

Precedence is CLI `key.sub=value` > YAML file > the defaults below, applied in `load_config` and
nowhere else. Each field's docstring is also its `--help` text. Everything is validated once, here,
before any rank starts work; a mistake is a `ConfigError` naming the key and what it accepts.

This module imports no torch, so launchers can check a config in a fraction of a second.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import hashlib
import inspect
import json
import os
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from harness.errors import ConfigError

Precision = Literal["fp32", "bf16", "fp16"]
NonFinite = Literal["inf", "-inf", "nan"]


@dataclass
class RunConfig:
    name: str = ""
    """Run name. Default: the config file's name without `.yaml`."""
    dir: str = ""
    """Folder for config.yaml, metrics.jsonl, ranks/ and checkpoints/. Default: runs/<run.name>."""


@dataclass
class SpikeConfig:
    action: Literal["warn", "skip", "rollback"] = "warn"
    """What a loss spike does: warn (a line and `spike: true` on the step's row), skip (the step's update is not applied, decided on the device for all ranks), or rollback (the update is skipped, then the run reloads the last checkpoint before the spike and continues with the spiking batches left out)."""
    factor: float = 3.0
    """A step's loss (mean over ranks) is a spike when it is above factor x the median of the last train.spike.window losses, or not finite on any rank."""
    window: int = 50
    """Steps in the running median; detection starts once that many losses are known."""
    max_rollbacks: int = 3
    """With action=rollback: stop the run (exit 3) at the spike after this many rollbacks."""


@dataclass
class TrainConfig:
    steps: int = 100
    """Number of optimizer steps (skipped steps included)."""
    seed: int = 0
    """Seeds model init and the global data order. Same seed, same run, whatever the world size."""
    micro_batch_size: int = 4
    """Sequences per rank per forward/backward."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step. Global batch = micro_batch_size x grad_accum x world size."""
    seq_len: int = 128
    """Tokens per training sequence."""
    lr: float = 3.0e-4
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    warmup_steps: int = 0
    """Linear warmup from lr/warmup_steps to lr over this many steps."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup: cosine or linear down to min_lr at train.steps, or constant."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, applied to matrices only (not biases or norm weights)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1.0e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm (over all ranks' shards) to this value; 0 disables clipping."""
    loss_chunk_tokens: int = 0
    """Chunked cross-entropy for large vocabularies: the output head computes the fp32 loss this many tokens at a time and recomputes each chunk's logits in backward, so a micro-batch's logits are never held whole (e.g. 4096). 0: off (the plain logits + cross entropy)."""
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    """Loss-spike detection: a loss far above its running median, or a non-finite loss on any rank."""
    compile: bool = False
    """torch.compile each transformer block (torchtitan's recipe; inductor: Triton on GPU, C++ on CPU). The first step pays the compilation (tens of seconds per distinct block)."""


@dataclass
class EvalConfig:
    every: int = 0
    """Evaluate the validation loss every N steps and at the last step; 0 disables evaluation."""
    sequences: int = 64
    """Held-out sequences per evaluation (the same ones every time, whatever the world size)."""


@dataclass
class ParallelConfig:
    backend: Literal["fsdp2", "deepspeed"] = "fsdp2"
    """How parameters, gradients and optimizer state are sharded across ranks: fsdp2 or deepspeed (ZeRO)."""
    zero_stage: Literal[1, 2, 3] = 3
    """DeepSpeed ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters."""
    accelerate_config: Optional[str] = None
    """An `accelerate config` YAML (FSDP or DeepSpeed) whose backend, precision and sharding settings map onto this config."""
    deepspeed_config: Optional[str] = None
    """A DeepSpeed JSON as users write it ("auto" allowed). Its batch, precision, fp16 loss-scale, clipping, ZeRO and AdamW settings map onto this config, on any backend."""
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend: auto picks nccl when CUDA is present, else gloo."""
    offload: Literal["none", "optimizer", "params"] = "none"
    """CPU offload, to fit a larger model: optimizer keeps the fp32 master weights, their gradients and the AdamW state in host memory and steps there (ZeRO-1/2/3; FSDP2 has no finer split and offloads its sharded parameters with them); params also keeps the parameter shards in host memory between uses (ZeRO-3, FSDP2). params implies optimizer."""
    offload_adam: Literal["auto", "deepspeed", "torch"] = "auto"
    """Which AdamW steps offloaded state on DeepSpeed: deepspeed (DeepSpeed's CPU Adam, a C++ op compiled on first use, minutes once), torch (torch's AdamW on the host), auto (deepspeed where its op builds, else torch, said on the console). FSDP2 always uses torch's."""
    reduce_every_micro_batch: bool = False
    """FSDP2 with train.grad_accum > 1: reduce-scatter gradients after every micro-batch (fp32 accumulation in the shards: least memory) instead of once per optimizer step (the default: unsharded fp32 gradients held across micro-batches, 1/grad_accum of the gradient traffic). ZeRO keeps its own rule (ZeRO-1 reduces once per step, ZeRO-2/3 after every micro-batch)."""
    reshard_after_forward: bool = True
    """FSDP2: free each block's gathered parameters after forward (less memory, one more all-gather in backward). The last block and the root always stay gathered: backward needs them at once."""
    prefetch: int = 1
    """FSDP2: gather the next N blocks' parameters while a block computes (forward and backward), explicitly; 0 leaves it to FSDP2's implicit prefetching."""
    zero3_unit: Literal["block", "module"] = "block"
    """DeepSpeed ZeRO-3: what is gathered and released as one piece. block: each transformer block whole, like FSDP2's units (DeepSpeed leaf modules: one hook pair and one fetch per block, and a compiled block is one graph); module: DeepSpeed's default, every module with parameters on its own (a hook pair per linear layer and norm: 1.6x the step time of block where the bookkeeping dominates, bench/RESULTS.md; a compiled block breaks into pieces)."""
    timeout_s: int = 600
    """Collective timeout in seconds before a hung rank fails the job."""
    replicate: int = 1
    """Hierarchical sharding past one node: R replicas of the sharded state, each sharded over world_size / R ranks (one node per shard group is the natural choice: the per-layer all-gathers and reduce-scatters stay on the node's fabric, and only one gradient all-reduce per unit crosses nodes). FSDP2: HSDP on a 2-D (replicate x shard) mesh. DeepSpeed ZeRO-3: hpZ (zero_hpz_partition_size = world_size / R: a secondary copy of the parameters sharded within the group serves backward's all-gathers; gradients and optimizer state stay sharded over all ranks). 1: one flat shard group."""


@dataclass
class ModelConfig:
    pretrained: Optional[str] = None
    """Weights to start from: a local Hugging Face folder, a hub id, or bundled:smollm2-135m."""
    config: dict[str, Any] = field(default_factory=dict)
    """From scratch: kwargs for transformers.AutoConfig.for_model (model_type required). With pretrained: overrides."""
    attn_implementation: str = "sdpa"
    """transformers attention kernel: sdpa, eager, flash_attention_2 ..."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory: the same as activation_checkpointing=full (kept for accelerate/HF configs)."""
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """Per-block activation checkpointing, applied by harness on every backend: full recomputes each block in backward; selective recomputes only what model.selective_ac says."""
    vocab_multiple_of: int = 64
    """From scratch, when model.config sets no vocab_size: the embedding and output rows are the tokenizer's vocabulary rounded up to a multiple of this (GPT-2's 50,257 -> 50,304, as nanoGPT; Megatron uses 128). Unaligned rows push the output matmuls onto slow kernels (29% of a 1B model's step on an H200). The extra rows are never an input or a target. 1 keeps the tokenizer's size; pretrained models keep their own."""
    selective_ac: Union[Literal["op"], int] = "op"
    """With activation_checkpointing=selective: op (every block keeps its matmul and attention outputs and recomputes the cheap pointwise ops, as torchtitan's "op"), or an integer k (every k-th block fully recomputed)."""

    def checkpointing_mode(self) -> str:
        """none | full | selective, with the HF-style gradient_checkpointing flag folded in."""
        return "full" if self.gradient_checkpointing else self.activation_checkpointing


@dataclass
class SourceConfig:
    path: str = ""
    """One corpus of a mixture: anything data.path takes (a local file/folder/glob, bundled:shakespeare, a hub name)."""
    weight: float = 1.0
    """Its share of the training tokens, relative to the other sources' weights."""
    name: str = ""
    """Its name in metrics (tokens_by_source); default: the file or folder name."""
    format: Literal["auto", "text", "json", "parquet", "hub", "tokens"] = "auto"
    """As data.format, for this source."""
    text_field: str = ""
    """As data.text_field, for this source (default: data.text_field)."""

    def display_name(self) -> str:
        if self.name:
            return self.name
        stem = self.path.rstrip("/").split("/")[-1]
        return stem.split(":")[-1].split(".")[0] or self.path


@dataclass
class DataConfig:
    path: str = "bundled:shakespeare"
    """Text source: bundled:shakespeare, a local file/folder/glob (.txt .md .json .jsonl .parquet) or a datasets hub name."""
    format: Literal["auto", "text", "json", "parquet", "hub", "tokens"] = "auto"
    """How to read data.path; auto infers from file extensions, else treats it as a hub name; tokens reads an existing flat token file (.npy, or the raw .bin nanoGPT/Megatron-style preprocessors write) without tokenizing."""
    name: Optional[str] = None
    """Hub dataset config name (load_dataset's second argument)."""
    split: str = "train"
    """Dataset split to read; validation is held out from it (data.val_fraction)."""
    text_field: str = "text"
    """Column holding the text (json/parquet/hub)."""
    tokenizer: str = "bundled:gpt2"
    """Tokenizer for AutoTokenizer: bundled:gpt2, bundled:smollm2-135m, a local folder or a hub id."""
    val_fraction: float = 0.05
    """Fraction of the token stream (its tail) held out for evaluation."""
    cache_dir: str = ""
    """Where tokenized corpora are cached. Default: $HARNESS_CACHE/tokens (HARNESS_CACHE defaults to ~/.cache/harness)."""
    num_proc: int = 0
    """Processes that tokenize while preparing the corpus; 0: the cores this process may use."""
    invalid_utf8: Literal["skip", "fail"] = "skip"
    """Text files with undecodable bytes: skip drops those bytes and warns with a count; fail stops, naming the file."""
    shard_mb: int = 1024
    """Size of each prepared token shard file, in MiB."""
    wait_timeout_s: int = 3600
    """How long a rank waits for another process (or node) preparing the same corpus before giving up."""
    sources: list[SourceConfig] = field(default_factory=list)
    """A weighted mixture of corpora instead of data.path: [{path, weight, name, format, text_field}, ...]; tokens are drawn in proportion to the weights, in an order fixed by train.seed."""
    token_dtype: Optional[Literal["uint16", "uint32"]] = None
    """data.format=tokens with a raw .bin file: the dtype it was written with (default: uint16 when the vocabulary fits, else uint32)."""
    prefetch: bool = True
    """Build the next step's micro-batches in a background thread while a step runs (in page-locked memory on a GPU, so the copies to the device are asynchronous)."""


@dataclass
class ScalerConfig:
    init_scale: float = 65536.0
    """fp16: initial loss scale (DeepSpeed: 2**initial_scale_power)."""
    growth_factor: float = 2.0
    """fp16: multiply the scale by this after growth_interval overflow-free steps."""
    backoff_factor: float = 0.5
    """fp16: multiply the scale by this on an overflow when the hysteresis counter is at 1."""
    growth_interval: int = 1000
    """fp16: overflow-free steps before the scale grows (DeepSpeed: loss_scale_window)."""
    hysteresis: int = 2
    """fp16: overflows tolerated before the scale backs off (DeepSpeed: hysteresis)."""
    consecutive_hysteresis: bool = False
    """fp16: refill the hysteresis counter after every overflow-free step, not only when the scale grows."""
    min_scale: float = 1.0
    """fp16: the scale never goes below this; an overflow that would take it lower aborts the run."""
    dynamic: bool = True
    """fp16: false keeps init_scale fixed (a static loss scale); overflowing steps are still skipped."""
    max_consecutive_skips: int = 20
    """Abort after this many consecutive skipped (non-finite) steps, in every precision."""


@dataclass
class FaultsConfig:
    nonfinite_grad_steps: list[int] = field(default_factory=list)
    """Steps (1-based) at which a non-finite value is written into one rank's gradients. For tests and drills."""
    nonfinite_grad_rank: int = 0
    """The rank whose gradients are corrupted."""
    nonfinite_value: Union[NonFinite, list[NonFinite]] = "inf"
    """The value written: inf, -inf or nan, or a list with one value per step in nonfinite_grad_steps."""
    nonfinite_grad_param: Optional[str] = None
    """Dotted parameter name (as in named_parameters) to corrupt. Default: the first one with a local shard."""
    nonfinite_forward_module: Optional[str] = None
    """Write the value into this module's forward output (dotted name, as in named_modules) instead of a gradient."""
    kill_at_step: int = 0
    """Every rank SIGKILLs itself right after step N (and its checkpoint, if one is due): a crash drill. 0: never."""
    loss_spike_steps: list[int] = field(default_factory=list)
    """Steps whose loss is multiplied by faults.loss_spike_factor on every rank (gradients included): a loss-spike drill."""
    loss_spike_factor: float = 10.0
    """The multiplier of faults.loss_spike_steps."""
    hang_at_step: int = 0
    """Rank faults.hang_rank sleeps inside the forward pass of step N for faults.hang_s seconds: a hang drill for the watchdog. 0: never."""
    hang_rank: int = 0
    """The rank that hangs."""
    hang_s: float = 3600.0
    """How long it sleeps."""


@dataclass
class LogConfig:
    per_rank: bool = False
    """Every rank r also writes ranks/rank-r.jsonl (step, loss_scale, skipped, grad_norm) to check agreement."""
    every: int = 10
    """Read the device every N steps: print a progress line (when stderr is not a terminal), write the rows of the steps since the last read to metrics.jsonl and wandb, and act on stop signals. Between reads the host never waits for the GPU."""
    progress: Literal["auto", "bar", "lines", "off"] = "auto"
    """auto: a progress bar on a terminal, plain lines otherwise."""
    peak_tflops: Optional[float] = None
    """Per-device peak TFLOP/s for MFU on hardware the built-in table does not know. MFU is null without one."""
    wandb: bool = False
    """Track the job in wandb: one run (rank 0), config and every metrics.jsonl field per step."""
    wandb_project: Optional[str] = None
    """wandb project (default: WANDB_PROJECT or wandb's own default)."""
    wandb_entity: Optional[str] = None
    """wandb entity (team or user)."""
    wandb_group: Optional[str] = None
    """wandb group, e.g. to put the fp32/bf16/fp16 runs of a parity check side by side."""
    wandb_name: Optional[str] = None
    """wandb run name. Default: run.name."""
    wandb_tags: list[str] = field(default_factory=list)
    """wandb tags."""
    wandb_mode: Optional[Literal["online", "offline", "disabled"]] = None
    """wandb mode. Default: WANDB_MODE from the environment, else online."""
    wandb_connect_timeout_s: float = 15.0
    """Online mode: how long to try reaching the wandb server before logging offline instead (compute nodes often have no internet); the warning prints the `wandb sync` command."""


@dataclass
class DebugConfig:
    nan_hooks: bool = False
    """Check every module's forward output for inf/nan and name the first one when a step is skipped (slow)."""
    count_syncs: bool = False
    """Add host_syncs (device->host reads) and collectives (count and bytes per torch.distributed op) of each step to its metrics row, to find what stalls a step (slows every op a little)."""
    resources_every: int = 0
    """Every N steps (and at the first step and the end) each rank appends its resident memory, open file descriptors and threads to run.dir/resources/rank-<r>.jsonl, to find leaks in long runs (bench/soak.sh). 0: off."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save a sharded checkpoint every N steps (and at the last step); 0 disables saving."""
    keep_last: int = 3
    """Keep the newest K complete checkpoints; older ones are deleted after each successful save."""
    dir: str = ""
    """Folder of step-<N> checkpoints. Default: <run.dir>/checkpoints."""
    async_save: bool = False
    """Write checkpoints in a background thread while training goes on: a save blocks only to copy this rank's state to CPU memory (one extra copy of its shard of params + optimizer state, held until written). The last save, and saves on a stop signal, are synchronous."""


@dataclass
class ResumeConfig:
    path: str = "none"
    """auto: the newest complete checkpoint in checkpoint.dir (falling back past damaged ones); none; or a step-<N> folder. `resume=auto` is short for resume.path=auto."""
    weights_only: bool = False
    """Load only the model weights and start a new run from step 0 (fresh optimizer, scaler and data order)."""
    allow_new_global_batch: bool = False
    """Allow resuming with a different global batch (micro_batch_size x grad_accum x world size); the data position carries on from the sequences already consumed."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    """Where the run lives."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimization and batch shape."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out loss."""
    precision: Precision = "bf16"
    """Compute dtype: fp32, bf16 or fp16 (fp16 uses dynamic loss scaling). Master weights are always fp32."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Sharding backend and process group."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The causal LM."""
    data: DataConfig = field(default_factory=DataConfig)
    """The text corpus and tokenizer."""
    scaler: ScalerConfig = field(default_factory=ScalerConfig)
    """Loss scaling and the non-finite step guard."""
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    """Fault injection for tests and drills."""
    log: LogConfig = field(default_factory=LogConfig)
    """Console and metrics output."""
    debug: DebugConfig = field(default_factory=DebugConfig)
    """Diagnostics that cost speed."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Sharded checkpoints."""
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    """Where to resume from (resume=auto|none|PATH)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """A short hash of the resolved config, for manifests and cache keys."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> Config:
    """Read `path`, apply `key.sub=value` overrides, build and validate the Config."""
    raw = _read_yaml(Path(path))
    for override in overrides:
        key, value = _parse_override(override)
        _set_dotted(raw, key, value)
    if isinstance(raw.get("resume"), str):
        raw["resume"] = {"path": raw["resume"]}  # resume=auto is short for resume.path=auto
    cfg = _build(Config, raw, prefix="")
    _fill_defaults(cfg, Path(path))
    explicit = set(_leaf_keys(raw))
    if cfg.parallel.accelerate_config:
        from harness.parallel import accelerate_config

        accelerate_config.merge_into_config(cfg, explicit)
    if cfg.parallel.deepspeed_config:
        from harness.parallel import deepspeed_json

        deepspeed_json.merge_into_config(cfg, explicit)
    validate(cfg)
    return cfg


def _leaf_keys(raw: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys a file or the CLI set explicitly (what a DeepSpeed JSON may not contradict)."""
    keys = []
    for key, value in raw.items():
        if isinstance(value, dict) and key != "config":
            keys += _leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found; pass a YAML file such as configs/tiny.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: fix the syntax") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must be a mapping of sections (run:, train:, ...)")
    return raw


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key or key.startswith("-"):
        raise ConfigError(f"override {text!r} is not of the form key.sub=value (e.g. train.steps=20)")
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if parts[0] == "resume":  # resume=X is short for resume.path=X; both forms mix freely
        if isinstance(raw.get("resume"), str):
            raw["resume"] = {"path": raw["resume"]}
        if len(parts) == 1 and isinstance(value, str):
            parts = ["resume", "path"]
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}=... goes inside {'.'.join(parts[: i + 1])}, which is not a section")
        node = child
    node[parts[-1]] = value


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass (the string literal under each field)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of keys, got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f"did you mean {prefix}{close[0]}? " if close else ""
        raise ConfigError(f"unknown config key {prefix}{key}: {hint}valid keys here: {', '.join(names)}")
    values = {}
    for name in names:
        if name not in raw:
            continue
        values[name] = _coerce(hints[name], raw[name], f"{prefix}{name}")
    return cls(**values)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key + ".")
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        alternatives = [a for a in args if a is not type(None)]
        for alternative in alternatives[1:]:
            try:
                return _coerce(alternative, value, key)
            except ConfigError:
                pass
        return _coerce(alternatives[0], value, key)
    if origin is Literal:
        if isinstance(value, bool):
            # YAML 1.1 reads a bare off/on/no/yes as a boolean.
            value = {False: "off", True: "on"}[value] if ({"off", "on"} & set(args)) else value
        if value not in args:
            allowed = ", ".join(str(a) for a in args)
            raise ConfigError(f"{key} must be one of {allowed} (got {_show(value)})")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list such as [1, 2] (got {_show(value)})")
        return [_coerce(args[0], item, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping (got {_show(value)})")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false (got {_show(value)})")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer (got {_show(value)})")
        return value
    if tp is float:
        # YAML 1.1 reads 3e-4 (no dot) as a string; users write it anyway.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number (got {_show(value)})")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string (got {_show(value)})")
        return value
    raise TypeError(f"config field {key} has unsupported type {tp}")


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _fill_defaults(cfg: Config, path: Path) -> None:
    if not cfg.run.name:
        cfg.run.name = path.stem
    if not cfg.run.dir:
        cfg.run.dir = str(Path("runs") / cfg.run.name)
    if not cfg.checkpoint.dir:
        cfg.checkpoint.dir = str(Path(cfg.run.dir) / "checkpoints")


# --------------------------------------------------------------------------------------------
# Validation


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Checks that need more than one field's type. Raises ConfigError naming the key."""
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

    _require(cfg.eval.every >= 0, f"eval.every must be >= 0 (0 disables evaluation; got {cfg.eval.every})")
    _require(cfg.eval.sequences >= 1, f"eval.sequences must be >= 1 (got {cfg.eval.sequences})")

    d = cfg.data
    _require(0 <= d.val_fraction < 1, f"data.val_fraction must be in [0, 1) (got {d.val_fraction})")
    _require(
        cfg.eval.every == 0 or d.val_fraction > 0,
        f"eval.every={cfg.eval.every} needs held-out data: set data.val_fraction > 0 (e.g. 0.05) or eval.every=0",
    )
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
    _require(bool(d.path), "data.path is empty: use bundled:shakespeare, a local file/folder, or a hub dataset name")
    _require(bool(d.tokenizer), "data.tokenizer is empty: use bundled:gpt2, a local folder or a hub id")

    _require(
        cfg.train.loss_chunk_tokens >= 0,
        f"train.loss_chunk_tokens must be >= 0 (0 disables chunked cross-entropy; got {cfg.train.loss_chunk_tokens})",
    )
    _require(cfg.debug.resources_every >= 0, f"debug.resources_every must be >= 0 (got {cfg.debug.resources_every})")
    sp = cfg.train.spike
    _require(sp.factor > 1, f"train.spike.factor must be > 1 (a loss above factor x its running median is a spike; got {sp.factor:g})")
    _require(sp.window >= 1, f"train.spike.window must be >= 1 (got {sp.window})")
    _require(sp.max_rollbacks >= 0, f"train.spike.max_rollbacks must be >= 0 (got {sp.max_rollbacks})")
    fl = cfg.faults
    _require(fl.loss_spike_factor > 0, f"faults.loss_spike_factor must be > 0 (got {fl.loss_spike_factor:g})")
    _require(fl.hang_s > 0 and fl.hang_at_step >= 0, "faults.hang_s must be > 0 and faults.hang_at_step >= 0")
    m = cfg.model
    _require(m.vocab_multiple_of >= 1, f"model.vocab_multiple_of must be >= 1 (1: no padding; got {m.vocab_multiple_of})")
    _require(
        m.pretrained is not None or "model_type" in m.config,
        "model.config.model_type is required when model.pretrained is not set (e.g. model.config.model_type=gpt2)",
    )

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

    f = cfg.faults
    for step in f.nonfinite_grad_steps:
        _require(
            1 <= step <= t.steps,
            f"faults.nonfinite_grad_steps has step {step}, outside 1..train.steps={t.steps}",
        )
    if isinstance(f.nonfinite_value, list):
        _require(
            len(f.nonfinite_value) == len(f.nonfinite_grad_steps),
            f"faults.nonfinite_value has {len(f.nonfinite_value)} values for "
            f"{len(f.nonfinite_grad_steps)} faults.nonfinite_grad_steps; give one value, or one per step",
        )
    _require(0 <= f.kill_at_step <= t.steps, f"faults.kill_at_step must be in 0..train.steps={t.steps} (got {f.kill_at_step})")
    _require(f.nonfinite_grad_rank >= 0, f"faults.nonfinite_grad_rank must be >= 0 (got {f.nonfinite_grad_rank})")

    _require(cfg.log.every >= 1, f"log.every must be >= 1 (got {cfg.log.every})")
    _require(
        cfg.log.peak_tflops is None or cfg.log.peak_tflops > 0,
        f"log.peak_tflops must be > 0 or null (got {cfg.log.peak_tflops})",
    )
    c = cfg.checkpoint
    _require(c.every >= 0, f"checkpoint.every must be >= 0 (0 disables checkpoints; got {c.every})")
    _require(c.keep_last >= 1, f"checkpoint.keep_last must be >= 1 (got {c.keep_last})")
    _require(bool(cfg.resume.path), "resume must be auto, none or a checkpoint folder (got an empty string)")
    _require(cfg.parallel.timeout_s >= 1, f"parallel.timeout_s must be >= 1 (got {cfg.parallel.timeout_s})")
    p = cfg.parallel
    _require(p.replicate >= 1, f"parallel.replicate must be >= 1 (1: one flat shard group; got {p.replicate})")
    _require(
        p.replicate == 1 or p.backend == "fsdp2" or p.zero_stage == 3,
        f"parallel.replicate={p.replicate} needs partitioned parameters (HSDP on FSDP2, hpZ on ZeRO-3); "
        f"ZeRO-{p.zero_stage} has no hierarchical form: use parallel.zero_stage=3, or parallel.replicate=1",
    )
    _require(p.prefetch >= 0, f"parallel.prefetch must be >= 0 (0: FSDP2's implicit prefetching; got {p.prefetch})")
    _require(
        not (p.offload == "params" and p.backend == "deepspeed" and p.zero_stage != 3),
        f"parallel.offload=params needs partitioned parameters, and ZeRO-{p.zero_stage} keeps them whole on every "
        "rank: use parallel.zero_stage=3, or parallel.offload=optimizer",
    )
    m = cfg.model
    _require(m.vocab_multiple_of >= 1, f"model.vocab_multiple_of must be >= 1 (1: no padding; got {m.vocab_multiple_of})")
    _require(
        m.selective_ac == "op" or (isinstance(m.selective_ac, int) and m.selective_ac >= 1),
        f"model.selective_ac must be op or a positive integer k (every k-th block); got {m.selective_ac!r}",
    )
    _require(
        not (m.gradient_checkpointing and m.activation_checkpointing == "selective"),
        "model.gradient_checkpointing=true asks for full activation checkpointing but "
        "model.activation_checkpointing=selective: keep one (gradient_checkpointing is the same as activation_checkpointing=full)",
    )
    _require(
        not (p.reduce_every_micro_batch and p.backend == "deepspeed"),
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
    replicas = cfg.parallel.replicate
    _require(
        world_size % replicas == 0,
        f"parallel.replicate={replicas} does not divide the world size {world_size}: every replica needs the same "
        f"number of ranks (use a divisor of {world_size}, e.g. the number of nodes)",
    )
    _require(
        not (cfg.parallel.backend == "deepspeed" and replicas > 1 and world_size // replicas < 2),
        f"parallel.replicate={replicas} on {world_size} rank(s) leaves one rank per ZeRO-3 group, and hpZ needs at "
        f"least 2: use parallel.replicate <= {world_size // 2}, or parallel.backend=fsdp2 (plain replication)",
    )
    if cfg.parallel.accelerate_config:
        from harness.parallel.accelerate_config import check_world_size

        check_world_size(cfg.parallel.accelerate_config, world_size)
    if cfg.parallel.deepspeed_config:
        from harness.parallel.deepspeed_json import check_hierarchy, check_train_batch_size

        check_train_batch_size(cfg, world_size)
        check_hierarchy(cfg, world_size)


# --------------------------------------------------------------------------------------------
# Output


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def help_text(cls: type = Config, prefix: str = "") -> str:
    """Every key with its type, default and docstring; `harness train --help` prints this."""
    lines = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"\n{key}: {docs.get(f.name, '')}")
            lines.append(help_text(tp, key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {key} = {json.dumps(default)}  [{_type_name(tp)}]")
        lines.append(f"      {docs.get(f.name, '')}")
    return "\n".join(lines)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin is typing.Union:
        names = [_type_name(a) for a in args if a is not type(None)]
        if type(None) in args:
            names.append("null")
        return " or ".join(names)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))
