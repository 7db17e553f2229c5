"""One step's values on their way from the device to a metrics row.

The host issues steps without waiting (`PendingStep`: every value still on the device), then reads
the steps since the last read in one transfer (`pack_pending`) and turns each into its metrics
row (`read_rows`). `Tally` accumulates what the run summary reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from harness.numerics.diagnose import OverflowDiagnosis
from harness.numerics.grad_scale import DeviceDecision, StepDecision


@dataclass(frozen=True)
class StepAgreement:
    """What every rank learned, identically, at the end of a step: flags each rank raises on its
    own, summed over ranks by the step's one decision all-reduce (they ride in its packet)."""

    stop: bool
    """Some rank received SIGTERM/SIGUSR1: checkpoint after this step and exit."""
    saves_written: bool
    """No rank is still writing a background checkpoint: the one in flight can be committed."""

    @staticmethod
    def riders(stop_received: bool, still_writing: bool, device: torch.device) -> torch.Tensor:
        """This rank's flags, as the decision's all-reduce carries them (signals reach ranks at
        different moments; each rank's background writer finishes at its own). Zeros filled on
        the device: torch.tensor(list, device=cuda) would copy from pageable host memory and wait
        for the stream, one host sync a step."""
        flags = torch.zeros(2, dtype=torch.float64, device=device)
        if stop_received:
            flags[0] = 1.0
        if still_writing:
            flags[1] = 1.0
        return flags

    @classmethod
    def from_riders(cls, summed: tuple[float, ...]) -> "StepAgreement":
        stopping, writing = summed
        return cls(stop=stopping > 0, saves_written=writing == 0)


@dataclass
class PendingStep:
    """A step the host has issued but not yet read: its values stay on the device until then."""

    step: int
    lr: float
    decision: DeviceDecision
    host_fields: dict
    """Metrics known on the host when the step was issued (tokens, memory peaks, counters)."""


@dataclass(frozen=True)
class StepRecord:
    """One step as the host read it back."""

    row: dict
    """Its metrics row."""
    decision: StepDecision
    agreement: StepAgreement

    @property
    def step(self) -> int:
        return self.row["step"]


def pack_pending(pending: list[PendingStep]) -> torch.Tensor:
    """Every pending step's values in one vector: one device->host transfer reads them all."""
    return torch.cat([item.decision.packed() for item in pending])


@dataclass
class Tally:
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


def read_rows(pending: list[PendingStep], values: list[float], window_s: float, *,
              tokens_per_step: int, mfu: Callable[[float], Optional[float]], skipped_batches: int,
              diagnosis: OverflowDiagnosis) -> list[StepRecord]:
    """The records of the steps read together (`values` is pack_pending(pending), read), each
    with its own values. The host waited for the device once for all of them, so each is given
    the window's mean step time."""
    step_time = window_s / len(pending)
    tokens_per_s = tokens_per_step / step_time
    records, offset = [], 0
    for item in pending:
        width = item.decision.packed_width
        decision = item.decision.unpack(values[offset:offset + width])
        offset += width
        row = {
            "step": item.step,
            "loss": decision.mean_loss,
            "lr": item.lr,
            "grad_norm": decision.grad_norm,
            "loss_scale": decision.loss_scale,
            "skipped": decision.skipped,
            "tokens": item.host_fields["tokens"],
            "trained_tokens": int(decision.trained_tokens),
            "tokens_per_s": tokens_per_s,
            "mfu": mfu(tokens_per_s),
            **{k: v for k, v in item.host_fields.items() if k != "tokens"},
            "step_time_s": step_time,
            "spike": decision.spike,
            "skipped_batches": skipped_batches,
        }
        if decision.skipped and (decision.overflow or not decision.spike):
            row.update(diagnosis.on_skip(item.step, decision, decision.scale_after))
        records.append(StepRecord(row, decision, StepAgreement.from_riders(decision.riders)))
    return records
