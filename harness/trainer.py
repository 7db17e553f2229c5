"""The training loop. Components are built from the config in `build_trainer`; the loop itself
reads like the single-GPU recipe: scale the loss, backward, unscale + clip + decide, step or skip.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from harness.checkpoint import (Checkpointer, CheckpointError, checkpoint_step, choose_resume, complete_checkpoints,
                                load_checkpoint, trainer_state_for)
from harness.config import Config, dump_yaml
from harness.console import Progress, RunSummary, print0
from harness.diagnose import ForwardProbe, OverflowDiagnosis
from harness.data import BatchShape, PrefetchedBatches, TrainBatches, eval_batches, load_corpus
from harness.dist import RankInfo
from harness.errors import HarnessError, TrainingAborted
from harness.faults import FaultInjector
from harness.grad_scale import DeviceDecision, GradScaler, StepDecision, build_grad_scaler
from harness.host_memory import peak_gb as host_peak_gb, process_resources, return_free_memory
from harness.metrics import (MetricsWriter, device_peak_tflops, peak_memory_gb, peak_reserved_gb,
                             write_json_atomically)
from harness.model.blocks import compile_blocks
from harness.model.loss import enable_chunked_loss
from harness.model import (build_skeleton, flops_per_token, full_numel, initial_weights, model_spec, next_token_loss,
                           per_sequence_loss)
from harness.optim import lr_at
from harness.parallel import build_backend
from harness.parallel.initial_weights import write_initial_weights
from harness.parallel.base import ParallelBackend
from harness.precision import check_device_supports, precision_policy
from harness.preemption import StopRequest
from harness.run_dir import Claim, claim
from harness.spikes import SpikeGuard
from harness.step_counter import StepCounter, host_read
from harness.tracking import NullTracker, WandbTracker, build_tracker
from harness.watchdog import Watchdog


@dataclass(frozen=True)
class StepAgreement:
    """What every rank learned, identically, at the end of a step."""

    stop: bool
    """Some rank received SIGTERM/SIGUSR1: checkpoint after this step and exit."""
    saves_written: bool
    """No rank is still writing a background checkpoint: the one in flight can be committed."""


@dataclass
class PendingStep:
    """A step the host has issued but not yet read: its values stay on the device until then."""

    step: int
    lr: float
    decision: DeviceDecision
    agreement: torch.Tensor
    """All-reduced (loss sum, stop flag, still-writing flag), fp64."""
    host_fields: dict
    """Metrics known on the host when the step was issued (tokens, memory peaks, counters)."""

    def packed(self) -> torch.Tensor:
        return torch.cat([self.agreement, self.decision.packed().to(self.agreement.device)])

    @property
    def packed_width(self) -> int:
        return 3 + self.decision.packed_width


def _packed(pending: list[PendingStep]) -> torch.Tensor:
    """Every pending step's values in one vector: one device->host transfer reads them all."""
    return torch.cat([item.packed() for item in pending])


@dataclass
class _Tally:
    """What fit() reports at the end, accumulated from the rows as they are read."""

    first_step: int
    losses: list = field(default_factory=list)
    eval_loss: Optional[float] = None
    steady_tokens: int = 0
    steady_time: float = 0.0
    """Tokens and time of every step but the run's first (compilation, first allocations)."""

    def add(self, row: dict, tokens_per_step: int, last_step: int) -> None:
        self.losses.append(row["loss"])
        if row["step"] > self.first_step or last_step == self.first_step:
            self.steady_tokens += tokens_per_step
            self.steady_time += row["step_time_s"]


