"""The run configuration: a tree of typed dataclasses, one per section of a config file.

Each field's docstring is also its `--help` text (harness.config.load.help_text). Loading and
overrides live in load.py, the checks that span fields in validate.py.

This module imports no torch, so launchers can check a config in a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from harness.config.fp8 import FP8Config
from harness.config.lora import LoraConfig
from harness.config.slurm import SlurmConfig

Precision = Literal["fp32", "bf16", "fp16", "fp8"]
NonFinite = Literal["inf", "-inf", "nan"]


@dataclass
class RunConfig:
    name: str = ""
    """Run name. Default: the config file's name without `.yaml`."""
    dir: str = ""
    """Folder for config.yaml, metrics.jsonl, ranks/ and checkpoints/. Default: runs/<run.name>."""
    fresh: bool = False
    """Start afresh at step 0 even though run.dir holds a run: the earlier run (checkpoints, metrics, summary) is moved aside into run.dir/previous-<n>/, never deleted. Without it a rerun continues (resume=auto)."""


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
    """Held-out sequences per evaluation (the same ones every time, whatever the world size); instruction data: held-out examples."""
    prompts: list[Union[str, list[dict[str, Any]]]] = field(default_factory=list)
    """Prompts the model completes greedily at every evaluation (printed, appended to run.dir/completions.jsonl, logged to wandb as a table): strings (one user turn through the chat template, raw text without one) or lists of {role, content} messages. They belong to the config's data: replace them when you point data.path at your own. eval.every=0 turns them off with the loss."""
    max_new_tokens: int = 64
    """Tokens generated per eval.prompts completion at most (it stops earlier at an end-of-turn token)."""


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
    """From scratch: kwargs for transformers.AutoConfig.for_model (model_type required). With pretrained: only keys that change how the checkpoint runs (attn_implementation, rope_scaling, max_position_embeddings, use_cache, *dropout, ...); an architecture key is refused."""
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
    format: Literal["auto", "text", "json", "parquet", "hub", "tokens", "chat", "prompt_completion"] = "auto"
    """How to read data.path; auto infers from file extensions, else treats it as a hub name; tokens reads an existing flat token file (.npy, or the raw .bin nanoGPT/Megatron-style preprocessors write) without tokenizing. Instruction data (JSONL, JSON, parquet or a hub dataset): chat reads rows of `messages` ({role, content}; roles system/user/assistant/tool) rendered by the tokenizer's chat template; prompt_completion reads `prompt` and `completion`."""
    name: Optional[str] = None
    """Hub dataset config name (load_dataset's second argument)."""
    split: str = "train"
    """Dataset split to read; validation is held out from it (data.val_fraction)."""
    text_field: str = "text"
    """Column holding the text (json/parquet/hub)."""
    messages_field: str = "messages"
    """data.format=chat: the column holding each row's list of {role, content} messages."""
    prompt_field: str = "prompt"
    """data.format=prompt_completion: the column holding the prompt (a string, or a list of messages)."""
    completion_field: str = "completion"
    """data.format=prompt_completion: the column holding the completion (a string, or a list of messages)."""
    chat_template: str = ""
    """A Jinja chat template file, for a tokenizer without one or to replace its own (data.format=chat, and prompt_completion)."""
    prompt_template: Literal["chat", "none"] = "chat"
    """data.format=prompt_completion with string prompts: chat renders the prompt as one user turn and the completion as the assistant turn with the tokenizer's chat template (as the model is prompted at inference), when it has one; none joins them as plain text (prompt, completion, EOS)."""
    train_on: Literal["assistant", "all"] = "assistant"
    """Instruction data: which tokens carry loss. assistant: only the assistant turns (with their end-of-turn token), or only the completion; every other token is context. all: every token."""
    pack: bool = True
    """Instruction data: pack whole examples into each train.seq_len row (position ids restart and attention stays within each example); false: one example per row, padded."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """Instruction data: an example longer than train.seq_len is cut to it (truncate) or left out (drop); preparation reports how many."""
    tokenizer: str = ""
    """Tokenizer for AutoTokenizer: bundled:gpt2, bundled:smollm2-135m, a local folder or a hub id. Default: the model's own (model.pretrained), else bundled:gpt2."""
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
    crash_at_step: int = 0
    """Rank faults.crash_rank raises an unexpected error in the forward pass of step N: a crash drill (the launcher names the rank and its error). 0: never."""
    crash_rank: int = 0
    """The rank that crashes."""
    loss_spike_steps: list[int] = field(default_factory=list)
    """Steps whose loss is multiplied by faults.loss_spike_factor on every rank (gradients included): a loss-spike drill."""
    loss_spike_factor: float = 10.0
    """The multiplier of faults.loss_spike_steps."""
    hang_at_step: int = 0
    """Rank faults.hang_rank sleeps for faults.hang_s seconds in step N (where: faults.hang_phase): a hang drill for the watchdog. 0: never."""
    hang_phase: Literal["forward", "eval", "setup"] = "forward"
    """Where the hang drill sleeps: inside the forward pass of step faults.hang_at_step, inside the evaluation after it, or during setup (before step 1; any faults.hang_at_step > 0 turns it on)."""
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
    """Save a sharded checkpoint every N steps (and at the last step); 0: at the last step only."""
    final: bool = True
    """Save at the last step (a finished run always leaves something to export or resume); false: only every checkpoint.every steps, and nothing with checkpoint.every=0."""
    keep_last: int = 3
    """Keep the newest K complete checkpoints; older ones are deleted after each successful save."""
    dir: str = ""
    """Folder of step-<N> checkpoints. Default: <run.dir>/checkpoints."""
    async_save: bool = False
    """Write checkpoints in a background thread while training goes on: a save blocks only to copy this rank's state to CPU memory (one extra copy of its shard of params + optimizer state, held until written). The last save, and saves on a stop signal, are synchronous."""


