"""The training loop over components built from the config (harness.train.build). It reads like
the single-GPU recipe: scale the loss, backward, unscale + clip + decide, step or skip; the
decision is one for all ranks (harness.numerics.grad_scale), and the backend obeys it.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from harness.checkpoint import (
    Checkpointer,
    CheckpointError,
    trainer_state_for,
)
from harness.config import Config
from harness.data import PrefetchedBatches, TrainBatches
from harness.data.batch import to_device
from harness.errors import TrainingAborted
from harness.model.loss import loss_sum_and_count
from harness.numerics.diagnose import OverflowDiagnosis
from harness.numerics.grad_scale import DeviceDecision, GradScaler, StepDecision
from harness.numerics.optim import lr_at
from harness.numerics.spikes import SpikeGuard, spike_warning
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
from harness.train.faults import FaultInjector
from harness.train.prompts import PromptSet, complete_and_record
from harness.train.rollback import roll_back
from harness.train.rows import PendingStep, StepAgreement, Tally, pack_pending, read_rows
from harness.train.schedule import eval_due, reads_after, save_due


@dataclass
class Loop:
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
    loss_fn: Optional[LossFn] = None
    """harness.Trainer(loss=...): loss(model, batch) -> (sum of token losses, token count); None: next-token
    cross entropy."""
    callbacks: Sequence[Callback] = ()
    """harness.Trainer(callbacks=...): told of every metrics row and every evaluation."""
    run_dir_claim: Optional[Claim] = None
    """Rank 0's hold on run.dir (harness.runtime.run_dir), kept for the life of the trainer."""
    prompts: Optional[PromptSet] = None
    """eval.prompts, tokenized: completed at every evaluation."""
    _local_loss: Optional[torch.Tensor] = None
    """The last forward_backward's (loss sum, trained tokens) on this rank."""

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
                read = self._rows(pending, values, time.perf_counter() - window_started)
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
            setup_host_peak_gb=self.setup_host_peak_gb,
        )
        if self.info.is_main:
            write_json_atomically(Path(cfg.run.dir) / "summary.json", summary.to_json())
        return summary

    def _record(self, read: list[tuple[dict, StepDecision, StepAgreement]], progress: Progress,
                tally: Tally) -> Optional[int]:
        """Write the rows just read (evaluating after the last one when due); stop the run at the
        first row that carries an abort (later rows belong to steps the latch left untouched).
        With train.spike.action=rollback and a spike among the rows, roll back and return the
        step the run continues after."""
        cfg = self.cfg
        spikes = []
        completions = None
        for row, decision, _ in read:
            step = row["step"]
            if decision.spike:
                spikes.append(step)
                print0(self.info.rank, spike_warning(cfg.train.spike, step, row["loss"], decision.loss_median))
            if row is read[-1][0] and eval_due(cfg, step) \
                    and not (spikes and cfg.train.spike.action == "rollback"):
                tally.eval_loss = row["eval_loss"] = self.evaluate(step)
                for callback in self.callbacks:
                    callback.on_eval(step, row["eval_loss"])
                completions = self.complete_prompts(step)
            self.metrics.write(row)
            self.tracker.log(row, completions=completions)
            completions = None
            for callback in self.callbacks:
                callback.on_step_end(row)
            progress.update(row)
            tally.add(row, self.tokens_per_step, last_step=cfg.train.steps)
            if decision.abort_reason:
                self.land_in_flight_save()
                raise TrainingAborted(f"step {step}: {decision.abort_reason}")
        if spikes and cfg.train.spike.action == "rollback":
            return roll_back(self, spikes)
        return None

    def _act_after_read(self, step: int, agreed: StepAgreement) -> bool:
        """Between steps, after a read: commit a finished background save, save when due, the
        kill drill, and a stop signal (save, then True: the run ends here)."""
        cfg = self.cfg
        self.checkpointer.commit_if_written(agreed.saves_written)
        saved = save_due(cfg, step)
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
        values = host_read(pack_pending(pending))
        return self._rows(pending, values, time.perf_counter() - started)[0]

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
                **({"packing_efficiency": filled} if (filled := self.batches.packing_efficiency(step)) is not None
                   else {}),
                "mem_gb": peak_memory_gb(self.device),
                "mem_reserved_gb": peak_reserved_gb(self.device),
                "host_mem_gb": host_peak_gb(),
            },
        )

    def _rows(self, pending: list[PendingStep], values: list[float], window_s: float
              ) -> list[tuple[dict, StepDecision, StepAgreement]]:
        return read_rows(pending, values, window_s, tokens_per_step=self.tokens_per_step, mfu=self._mfu, skipped_batches=self.skipped_batches,
                         diagnosis=self.diagnosis)

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

    def land_in_flight_save(self) -> None:
        """Before aborting (a decision every rank shares), commit the save still being written:
        it holds the last good state."""
        try:
            self.checkpointer.finish()
        except CheckpointError as exc:
            print0(self.info.rank, f"warning: {exc}")

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
            self.faults.in_phase(step)
            total, count = self.micro_batch_loss(to_device(batch, self.device, non_blocking=True))
            total = self.faults.scale_loss(step, total)
            last = i == len(micro_batches) - 1
            self._phase("backward", step)
            self.backend.backward(total / self.nominal_tokens_per_rank, loss_scale, last_micro_batch=last)
            sums += torch.stack([total.detach().double(), torch.as_tensor(count, device=self.device).double()])
        self._local_loss = sums
        return sums

    @property
    def nominal_tokens_per_rank(self) -> int:
        """Predictions per rank and step if every token were trained."""
        shape = self.batches.shape
        return shape.micro_batch_size * shape.grad_accum * self.cfg.train.seq_len

    def _phase(self, phase: str, step: int) -> None:
        if self.watchdog is not None:
            self.watchdog.enter(phase, step)

    def apply_gradients(self, step: int, lr: float, local_loss: Optional[torch.Tensor] = None) -> DeviceDecision:
        """Decide, then step or skip, all on the device (for FSDP2); returns the decision unread.
        local_loss: what forward_backward returned (default: its last result)."""
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
        local_loss = self._local_loss if local_loss is None else local_loss
        return self.scaler.decide(grads, counted=self.backend.primary_copy, loss_and_tokens=local_loss,
                                  nominal_tokens=self.nominal_tokens_per_rank * self.info.world_size)

    def micro_batch_loss(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's summed loss over one micro-batch's trained tokens, and their count."""
        if self.loss_fn is None:
            return loss_sum_and_count(self.backend.model, batch, self.cfg.train.loss_chunk_tokens)
        return self.loss_fn(self.backend.model, batch)

    def evaluate(self, step: int = 0) -> float:
        """Mean loss over the fixed held-out sequences (harness.train.evaluation), after step `step`."""
        self._phase("eval", step)
        self.faults.in_phase(step, "eval")
        return held_out_loss(self.backend.model, self.eval_data, self.device, self.loss_fn,
                             self.cfg.train.loss_chunk_tokens)

    def complete_prompts(self, step: int) -> Optional[list[dict]]:
        """eval.prompts completed by the model as it is now; rank 0 shows and records them."""
        if self.prompts is None:
            return None
        self._phase("eval", step)
        return complete_and_record(self.backend.model, self.prompts, self.device, step,
                                   Path(self.cfg.run.dir) if self.info.is_main else None)

    def mean_loss(self, local_loss: torch.Tensor) -> float:
        """This step's loss (the mean over the global batch's trained tokens), read now (a
        collective and a sync: for tests and tools that drive steps one by one; fit() reads it
        with the step's other values)."""
        loss_sum, tokens = host_read(self._agree_at_step_end(local_loss))[:2]
        return loss_sum / max(tokens, 1.0)

    def _agree_at_step_end(self, local_loss: torch.Tensor) -> torch.Tensor:
        """One all-reduce carries everything the ranks must agree on after a step: the summed
        loss and trained tokens, whether any rank received a stop signal (signals reach ranks at
        different moments), and whether any rank is still writing a background checkpoint. Issued
        every step, read with the step's other values (fills from host values need no read)."""
        values = torch.zeros(4, dtype=torch.float64, device=self.device)
        values[:2] = local_loss.detach()
        if self.stop is not None and self.stop.received:
            values[2] = 1.0
        if self.checkpointer.writing:
            values[3] = 1.0
        dist.all_reduce(values)
        return values

    def _mfu(self, tokens_per_s: float) -> Optional[float]:
        if self.peak_tflops is None:
            return None
        return self.flops_per_token * tokens_per_s / (self.peak_tflops * 1e12 * self.info.world_size)

    def _warn(self, message: str) -> None:
        print(f"[rank {self.info.rank}] {message}", flush=True)


