"""Everything a run needs, built from the config and checked before anything is written."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from harness.checkpoint import Checkpointer, choose_resume, load_checkpoint
from harness.config import Config, dump_yaml
from harness.data import BatchShape, PrefetchedBatches, TrainBatches, eval_batches, load_corpus
from harness.errors import HarnessError
from harness.model import build_skeleton, flops_per_token, full_numel, initial_weights, model_spec
from harness.model.blocks import compile_blocks
from harness.model.loss import enable_chunked_loss
from harness.numerics.diagnose import ForwardProbe, OverflowDiagnosis
from harness.numerics.grad_scale import build_grad_scaler
from harness.numerics.precision import check_device_supports, precision_policy
from harness.numerics.spikes import SpikeGuard
from harness.observe.console import print0
from harness.observe.metrics import MetricsWriter, device_peak_tflops
from harness.observe.step_counter import StepCounter
from harness.observe.tracking import build_tracker
from harness.parallel import build_backend
from harness.parallel.initial_weights import write_initial_weights
from harness.runtime.dist import RankInfo
from harness.runtime.host_memory import peak_gb as host_peak_gb
from harness.runtime.run_dir import Claim, claim
from harness.train.faults import FaultInjector
from harness.train.loop import Loop


def load_agreed_corpus(cfg: Config, info: RankInfo):
    """The corpus, prepared once per filesystem (each node's first rank reports the progress), and
    the same on every rank: nodes without a shared filesystem prepare their own copies, and a
    difference (other files, another tokenizer version) stops the run before step 1."""
    reporter = info.local_rank == 0
    corpus = load_corpus(cfg.data, show_progress=reporter, log=print if reporter else (lambda *_: None))
    if dist.is_initialized() and info.world_size > 1:
        digests: list = [None] * info.world_size
        dist.all_gather_object(digests, corpus.digest)
        odd = next((rank for rank, digest in enumerate(digests) if digest != digests[0]), None)
        if odd is not None:
            raise HarnessError(
                f"rank {odd} prepared a different token stream than rank 0 (sha256 {str(digests[odd])[:12]} vs "
                f"{str(digests[0])[:12]}): the nodes read different files or tokenizers; give every node the same "
                "data, or put data.cache_dir on a shared filesystem"
            )
    return corpus


def build_loop(cfg: Config, info: RankInfo, device: torch.device) -> Loop:
    """Everything a run needs, built and checked before anything is written: a run folder that did
    not exist is removed again if setup fails (harness.runtime.run_dir), an existing one is left as it was
    (its config.yaml and metrics are only written once setup has succeeded)."""
    policy = precision_policy(cfg.precision)
    check_device_supports(policy, device)
    run_dir = Path(cfg.run.dir)
    claimed = _claim_run_dir(run_dir, info)
    try:
        loop = _build(cfg, info, device, policy, run_dir)
    except BaseException:
        if claimed is not None:
            claimed.abandon()
        raise
    loop.run_dir_claim = claimed
    return loop


def _claim_run_dir(run_dir: Path, info: RankInfo) -> Optional[Claim]:
    """Rank 0 claims the folder; every rank learns the outcome, so all stop together on a refusal."""
    claimed, problem = None, None
    if info.is_main:
        try:
            claimed = claim(run_dir)
        except HarnessError as exc:
            problem = str(exc)
    if dist.is_initialized() and info.world_size > 1:
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem is not None:
        raise HarnessError(problem)
    return claimed


def _build(cfg: Config, info: RankInfo, device: torch.device, policy, run_dir: Path) -> Loop:
    corpus = load_agreed_corpus(cfg, info)
    print0(info.rank, f"data: {corpus.description}; {corpus.tokens('train'):,} train / {corpus.tokens('val'):,} val tokens")
    spec = model_spec(cfg.model, corpus.vocab_size, cfg.train.seq_len)
    for note in spec.notes:
        print0(info.rank, f"note: {note}")
    backend = build_backend(cfg, policy, device, info.world_size)
    # The skeleton holds no weights (meta, or ZeRO-3 partitions); setup allocates this rank's
    # shards and the initial weights are written into them, one block at a time.
    model = build_skeleton(spec, backend.construction_context(spec.hf_config.hidden_size))
    if cfg.train.loss_chunk_tokens:
        enable_chunked_loss(model)
    if cfg.train.compile:
        compile_blocks(model)
    model_name = type(model).__name__
    model_config_json = model.config.to_json_string()
    full_numels = {name: full_numel(p) for name, p in model.named_parameters()}
    n_params = sum(full_numels.values())
    fpt = flops_per_token(model, cfg.train.seq_len)
    backend.setup(model, cfg.train)
    resume_path = choose_resume(cfg, info)
    if resume_path is None:  # a checkpoint, weights-only ones too, overwrites every master piece
        write_initial_weights(backend, initial_weights(spec, cfg.train.seed), full_numels)
    print0(
        info.rank,
        f"model: {model_name}, {n_params:,} parameters; {backend.name} over {info.world_size} rank(s), "
        f"compute {cfg.precision}, master weights fp32",
    )
    for note in backend.notes:
        print0(info.rank, f"note: {note}")
    faults = FaultInjector(cfg.faults, info.rank)
    faults.attach(backend.module)  # before the probe, so the probe sees injected values
    probe = ForwardProbe(backend.module) if cfg.debug.nan_hooks else None
    diagnosis = OverflowDiagnosis(
        info.rank, info.world_size, [name for name, _ in backend.module.named_parameters()], probe
    )
    # Dropout and other training-time randomness differ per rank; the init above did not.
    torch.manual_seed(cfg.train.seed + 1 + info.rank)

    shape = BatchShape(cfg.train.micro_batch_size, cfg.train.grad_accum, info.world_size)
    spikes = SpikeGuard(cfg.train.spike, info.world_size, device)
    scaler = build_grad_scaler(cfg.scaler, policy.uses_loss_scaling, cfg.train.grad_clip, device, spikes=spikes)
    start_step, start_offset = 0, 0
    skip_steps: list[int] = []
    skipped_batches = rollbacks = 0
    if resume_path is not None:
        load_started = time.perf_counter()
        state = load_checkpoint(resume_path, backend, cfg, info, device, shape.global_batch)
        print0(info.rank, f"resume: loaded {resume_path} in {time.perf_counter() - load_started:.1f}s")
        if state is None:
            print0(info.rank, f"resume: weights from {resume_path}; a new run from step 0")
        else:
            start_step, start_offset = state.step, state.sequences_consumed
            scaler.load_state_dict(state.scaler)
            spikes.load_state_dict(state.spikes)
            skip_steps, skipped_batches, rollbacks = state.skip_steps, state.skipped_batches, state.rollbacks
            print0(info.rank, f"resume: continuing after step {state.step} of {resume_path}")
    batches = TrainBatches(
        corpus.sequences("train", cfg.train.seq_len), cfg.train.seed, shape, info.rank, start_step, start_offset,
        skip_steps,
    )
    eval_data = []
    if cfg.eval.every:
        val = corpus.sequences("val", cfg.train.seq_len)
        eval_data = eval_batches(val, cfg.eval.sequences, cfg.train.micro_batch_size, info.rank, info.world_size)

    # Measured last, once everything a step needs is built: what a node must have before step 1.
    setup_host_peak = [0.0] * info.world_size
    dist.all_gather_object(setup_host_peak, round(host_peak_gb(), 4))
    tracker = build_tracker(cfg, info.rank, resumed=start_step > 0)  # may refuse (no wandb login): before any write
    if info.is_main:
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    return Loop(
        cfg=cfg,
        info=info,
        device=device,
        backend=backend,
        scaler=scaler,
        batches=batches,
        eval_data=eval_data,
        faults=faults,
        metrics=MetricsWriter(run_dir, info.rank, cfg.log.per_rank, resume_step=start_step if resume_path else None),
        flops_per_token=fpt,
        peak_tflops=device_peak_tflops(device, policy, cfg.log.peak_tflops),
        model_config_json=model_config_json,
        tracker=tracker,
        diagnosis=diagnosis,
        checkpointer=Checkpointer(cfg, model_config_json, info, device),
        start_step=start_step,
        setup_host_peak_gb=setup_host_peak,
        counter=StepCounter(device) if cfg.debug.count_syncs else None,
        prefetched=PrefetchedBatches(batches, pin_memory=device.type == "cuda") if cfg.data.prefetch else None,
        spikes=spikes,
        skipped_batches=skipped_batches,
        rollbacks=rollbacks,
    )
