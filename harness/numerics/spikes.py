"""Loss spikes, decided on the device with the step's other decisions (train.spike).

The decision all-reduce (harness.numerics.grad_scale) carries each rank's loss beside its sum of squares, so
every rank sees the same mean loss before the optimizer step. A spike is a mean loss above
`factor` x the median of the last `window` accepted losses, or a non-finite loss on any rank (a
NaN or inf propagates through the sum). The history is a ring of fp64 values on the device: no
host read is needed to decide, so a skipped spike costs no sync; spikes are kept out of it, so one
bad step cannot raise the bar for the next. The host learns of a spike when it reads the step
(`spike: true` on its row) and, for train.spike.action=rollback, acts then (harness.train.rollback).
"""

from __future__ import annotations

import torch

from harness.config import SpikeConfig
from harness.observe.step_counter import host_read


class SpikeGuard:
    def __init__(self, cfg: SpikeConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.history = torch.full((cfg.window,), float("nan"), dtype=torch.float64, device=device)
        self.position = torch.zeros((), dtype=torch.int64, device=device)
        self.filled = torch.zeros((), dtype=torch.int64, device=device)
        self._slots = torch.arange(cfg.window, device=device)

    @property
    def skips(self) -> bool:
        """Whether a spike's update is skipped (skip and rollback) or only reported (warn)."""
        return self.cfg.action != "warn"

    def check(self, mean_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whether this step's loss (the same on every rank) is a spike, and the running median it
        was compared with; records the loss in the history when it is not a spike. 0-dim tensors,
        nothing read by the host."""
        loss = mean_loss.to(torch.float64)
        median = torch.nanmedian(self.history)
        full = self.filled >= self.cfg.window
        spike = ~torch.isfinite(loss) | (full & (loss > self.cfg.factor * median))
        keep = ~spike
        self.history = torch.where((self._slots == self.position) & keep, loss, self.history)
        self.position = torch.where(keep, (self.position + 1) % self.cfg.window, self.position)
        self.filled = torch.where(keep, torch.clamp(self.filled + 1, max=self.cfg.window), self.filled)
        return spike, median

    def state_dict(self) -> dict:
        values = torch.cat([self.history, self.position.reshape(1).double(), self.filled.reshape(1).double()])
        values = host_read(values)
        history = [v if v == v else None for v in values[:-2]]  # JSON has no NaN: empty slots are null
        return {"history": history, "position": int(values[-2]), "filled": int(values[-1])}

    def load_state_dict(self, state: dict) -> None:
        history = list(state.get("history", []))[: self.cfg.window]
        if len(history) != self.cfg.window:  # the window changed between runs: start it afresh
            return
        self.history = torch.tensor([float("nan") if v is None else v for v in history], dtype=torch.float64,
                                    device=self.device)
        self.position = torch.tensor(int(state["position"]), dtype=torch.int64, device=self.device)
        self.filled = torch.tensor(int(state["filled"]), dtype=torch.int64, device=self.device)


def spike_warning(cfg: SpikeConfig, step: int, loss: float, median: float) -> str:
    """The console line for a spike the host has just read."""
    action = {"warn": "applied anyway (train.spike.action=warn)", "skip": "update skipped",
              "rollback": "update skipped; rolling back"}[cfg.action]
    against = (f"{loss / median:.1f}x the median {median:.4g} of the last {cfg.window} steps"
               if median == median and median > 0 else "not finite on some rank")
    return f"warning: step {step}: loss spike: {loss:.4g}, {against}; {action}"
