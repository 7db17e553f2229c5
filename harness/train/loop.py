"""The training loop over components built from the config (harness.train.build). It reads like
the single-GPU recipe: scale the loss, backward, unscale + clip + decide, step or skip; the
decision is one for all ranks (harness.numerics.grad_scale), and the backend obeys it.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import torch

from harness.checkpoint import Checkpointer
from harness.config import Config
from harness.data import PrefetchedBatches, TrainBatches
from harness.data.batch import to_device
from harness.numerics.diagnose import OverflowDiagnosis
from harness.numerics.grad_scale import DeviceDecision, GradScaler
from harness.numerics.optim import lr_at
from harness.numerics.spikes import spike_warning
from harness.observe.console import Progress, RunSummary, print0
from harness.observe.metrics import (
    MetricsWriter,
    append_resources,
    peak_memory_gb,
    peak_reserved_gb,
    write_json_atomically,
)
from harness.observe.step_counter import StepCounter, host_read
from harness.observe.tracking import NullTracker, WandbTracker
from harness.parallel.base import ParallelBackend
from harness.runtime.dist import RankInfo
from harness.runtime.host_memory import peak_gb as host_peak_gb
from harness.runtime.preemption import StopRequest
from harness.runtime.run_dir import Claim
from harness.runtime.watchdog import Watchdog
from harness.train.callbacks import Callback, LossFn
from harness.train.evaluation import held_out_loss
from harness.train.prompts import PromptSet, complete_and_record
from harness.train.recovery import Recovery
from harness.train.rows import PendingStep, StepAgreement, StepRecord, Tally, pack_pending, read_rows
from harness.train.run_state import RunState
from harness.train.schedule import eval_due, reads_after, save_due


class PhaseListener(Protocol):
    def enter(self, phase: str, step: int) -> None: ...


@dataclass
class Loop:
    """One run's steps, over components given whole at construction (harness.train.build)."""

    cfg: Config
    info: RankInfo
    device: torch.device
    backend: ParallelBackend
    scaler: GradScaler
    state: RunState
    """Everything a checkpoint holds (harness.train.run_state); the loop's data position is its batches."""
    recovery: Recovery
    """What a loss spike or an abort read back from the device leads to."""
    checkpointer: Checkpointer
    loss: LossFn
    """The training loss of one micro-batch: (sum of token losses, token count)."""
    eval_loss: Optional[LossFn]
    """harness.Trainer(loss=...) for evaluation; None: next-token cross entropy."""
    eval_data: list[tuple[torch.Tensor, torch.Tensor]]
    prompts: Optional[PromptSet]
    """eval.prompts, tokenized: completed at every evaluation."""
    metrics: MetricsWriter
    tracker: NullTracker | WandbTracker
    callbacks: Sequence[Callback]
    """harness.Trainer(callbacks=...): told of every metrics row and every evaluation."""
    diagnosis: OverflowDiagnosis
    flops_per_token: float
    peak_tflops: Optional[float]
    stop: StopRequest
    """SIGTERM/SIGUSR1 end the run after a checkpoint."""
    phases: Sequence[PhaseListener] = ()
    """Told of every phase the loop enters: the watchdog (a rank that stops making progress ends
    the job) and the fault drills."""
    between_steps: Sequence[Callable[[int], None]] = ()
    """Called with the step after each read (and its checkpoint when due): the kill drill."""
    watchdog: Optional[Watchdog] = None
    """Multi-rank jobs: asked, when a collective fails, which peer is gone."""
    counter: Optional[StepCounter] = None
    """debug.count_syncs: host syncs and collectives of each step, into its metrics row."""
    prefetched: Optional[PrefetchedBatches] = None
    """data.prefetch: the batches with the next step built in the background."""
    start_step: int = 0
    """The step a resumed run continues after (0 for a fresh run)."""
    setup_host_peak_gb: Sequence[float] = ()
    """Every rank's host RSS high-water mark once set up, before step 1 (the number that picks a node)."""
    run_dir_claim: Optional[Claim] = None
    """Rank 0's hold on run.dir (harness.runtime.run_dir), kept for the life of the trainer."""

    @property
    def batches(self) -> TrainBatches:
        return self.state.batches

    @property
    def tokens_per_step(self) -> int:
        return self.batches.shape.global_batch * self.cfg.train.seq_len

    def fit(self) -> RunSummary:
        cfg = self.cfg
        progress = Progress(self.info.rank, cfg.train.steps, cfg.log.progress, cfg.log.every)
        started = time.perf_counter()
        tally = Tally(first_step=self.start_step + 1)
        exit_code = 1
        stopped_after = None
        pending: list[PendingStep] = []
        window_started = time.perf_counter()
        step = tally.first_step
        if cfg.debug.resources_every:
            append_resources(Path(cfg.run.dir), self.info.rank, "start")
        try:
            while step <= cfg.train.steps:
                # The host issues the step's work and moves on; it reads the device (one transfer
                # for every step since the last read) only where it must act on what it reads.
                with self.counter or contextlib.nullcontext():
                    pending.append(self.train_step(step))
                    values = None
                    if reads_after(cfg, step, self.start_step):
                        self._phase("read", step)
                        values = host_read(pack_pending(pending))
                if self.counter is not None:
                    pending[-1].host_fields.update(self.counter.take())
                every = cfg.debug.resources_every
                if every and step % every == 0:
                    append_resources(Path(cfg.run.dir), self.info.rank, step)
                if values is None:
                    step += 1
                    continue
                records = self._records(pending, values, time.perf_counter() - window_started)
                pending = []
                resumed_after = self._record(records, progress, tally)
                window_started = time.perf_counter()
                if resumed_after is not None:  # a loss-spike rollback: continue after its checkpoint
                    step = resumed_after + 1
                    continue
                if self._act_after_read(step, records[-1].agreement):
                    stopped_after = step
                    break
                step += 1
            self.checkpointer.finish()
            if cfg.debug.resources_every:
                if self.prefetched is not None:
                    self.prefetched.close()  # the end sample counts what outlives the run's work
                append_resources(Path(cfg.run.dir), self.info.rank, "end")
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
            # A run stopped by a signal consumed the batches up to the step it stopped after.
            tokens=self.batches.consumed_after(stopped_after or cfg.train.steps) * cfg.train.seq_len,
            tokens_per_s=tokens_per_s,
            mfu=self._mfu(tokens_per_s),
            peak_mem_gb=peak_memory_gb(self.device),
            wall_s=time.perf_counter() - started,
            run_dir=cfg.run.dir,
            overflows=self.diagnosis.summary(),
            stopped=None if stopped_after is None else (self.stop.received or "a signal on another rank", stopped_after),
            setup_host_peak_gb=list(self.setup_host_peak_gb),
        )
        if self.info.is_main:
            write_json_atomically(Path(cfg.run.dir) / "summary.json", summary.to_json())
        return summary

    def _record(self, records: list[StepRecord], progress: Progress, tally: Tally) -> Optional[int]:
        """Write the rows just read (evaluating after the last one when due); stop the run at the
        first row that carries an abort (later rows belong to steps the latch left untouched).
        With train.spike.action=rollback and a spike among the rows, roll back and return the
        step the run continues after."""
        cfg = self.cfg
        spikes = []
        for record in records:
            row, decision, step = record.row, record.decision, record.step
            if decision.spike:
                spikes.append(step)
                print0(self.info.rank, spike_warning(cfg.train.spike, step, row["loss"], decision.loss_median))
            completions = None
            if record is records[-1] and eval_due(cfg, step) and not (spikes and self.recovery.rolls_back):
                tally.eval_loss = row["eval_loss"] = self.evaluate(step)
                for callback in self.callbacks:
                    callback.on_eval(step, row["eval_loss"])
                completions = self.complete_prompts(step)
            self.metrics.write(row)
            self.tracker.log(row, completions=completions)
            for callback in self.callbacks:
                callback.on_step_end(row)
            progress.update(row)
            tally.add(row, self.tokens_per_step, last_step=cfg.train.steps)
            if decision.abort_reason:
                raise self.recovery.abort(f"step {step}: {decision.abort_reason}")
        if spikes and self.recovery.rolls_back:
            return self.recovery.roll_back(spikes)
        return None

    def _act_after_read(self, step: int, agreed: StepAgreement) -> bool:
        """Between steps, after a read: commit a finished background save, save when due, the
        between-step hooks, and a stop signal (save, then True: the run ends here)."""
        cfg = self.cfg
        self.checkpointer.commit_if_written(agreed.saves_written)
        saved = save_due(cfg, step)
        if saved:
            self.save_checkpoint(step, blocking=step == cfg.train.steps)
        for hook in self.between_steps:
            hook(step)
        if not (agreed.stop and step < cfg.train.steps):
            return False
        if saved:
            self.checkpointer.finish()
        else:
            self.save_checkpoint(step)
        return True

    def run_step(self, step: int) -> StepRecord:
        """Issue step `step` and read it at once (what fit() does with log.every=1). For benchmarks
        and tools that drive steps one by one."""
        started = time.perf_counter()
        pending = [self.train_step(step)]
        values = host_read(pack_pending(pending))
        return self._records(pending, values, time.perf_counter() - started)[0]

    def train_step(self, step: int) -> PendingStep:
        """Issue one optimizer step; nothing here waits for the device (FSDP2)."""
        lr = lr_at(step, self.cfg.train)
        self.diagnosis.begin_step()
        loss_scale = None if self.scaler.fixed_scale_of_one else self.scaler.scale_tensor
        local_loss = self.forward_backward(step, loss_scale)
        return PendingStep(
            step=step,
            lr=lr,
            decision=self.apply_gradients(step, lr, local_loss),
            host_fields={
                "tokens": self.batches.consumed_after(step) * self.cfg.train.seq_len,
                **({"tokens_by_source": by_source} if (by_source := self.batches.tokens_by_source(step)) else {}),
                **({"packing_efficiency": filled} if (filled := self.batches.packing_efficiency(step)) is not None
                   else {}),
                "mem_gb": peak_memory_gb(self.device),
                "mem_reserved_gb": peak_reserved_gb(self.device),
                "host_mem_gb": host_peak_gb(),
            },
        )

    def _records(self, pending: list[PendingStep], values: list[float], window_s: float) -> list[StepRecord]:
        return read_rows(pending, values, window_s, tokens_per_step=self.tokens_per_step, mfu=self._mfu,
                         skipped_batches=self.state.skipped_batches, diagnosis=self.diagnosis)

    def save_checkpoint(self, step: int, blocking: bool = True) -> Optional[Path]:
        """Checkpoint after step `step`; with checkpoint.async_save and blocking=False the file
        writing continues in the background (returns None until it is committed)."""
        state = self.state.capture(step)
        self._phase("checkpoint", step)
        return self.checkpointer.save(step, self.state.backend, state, self.state.lora_base, blocking=blocking)

    def forward_backward(self, step: int, loss_scale: Optional[torch.Tensor]) -> torch.Tensor:
        """Accumulate this rank's gradients for step `step`. Returns, on the device and unread,
        (summed loss of this rank's trained tokens, their count).

        The loss of a step is the mean over every trained token of the global batch, however the
        tokens fall on ranks and micro-batches (prompts and padding carry none). Backward runs on
        each micro-batch's summed loss divided by the tokens a rank would train if every one
        counted (a constant); the shared decision, whose all-reduce carries the true global count,
        turns the gradient into the global mean's (harness.numerics.grad_scale)."""
        self._phase("data", step)
        micro_batches = (self.prefetched or self.batches).micro_batches(step)
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for i, batch in enumerate(micro_batches):
            self._phase("forward", step)
            total, count = self.loss(self.backend.model, to_device(batch, self.device, non_blocking=True))
            last = i == len(micro_batches) - 1
            self._phase("backward", step)
            self.backend.backward(total / self.nominal_tokens_per_rank, loss_scale, last_micro_batch=last)
            sums += torch.stack([total.detach().double(), torch.as_tensor(count, device=self.device).double()])
        return sums

    @property
    def nominal_tokens_per_rank(self) -> int:
        """Predictions per rank and step if every token were trained."""
        shape = self.batches.shape
        return shape.micro_batch_size * shape.grad_accum * self.cfg.train.seq_len

    def _phase(self, phase: str, step: int) -> None:
        for listener in self.phases:
            listener.enter(phase, step)

    def apply_gradients(self, step: int, lr: float, local_loss: torch.Tensor) -> DeviceDecision:
        """Decide, then step or skip, all on the device (for FSDP2); returns the decision unread.
        local_loss: what forward_backward returned."""
        decision = self.unscale_and_clip(step, local_loss)
        self._phase("step", step)
        self.backend.apply_decision(decision, lr)
        return decision

    def unscale_and_clip(self, step: int, local_loss: torch.Tensor) -> DeviceDecision:
        """One decision for all ranks, in one all-reduce (non-finite check, global norm, unscale +
        clip, loss spike, the step's loss, and the flags every rank must agree on), on the device."""
        self._phase("decision", step)
        riders = StepAgreement.riders(self.stop.received is not None, self.checkpointer.writing, self.device)
        return self.scaler.decide(self.backend.local_grad_shards(), loss_and_tokens=local_loss,
                                  nominal_tokens=self.nominal_tokens_per_rank * self.batches.shape.data_ranks,
                                  riders=riders)

    def evaluate(self, step: int = 0) -> float:
        """Mean loss over the fixed held-out sequences (harness.train.evaluation), after step `step`."""
        self._phase("eval", step)
        return held_out_loss(self.backend.model, self.eval_data, self.device, self.eval_loss,
                             self.cfg.train.loss_chunk_tokens)

    def complete_prompts(self, step: int) -> Optional[list[dict]]:
        """eval.prompts completed by the model as it is now; rank 0 shows and records them."""
        if self.prompts is None:
            return None
        self._phase("eval", step)
        return complete_and_record(self.backend.model, self.prompts, self.device, step,
                                   Path(self.cfg.run.dir) if self.info.is_main else None)

    def _mfu(self, tokens_per_s: float) -> Optional[float]:
        if self.peak_tflops is None:
            return None
        return self.flops_per_token * tokens_per_s / (self.peak_tflops * 1e12 * self.info.world_size)