@dataclass
class ResumeConfig:
    path: str = "auto"
    """auto: continue from the newest intact checkpoint in checkpoint.dir (falling back past damaged ones), from step 0 when there is none; never (or none): always start at step 0, refused when run.dir holds a run (run.fresh=true moves it aside); or a step-<N> folder (what came after it moves aside). `resume=X` is short for resume.path=X."""
    weights_only: bool = False
    """Load only the model weights and start a new run from step 0 (fresh optimizer, scaler and data order)."""
    allow_new_global_batch: bool = False
    """Allow resuming with a different global batch (micro_batch_size x grad_accum x world size); the data position carries on from the sequences already consumed."""

    @property
    def never(self) -> bool:
        """resume=never (or its older name, none): always start at step 0."""
        return self.path in ("never", "none")

    @property
    def checkpoint(self) -> Optional[str]:
        """The step-<N> folder resume=PATH names (None for auto and never)."""
        return None if self.never or self.path == "auto" else self.path


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    """Where the run lives."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimization and batch shape."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out loss."""
    precision: Precision = "bf16"
    """Compute dtype: fp32, bf16, fp16 (with dynamic loss scaling) or fp8 (bf16, with the transformer blocks' linear matmuls in FP8: the fp8 section). Master weights are always fp32."""
    fp8: FP8Config = field(default_factory=FP8Config)
    """FP8 matmuls, for precision=fp8."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Sharding backend and process group."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The causal LM."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Low-rank adapters on the frozen pretrained model (lora.r > 0)."""
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
    """Where to resume from (resume=auto|never|PATH)."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """Resources and node setup for harness submit (training ignores them)."""

    def tokenizer_ref(self) -> str:
        """data.tokenizer, else the pretrained model's own tokenizer, else bundled:gpt2."""
        return self.data.tokenizer or self.model.pretrained or "bundled:gpt2"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """A short hash of the resolved config, for manifests and cache keys."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
