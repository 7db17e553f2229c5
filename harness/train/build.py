"""Everything a run needs, built from the config and checked before anything is written."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from harness.checkpoint import Checkpointer, choose_resume, read_manifest
from harness.checkpoint.history import Held, refuse_finished, refuse_never, settle, survey
from harness.config import Config, dump_yaml
from harness.data import BatchShape, PrefetchedBatches, TrainBatches, eval_batches, load_corpus, load_tokenizer
from harness.data.instruct import INSTRUCTION_FORMATS, describe_dropped, load_chat_template
from harness.data.packing import instruction_rows
from harness.data.user import user_sequences
from harness.errors import HarnessError
from harness.model import flops_per_token, lora
from harness.model.blocks import compile_blocks
from harness.model.build import check_tokenizer_fits, generation_eos, model_spec, special_token_ids
from harness.model.loss import enable_chunked_loss, loss_sum_and_count
from harness.model.source import BlocksOf, model_source
from harness.numerics.diagnose import ForwardProbe, OverflowDiagnosis
from harness.numerics.fp8 import check_fp8_device, convert_to_fp8, scale_precompute
from harness.numerics.grad_scale import build_grad_scaler
from harness.numerics.precision import check_device_supports, precision_policy
from harness.numerics.spikes import SpikeGuard
from harness.observe.console import print0
from harness.observe.metrics import MetricsWriter, device_peak_tflops
from harness.observe.step_counter import StepCounter
from harness.observe.tracking import build_tracker
from harness.parallel import build_backend, build_mesh
from harness.parallel.initial_weights import write_initial_weights
from harness.runtime.dist import RankInfo
from harness.runtime.host_memory import peak_gb as host_peak_gb
from harness.runtime.preemption import StopRequest
from harness.runtime.run_dir import Claim, claim
from harness.runtime.watchdog import Watchdog
from harness.train.callbacks import Callback, LossFn
from harness.train.faults import FaultInjector
from harness.train.loop import Loop, PhaseListener
from harness.train.prompts import PromptSet, prompt_set
from harness.train.recovery import Recovery
from harness.train.run_state import RunState


def load_agreed_corpus(cfg: Config, info: RankInfo):
    """The corpus, prepared once per filesystem (each node's first rank reports the progress), and
    the same on every rank: nodes without a shared filesystem prepare their own copies, and a
    difference (other files, another tokenizer version) stops the run before step 1."""
    reporter = info.local_rank == 0
    corpus = load_corpus(cfg.data, show_progress=reporter, log=print if reporter else (lambda *_: None))
    _check_same_on_every_rank(corpus.digest, info)
    return corpus


def load_agreed_examples(cfg: Config, info: RankInfo):
    """Instruction data (data.format=chat|prompt_completion) as training and held-out rows,
    prepared once per filesystem and the same on every rank."""
    reporter = info.local_rank == 0
    train, val, examples = instruction_rows(cfg.data, cfg.train.seq_len, cfg.eval.sequences,
                                            log=print if reporter else (lambda *_: None))
    _check_same_on_every_rank(examples.index["sha256"], info)
    return train, val, examples


def _check_same_on_every_rank(digest: Optional[str], info: RankInfo) -> None:
    if not (dist.is_initialized() and info.world_size > 1):
        return
    digests: list = [None] * info.world_size
    dist.all_gather_object(digests, digest)
    odd = next((rank for rank, seen in enumerate(digests) if seen != digests[0]), None)
    if odd is not None:
        raise HarnessError(
            f"rank {odd} prepared a different token stream than rank 0 (sha256 {str(digests[odd])[:12]} vs "
            f"{str(digests[0])[:12]}): the nodes read different files or tokenizers; give every node the same "
            "data, or put data.cache_dir on a shared filesystem"
        )


@dataclass
class Parts:
    """What a run is made of besides the config (harness.Trainer's arguments); None takes the config's."""

    model: Optional[Callable[[], nn.Module]] = None
    """Builds the model (called inside the backend's context: meta device, or ZeRO-3 partitions)."""
    blocks: Optional[BlocksOf] = None
    """model -> its blocks (the units FSDP2 shards and ZeRO-3 gathers); default: its _no_split_modules."""
    data: Any = None
    """A map-style or iterable dataset of token-id sequences or dicts (harness.data.user)."""
    eval_data: Any = None
    """Held-out items for eval.every, as `data`."""
    loss: Optional[LossFn] = None
    callbacks: Sequence[Callback] = ()


@dataclass
class _Data:
    train: Any
    val: Any
    vocab_size: int


def build_loop(cfg: Config, info: RankInfo, device: torch.device, parts: Optional[Parts] = None,
               stop: Optional[StopRequest] = None, watchdog: Optional[Watchdog] = None) -> Loop:
    """Everything a run needs, built and checked before anything is written: a run folder that did
    not exist is removed again if setup fails (harness.runtime.run_dir), an existing one is left as it was
    (its config.yaml and metrics are only written once setup has succeeded). `stop`: the signals
    that end the run after a checkpoint (default: none is installed, none is heard); `watchdog`:
    multi-rank jobs, told of every phase the loop enters."""
    parts = parts or Parts()
    _check_parts(cfg, parts)
    policy = precision_policy(cfg.precision)
    check_device_supports(policy, device)
    run_dir = Path(cfg.run.dir)
    claimed, held = _claim_run_dir(cfg, info)
    try:
        return _build(cfg, info, device, policy, run_dir, parts, stop or StopRequest(), watchdog, claimed, held)
    except BaseException:
        if claimed is not None:
            claimed.abandon()
        raise


def _check_parts(cfg: Config, parts: Parts) -> None:
    if cfg.train.loss_chunk_tokens and (parts.model is not None or parts.loss is not None):
        raise HarnessError("train.loss_chunk_tokens needs a transformers model and the built-in loss; set it to 0 "
                           "with harness.Trainer(model=...) or (loss=...)")
    if cfg.eval.every and parts.data is not None and parts.eval_data is None:
        raise HarnessError(f"eval.every={cfg.eval.every} with harness.Trainer(data=...) needs eval_data=... "
                           "(held-out items), or set eval.every=0")


def _claim_run_dir(cfg: Config, info: RankInfo) -> tuple[Optional[Claim], Optional[Held]]:
    """Rank 0 claims the folder and reads what earlier attempts left in it (harness.checkpoint.history),
    refusing a start that would lose it; every rank learns the outcome, so all stop together."""
    claimed, held, problem = None, None, None
    if info.is_main:
        try:
            claimed = claim(Path(cfg.run.dir))
            held = survey(Path(cfg.run.dir), Path(cfg.checkpoint.dir))
            if cfg.resume.never and not cfg.run.fresh:
                refuse_never(held, f"resume={cfg.resume.path}")
        except HarnessError as exc:
            problem = exc
            if claimed is not None:
                claimed.release()
    if dist.is_initialized() and info.world_size > 1:
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem is not None:
        raise problem
    return claimed, held


def _settle_history(cfg: Config, info: RankInfo, held: Optional[Held], resume_path: Optional[Path],
                    start_step: int) -> None:
    """Once setup has succeeded: rank 0 moves aside what this attempt would overwrite (the steps
    after `start_step`, the step of the checkpoint it continues from, or the whole earlier run
    when it starts afresh)."""
    message, problem = "", None
    if info.is_main and held is not None:
        same_folder = resume_path is not None and resume_path.parent.resolve() == held.checkpoint_dir.resolve()
        continues_after = start_step if same_folder and not cfg.resume.weights_only else None
        try:
            message = settle(held, continues_after).message
        except HarnessError as exc:
            problem = str(exc)
    if dist.is_initialized() and info.world_size > 1:
        box = [problem]
        dist.broadcast_object_list(box, src=0)  # no rank writes into the folder while it is being moved
        problem = box[0]
    if problem is not None:
        raise HarnessError(problem)
    if message:
        print0(info.rank, message)


def _data(cfg: Config, info: RankInfo, parts: Parts) -> _Data:
    """The config's corpus, or the user's datasets."""
    if parts.data is None and cfg.data.format in INSTRUCTION_FORMATS:
        train, val, examples = load_agreed_examples(cfg, info)
        index = examples.index
        print0(info.rank, f"data: {cfg.data.path} ({cfg.data.format}, trained on {cfg.data.train_on}): "
                          f"{index['examples']:,} examples, {index['tokens']:,} tokens ({index['trained_tokens']:,} "
                          f"trained); {describe_dropped(index)}; {train.describe()}; {val.examples_in_rows:,} "
                          "held out for evaluation")
        return _Data(train, val if cfg.eval.every else None, index["vocab_size"])
    if parts.data is None:
        corpus = load_agreed_corpus(cfg, info)
        print0(info.rank, f"data: {corpus.description}; {corpus.tokens('train'):,} train / "
                          f"{corpus.tokens('val'):,} val tokens")
        val = corpus.sequences("val", cfg.train.seq_len) if cfg.eval.every else None
        return _Data(corpus.sequences("train", cfg.train.seq_len), val, corpus.vocab_size)
    train = user_sequences(parts.data)
    val = user_sequences(parts.eval_data) if parts.eval_data is not None else None
    for name, sequences in (("data", train), ("eval_data", val)):
        if sequences is not None and sequences.seq_len != cfg.train.seq_len:
            raise HarnessError(
                f"harness.Trainer({name}=...) items feed {sequences.seq_len} tokens to the model (a token sequence: "
                f"its length - 1; a dict: its input_ids) but train.seq_len={cfg.train.seq_len}; set "
                f"train.seq_len={sequences.seq_len}"
            )
    # A transformers model built from model.config still sizes its embedding by the tokenizer.
    vocab = len(load_tokenizer(cfg.data.tokenizer)) if parts.model is None and not cfg.model.pretrained else 0
    print0(info.rank, f"data: {type(parts.data).__name__} given to harness.Trainer ({train.seq_len} tokens a row)")
    return _Data(train, val, vocab)


def _build(cfg: Config, info: RankInfo, device: torch.device, policy, run_dir: Path, parts: Parts,
           stop: StopRequest, watchdog: Optional[Watchdog], claimed: Optional[Claim], held: Optional[Held]) -> Loop:
    faults = FaultInjector(cfg.faults, info.rank)
    faults.enter("setup", 0)  # the drill of a rank that never finishes setting up
    if parts.model is None and cfg.model.pretrained:  # before any data is tokenized (and cached) with it
        check_tokenizer_fits(model_spec(cfg.model, 0).hf_config, load_tokenizer(cfg.data.tokenizer), cfg.data.tokenizer,
                             cfg.model.pretrained)
    data = _data(cfg, info, parts)
    from_scratch = parts.model is None and not cfg.model.pretrained
    specials = special_token_ids(load_tokenizer(cfg.data.tokenizer)) if from_scratch else None
    source = model_source(cfg.model, data.vocab_size, cfg.train.seq_len, parts.model, parts.blocks, specials, cfg.lora)
    for note in source.notes:
        print0(info.rank, f"note: {note}")
    mesh = build_mesh(cfg.parallel, info.world_size, info.rank, device)
    backend = build_backend(cfg, policy, device, mesh)
    # The skeleton holds no weights (meta, or ZeRO-3 partitions); setup allocates this rank's
    # shards and the initial weights are written into them, one block at a time.
    model = source.skeleton(backend.construction_context(source.hidden_size))
    if cfg.precision == "fp8":  # before the backend wraps it: torchao swaps the linear modules
        check_fp8_device(device, cfg.fp8)
        print0(info.rank, convert_to_fp8(model, cfg.fp8).describe(cfg.fp8.recipe))
    if cfg.lora.enabled:
        print0(info.rank, lora.describe(model, list(source.lora_targets), cfg.lora, policy.name, backend.full_numel))
    if cfg.train.loss_chunk_tokens:
        enable_chunked_loss(model)
    if cfg.train.compile:
        compile_blocks(model)
    model_name = type(model).__name__
    model_config_json = source.describe(model)
    full_numels = {name: backend.full_numel(p) for name, p in model.named_parameters()}
    n_params = sum(full_numels.values())
    fpt = flops_per_token(model, cfg.train.seq_len, backend.full_numel)
    backend.setup(model, cfg.train, source.hidden_size)
    if cfg.precision == "fp8" and cfg.fp8.all_gather:
        backend.on_weights_changed(scale_precompute(backend.module))
    lora_base = lora.base_identity(cfg.model.pretrained, source.spec.pretrained_dir) if cfg.lora.enabled else None
    resume_path = choose_resume(cfg, info)
    if resume_path is not None and cfg.resume.path == "auto":  # a rerun of a run that already finished
        refuse_finished(run_dir, resume_path, read_manifest(resume_path)["step"], cfg.train.steps)
    if resume_path is None:  # a checkpoint, weights-only ones too, overwrites every master piece
        write_initial_weights(backend, source.initial_weights(cfg.train.seed), full_numels)
    elif cfg.lora.enabled:  # ... but holds no frozen base
        write_initial_weights(backend, source.initial_weights(cfg.train.seed), full_numels, frozen_only=True)
    print0(
        info.rank,
        f"model: {model_name}, {n_params:,} parameters; {backend.name} over {info.world_size} rank(s), "
        f"compute {cfg.precision}, master weights fp32",
    )
    for note in backend.notes:
        print0(info.rank, f"note: {note}")
    faults.attach(backend.module)  # before the probe, so the probe sees injected values
    probe = ForwardProbe(backend.module) if cfg.debug.nan_hooks else None
    diagnosis = OverflowDiagnosis(
        info.rank, info.world_size, [name for name, _ in backend.module.named_parameters()], probe
    )
    # Dropout and other training-time randomness differ per data-parallel rank; the init above did not.
    torch.manual_seed(cfg.train.seed + 1 + mesh.data_rank)

    shape = BatchShape(cfg.train.micro_batch_size, cfg.train.grad_accum, mesh.data_size)
    spikes = SpikeGuard(cfg.train.spike, device)
    scaler = build_grad_scaler(cfg.scaler, policy.uses_loss_scaling, cfg.train.grad_clip, device, spikes=spikes)
    batches = TrainBatches(data.train, cfg.train.seed, shape, mesh.data_rank)
    state = RunState(cfg, info, device, backend, scaler, spikes, batches, lora_base)
    start_step = 0
    if resume_path is not None:
        start_step = _resume(state, resume_path, cfg.resume.weights_only)
    eval_data = []
    if cfg.eval.every:
        eval_data = eval_batches(data.val, cfg.eval.sequences, cfg.train.micro_batch_size, mesh.data_rank,
                                 mesh.data_size)

    _settle_history(cfg, info, held, resume_path, start_step)

    # Measured last, once everything a step needs is built: what a node must have before step 1.
    setup_host_peak = [0.0] * info.world_size
    dist.all_gather_object(setup_host_peak, round(host_peak_gb(), 4))
    tracker = build_tracker(cfg, info.rank, resumed=start_step > 0)  # may refuse (no wandb login): before any write
    if info.is_main:
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    checkpointer = Checkpointer(cfg, model_config_json, info, device)
    chunk = cfg.train.loss_chunk_tokens
    phases: list[PhaseListener] = [watchdog] if watchdog is not None else []
    return Loop(
        cfg=cfg,
        info=info,
        device=device,
        backend=faults.wrap_backend(backend),
        scaler=scaler,
        state=state,
        recovery=Recovery(cfg.train.spike, Path(cfg.checkpoint.dir), state, checkpointer, info),
        checkpointer=checkpointer,
        loss=faults.wrap_loss(parts.loss or (lambda model, batch: loss_sum_and_count(model, batch, chunk))),
        eval_loss=parts.loss,
        eval_data=eval_data,
        prompts=_prompts(cfg) if cfg.eval.prompts and cfg.eval.every else None,
        metrics=MetricsWriter(run_dir, info.rank, cfg.log.per_rank, resume_step=start_step if resume_path else None),
        tracker=tracker,
        callbacks=tuple(parts.callbacks),
        diagnosis=diagnosis,
        flops_per_token=fpt,
        peak_tflops=device_peak_tflops(device, policy, cfg.log.peak_tflops),
        stop=stop,
        phases=(*phases, faults),
        between_steps=(faults.between_steps,),
        watchdog=watchdog,
        counter=StepCounter(device) if cfg.debug.count_syncs else None,
        prefetched=PrefetchedBatches(batches, pin_memory=device.type == "cuda") if cfg.data.prefetch else None,
        start_step=start_step,
        setup_host_peak_gb=setup_host_peak,
        run_dir_claim=claimed,
    )


def _resume(state: RunState, path: Path, weights_only: bool) -> int:
    """Restore the run from checkpoint `path`; returns the step it continues after (0: weights only)."""
    rank = state.info.rank
    load_started = time.perf_counter()
    restored = state.restore(path, weights_only=weights_only)
    print0(rank, f"resume: loaded {path} in {time.perf_counter() - load_started:.1f}s")
    if restored is None:
        print0(rank, f"resume: weights from {path}; a new run from step 0")
        return 0
    print0(rank, f"resume: continuing after step {restored.step} of {path}")
    return restored.step


def _prompts(cfg: Config) -> PromptSet:
    """eval.prompts with the run's tokenizer and chat template; generation stops where the
    pretrained model's generation config says (its end-of-turn tokens), as `generate` would."""
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if cfg.data.chat_template:
        load_chat_template(tokenizer, cfg.data.chat_template, cfg.data.tokenizer)
    return prompt_set(cfg.eval.prompts, tokenizer, cfg.eval.max_new_tokens, generation_eos(cfg.model.pretrained))