@dataclass
class Trainer:
    cfg: Config
    info: RankInfo
    device: torch.device
    backend: ParallelBackend
    scaler: GradScaler
    batches: TrainBatches
    eval_data: list[tuple[torch.Tensor, torch.Tensor]]
    faults: FaultInjector
    metrics: MetricsWriter
    flops_per_token: float
    peak_tflops: Optional[float]
    model_config_json: str
    tracker: NullTracker | WandbTracker
    diagnosis: OverflowDiagnosis
    checkpointer: Checkpointer
    start_step: int = 0
    """The step a resumed run continues after (0 for a fresh run)."""
    setup_host_peak_gb: list[float] = field(default_factory=list)
    """Every rank's host RSS high-water mark once set up, before step 1 (the number that picks a node)."""
    stop: Optional[StopRequest] = None
    """Set by the entry point: SIGTERM/SIGUSR1 end the run after a checkpoint."""
    counter: Optional[StepCounter] = None
    """debug.count_syncs: host syncs and collectives of each step, into its metrics row."""
    prefetched: Optional[PrefetchedBatches] = None
    """data.prefetch: `batches` with the next step built in the background."""
    spikes: Optional[SpikeGuard] = None
    """train.spike: the loss-spike check, decided on the device with the step."""
    skipped_batches: int = 0
    """Batches left out by loss-spike rollbacks so far (this run and the ones it resumed)."""
    rollbacks: int = 0
    watchdog: Optional[Watchdog] = None
    """Set by the entry point on multi-rank jobs: ends the job when a rank stops making progress."""
    run_dir_claim: Optional[Claim] = None
    """Rank 0's hold on run.dir (harness.run_dir), kept for the life of the trainer."""

    @property
    def tokens_per_step(self) -> int:
        return self.batches.shape.global_batch * self.cfg.train.seq_len

    def fit(self) -> RunSummary:
        cfg = self.cfg
        progress = Progress(self.info.rank, cfg.train.steps, cfg.log.progress, cfg.log.every)
        started = time.perf_counter()
        tally = _Tally(first_step=self.start_step + 1)
        exit_code = 1
        stopped_after = None
        pending: list[PendingStep] = []
        window_started = time.perf_counter()
        step = tally.first_step
        if cfg.debug.resources_every:
            self._record_resources("start")
        try:
            while step <= cfg.train.steps:
                # The host issues the step's work and moves on; it reads the device (one transfer
                # for every step since the last read) only where it must act on what it reads.
                with self.counter or contextlib.nullcontext():
                    pending.append(self.train_step(step))
                    values = None
                    if self._reads_after(step):
                        self._phase("read", step)
                        values = host_read(_packed(pending))
                if self.counter is not None:
                    pending[-1].host_fields.update(self.counter.take())
                every = cfg.debug.resources_every
                if every and step % every == 0:
                    self._record_resources(step)
                if values is None:
                    step += 1
                    continue
                read = self._finish_rows(pending, values, time.perf_counter() - window_started)
                pending = []
                resumed_after = self._record(read, progress, tally)
                window_started = time.perf_counter()
                if resumed_after is not None:  # a loss-spike rollback: continue after its checkpoint
                    step = resumed_after + 1
                    continue
                if self._act_after_read(step, agreed=read[-1][2]):
                    stopped_after = step
                    break
                step += 1
            self.checkpointer.finish()
            if cfg.debug.resources_every:
                if self.prefetched is not None:
                    self.prefetched.close()  # the end sample counts what outlives the run's work
                self._record_resources("end")
            exit_code = 0
        finally:
            progress.close()
            self.tracker.finish(exit_code)
            if self.prefetched is not None:
                self.prefetched.close()
        tokens_per_s = tally.steady_tokens / tally.steady_time if tally.steady_time > 0 else 0.0
        summary = RunSummary(
            steps=cfg.train.steps,
            skipped=self.scaler.total_skips,
            first_loss=tally.losses[0] if tally.losses else None,
            final_loss=tally.losses[-1] if tally.losses else None,
            eval_loss=tally.eval_loss,
            tokens=self.batches.consumed_after(cfg.train.steps) * cfg.train.seq_len,
            tokens_per_s=tokens_per_s,
            mfu=self._mfu(tokens_per_s),
            peak_mem_gb=peak_memory_gb(self.device),
            wall_s=time.perf_counter() - started,
            run_dir=cfg.run.dir,
            overflows=self.diagnosis.summary(),
            stopped=None if stopped_after is None else (self.stop.received or "a signal on another rank", stopped_after),
            setup_host_peak_gb=self.setup_host_peak_gb,
        )
        if self.info.is_main:
            write_json_atomically(Path(cfg.run.dir) / "summary.json", summary.to_json())
        return summary

    def _record(self, read: list[tuple[dict, StepDecision, StepAgreement]], progress: Progress,
                tally: "_Tally") -> Optional[int]:
        """Write the rows just read (evaluating after the last one when due); stop the run at the
        first row that carries an abort (later rows belong to steps the latch left untouched).
        With train.spike.action=rollback and a spike among the rows, roll back and return the
        step the run continues after."""
        cfg = self.cfg
        spikes = []
        for row, decision, _ in read:
            step = row["step"]
            if decision.spike:
                spikes.append(step)
                self._report_spike(step, row["loss"], decision)
            if row is read[-1][0] and cfg.eval.every and (step % cfg.eval.every == 0 or step == cfg.train.steps) \
                    and not (spikes and cfg.train.spike.action == "rollback"):
                tally.eval_loss = row["eval_loss"] = self.evaluate()
            self.metrics.write(row)
            self.tracker.log(row)
            progress.update(row)
            tally.add(row, self.tokens_per_step, last_step=cfg.train.steps)
            if decision.abort_reason:
                self._land_in_flight_save()
                raise TrainingAborted(f"step {step}: {decision.abort_reason}")
        if spikes and cfg.train.spike.action == "rollback":
            return self._roll_back(spikes)
        return None

    def _record_resources(self, step) -> None:
        """debug.resources_every: this rank's memory, descriptors and threads, appended to its file.
        The heap's free pages are handed back first: glibc keeps up to tens of MB of a step's freed
        activations cached per thread arena, which made single samples swing by +-20% on a 0.5 GB
        process; after the trim RSS counts what the process holds."""
        return_free_memory()
        path = Path(self.cfg.run.dir) / "resources" / f"rank-{self.info.rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps({"step": step, **process_resources()}) + "\n")

    def _report_spike(self, step: int, loss: float, decision: StepDecision) -> None:
        action = {"warn": "applied anyway (train.spike.action=warn)", "skip": "update skipped",
                  "rollback": "update skipped; rolling back"}[self.cfg.train.spike.action]
        median = decision.loss_median
        against = (f"{loss / median:.1f}x the median {median:.4g} of the last {self.cfg.train.spike.window} steps"
                   if median == median and median > 0 else "not finite on some rank")
        print0(self.info.rank, f"warning: step {step}: loss spike: {loss:.4g}, {against}; {action}")

    def _roll_back(self, spike_steps: list[int]) -> Optional[int]:
        """Reload the newest checkpoint from before the first spike; the spiking steps' batches
        are left out from then on. Returns the step the run continues after, or None when there
        is no checkpoint to go back to (the spiking updates were skipped; training goes on)."""
        cfg = self.cfg
        first = min(spike_steps)
        if self.rollbacks >= cfg.train.spike.max_rollbacks:
            self._land_in_flight_save()
            raise TrainingAborted(
                f"step {first}: loss spike after {self.rollbacks} rollback(s) (train.spike.max_rollbacks="
                f"{cfg.train.spike.max_rollbacks}); the run keeps diverging: lower train.lr, check the data near "
                f"step {first}, or raise train.spike.max_rollbacks"
            )
        self.checkpointer.finish()  # the save in flight, if any, is from before the spike was read
        listing = [[str(p) for p in complete_checkpoints(Path(cfg.checkpoint.dir))] if self.info.is_main else None]
        dist.broadcast_object_list(listing, src=0)  # one listing: every rank loads the same one
        before = [Path(p) for p in listing[0] if checkpoint_step(Path(p)) < first]
        if not before:
            print0(self.info.rank, f"warning: no checkpoint before step {first} to roll back to; the spiking update "
                                   "was skipped and training goes on")
            return None
        path = before[-1]
        state = load_checkpoint(path, self.backend, cfg, self.info, self.device, self.batches.shape.global_batch)
        self.scaler.load_state_dict(state.scaler)
        if self.spikes is not None:
            self.spikes.load_state_dict(state.spikes)
        self.rollbacks += 1
        self.skipped_batches += len(spike_steps)
        self.batches.restart(state.step, state.sequences_consumed, [*self.batches.skip_steps, *spike_steps])
        print0(self.info.rank, f"rollback {self.rollbacks}/{cfg.train.spike.max_rollbacks}: reloaded {path.name}; "
                               f"continuing after step {state.step} without the batches of step(s) "
                               f"{', '.join(map(str, spike_steps))}")
        return state.step

    def _act_after_read(self, step: int, agreed: StepAgreement) -> bool:
        """Between steps, after a read: commit a finished background save, save when due, the
        kill drill, and a stop signal (save, then True: the run ends here)."""
        cfg = self.cfg
        self.checkpointer.commit_if_written(agreed.saves_written)
        every = cfg.checkpoint.every
        saved = bool(every) and (step % every == 0 or step == cfg.train.steps)
        if saved:
            self.save_checkpoint(step, blocking=step == cfg.train.steps)
        self.faults.maybe_kill(step)
        if not (agreed.stop and step < cfg.train.steps):
            return False
        if saved:
            self.checkpointer.finish()
        else:
            self.save_checkpoint(step)
        return True

    def run_step(self, step: int) -> tuple[dict, StepDecision, StepAgreement]:
        """Issue step `step` and read it at once (what fit() does with log.every=1): its metrics
        row, decision and agreement. For benchmarks and tools that drive steps one by one."""
        started = time.perf_counter()
        pending = [self.train_step(step)]
        values = host_read(_packed(pending))
        return self._finish_rows(pending, values, time.perf_counter() - started)[0]

    def _reads_after(self, step: int) -> bool:
        """Steps after which the host reads the device: the first, every log.every-th, the last,
        and those where it acts (checkpoint, evaluation, a kill drill). The same on every rank,
        so a stop signal or an abort is acted on by all ranks at the same step."""
        cfg = self.cfg

        def due(every: int) -> bool:
            return bool(every) and step % every == 0

        return (
            step in (self.start_step + 1, cfg.train.steps, cfg.faults.kill_at_step)
            or due(cfg.log.every) or due(cfg.checkpoint.every) or due(cfg.eval.every)
        )

    def train_step(self, step: int) -> "PendingStep":
        """Issue one optimizer step; nothing here waits for the device (FSDP2)."""
        lr = lr_at(step, self.cfg.train)
        self.faults.begin_step(step)
        self.diagnosis.begin_step()
        loss_scale = None if self.scaler.fixed_scale_of_one else self.scaler.scale_tensor
        local_loss = self.forward_backward(step, loss_scale)
        self.faults.end_step(step)
        decision = self.apply_gradients(step, lr, local_loss)
        return PendingStep(
            step=step,
            lr=lr,
            decision=decision,
            agreement=self._agree_at_step_end(local_loss),
            host_fields={
                "tokens": self.batches.consumed_after(step) * self.cfg.train.seq_len,
                **({"tokens_by_source": by_source} if (by_source := self.batches.tokens_by_source(step)) else {}),
                "mem_gb": peak_memory_gb(self.device),
                "mem_reserved_gb": peak_reserved_gb(self.device),
                "host_mem_gb": host_peak_gb(),
            },
        )

    def _finish_rows(
        self, pending: list["PendingStep"], values: list[float], window_s: float
    ) -> list[tuple[dict, StepDecision, StepAgreement]]:
        """Metrics rows of the steps read together, each with its own values. The host waited
        for the device once for all of them, so each is given the window's mean step time."""
        step_time = window_s / len(pending)
        tokens_per_s = self.tokens_per_step / step_time
        rows, offset = [], 0
        for item in pending:
            width = item.packed_width
            loss_sum, stopping, writing, *decided = values[offset:offset + width]
            offset += width
            decision = item.decision.unpack(decided)
            row = {
                "step": item.step,
                "loss": loss_sum / self.info.world_size,
                "lr": item.lr,
                "grad_norm": decision.grad_norm,
                "loss_scale": decision.loss_scale,
                "skipped": decision.skipped,
                "tokens": item.host_fields["tokens"],
                "tokens_per_s": tokens_per_s,
                "mfu": self._mfu(tokens_per_s),
                **{k: v for k, v in item.host_fields.items() if k != "tokens"},
                "step_time_s": step_time,
                "spike": decision.spike,
                "skipped_batches": self.skipped_batches,
            }
            if decision.skipped and (decision.overflow or not decision.spike):
                row.update(self.diagnosis.on_skip(item.step, decision, decision.scale_after))
            rows.append((row, decision, StepAgreement(stop=stopping > 0, saves_written=writing == 0)))
        return rows

    def save_checkpoint(self, step: int, blocking: bool = True) -> Optional[Path]:
        """Checkpoint after step `step`; with checkpoint.async_save and blocking=False the file
        writing continues in the background (returns None until it is committed)."""
        state = trainer_state_for(
            step=step,
            consumed=self.batches.consumed_after(step),
            global_batch=self.batches.shape.global_batch,
            world_size=self.info.world_size,
            scaler_state=self.scaler.state_dict(),
            backend=self.backend,
            spikes=self.spikes.state_dict() if self.spikes is not None else {},
            skipped_batches=self.skipped_batches,
            skip_steps=[s for s in self.batches.skip_steps if s > step],
            rollbacks=self.rollbacks,
        )
        self._phase("checkpoint", step)
        return self.checkpointer.save(step, self.backend, state, blocking=blocking)

    def _land_in_flight_save(self) -> None:
        """Before aborting (a decision every rank shares), commit the save still being written:
        it holds the last good state."""
        try:
            self.checkpointer.finish()
        except CheckpointError as exc:
            print0(self.info.rank, f"warning: {exc}")

    def forward_backward(self, step: int, loss_scale: Optional[torch.Tensor]) -> torch.Tensor:
        """Accumulate this rank's gradients for step `step`; returns its mean (unscaled) loss."""
        self._phase("data", step)
        micro_batches = (self.prefetched or self.batches).micro_batches(step)
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            self._phase("forward", step)
            self.faults.maybe_hang(step)
            loss = next_token_loss(self.backend.model, batch.to(self.device, non_blocking=True), self.cfg.train.loss_chunk_tokens)
            loss = self.faults.scale_loss(step, loss)
            last = i == len(micro_batches) - 1
            self._phase("backward", step)
            self.backend.backward(loss / len(micro_batches), loss_scale, last_micro_batch=last)
            loss_sum += loss.detach()
        return loss_sum / len(micro_batches)

    def _phase(self, phase: str, step: int) -> None:
        if self.watchdog is not None:
            self.watchdog.enter(phase, step)

    def apply_gradients(self, step: int, lr: float, local_loss: Optional[torch.Tensor] = None) -> DeviceDecision:
        """Decide, then step or skip, all on the device (for FSDP2); returns the decision unread."""
        decision = self.unscale_and_clip(step, local_loss)
        self._phase("step", step)
        self.backend.apply_decision(decision, lr)
        return decision

    def unscale_and_clip(self, step: int, local_loss: Optional[torch.Tensor] = None) -> DeviceDecision:
        """One decision for all ranks (non-finite check, global norm, unscale + clip, loss
        spike), on the device."""
        self._phase("decision", step)
        grads = self.backend.local_grad_shards()
        corrupted = self.faults.maybe_corrupt(step, grads)
        if corrupted:
            self._warn(f"step {step}: fault injected: {corrupted}")
        return self.scaler.decide(grads, counted=self.backend.primary_copy, loss=local_loss)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token loss over the fixed held-out sequences, identical for any world size."""
        model = self.backend.model
        self._phase("eval", self.watchdog.step if self.watchdog is not None else 0)
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch, weights in self.eval_data:
            losses = per_sequence_loss(model, batch.to(self.device), self.cfg.train.loss_chunk_tokens)
            weights = weights.to(self.device)
            totals[0] += (losses.double() * weights).sum()
            totals[1] += weights.sum()
        model.train()
        dist.all_reduce(totals)
        return (totals[0] / totals[1]).item()

    def mean_loss(self, local_loss: torch.Tensor) -> float:
        """The mean over ranks of this step's loss, read now (a collective and a sync: for tests
        and tools that drive steps one by one; fit() reads it with the step's other values)."""
        return host_read(self._agree_at_step_end(local_loss))[0] / self.info.world_size

    def _agree_at_step_end(self, local_loss: torch.Tensor) -> torch.Tensor:
        """One all-reduce carries everything the ranks must agree on after a step: the summed
        loss, whether any rank received a stop signal (signals reach ranks at different moments),
        and whether any rank is still writing a background checkpoint. Issued every step, read
        with the step's other values (fills from host values need no read)."""
        values = torch.zeros(3, dtype=torch.float64, device=self.device)
        values[0] = local_loss.detach()
        if self.stop is not None and self.stop.received:
            values[1] = 1.0
        if self.checkpointer.writing:
            values[2] = 1.0
        dist.all_reduce(values)
        return values

    def _mfu(self, tokens_per_s: float) -> Optional[float]:
        if self.peak_tflops is None:
            return None
        return self.flops_per_token * tokens_per_s / (self.peak_tflops * 1e12 * self.info.world_size)

    def _warn(self, message: str) -> None:
        print(f"[rank {self.info.rank}] {message}", flush=True)


def _load_corpus(cfg: Config, info: RankInfo):
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


def build_trainer(cfg: Config, info: RankInfo, device: torch.device) -> Trainer:
    """Everything a run needs, built and checked before anything is written: a run folder that did
    not exist is removed again if setup fails (harness.run_dir), an existing one is left as it was
    (its config.yaml and metrics are only written once setup has succeeded)."""
    policy = precision_policy(cfg.precision)
    check_device_supports(policy, device)
    run_dir = Path(cfg.run.dir)
    claimed = _claim_run_dir(run_dir, info)
    try:
        trainer = _build(cfg, info, device, policy, run_dir)
    except BaseException:
        if claimed is not None:
            claimed.abandon()
        raise
    trainer.run_dir_claim = claimed
    return trainer


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


def _build(cfg: Config, info: RankInfo, device: torch.device, policy, run_dir: Path) -> Trainer:
    corpus = _load_corpus(cfg, info)
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
    return Trainer(
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
