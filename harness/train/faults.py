"""Deliberate faults, for tests and drills: non-finite gradients and outputs (the skip/scale
machinery), loss spikes (train.spike), a rank that hangs (the watchdog) and a crash (resume)."""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from typing import Optional, Sequence

import torch
from torch import nn

from harness.config import FaultsConfig
from harness.errors import HarnessError

_VALUES = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


class FaultInjector:
    def __init__(self, cfg: FaultsConfig, rank: int) -> None:
        self.rank = rank
        names = cfg.nonfinite_value
        if isinstance(names, str):
            names = [names] * len(cfg.nonfinite_grad_steps)
        self.value_at = dict(zip(cfg.nonfinite_grad_steps, names))
        self.active = rank == cfg.nonfinite_grad_rank and bool(self.value_at)
        self.param = cfg.nonfinite_grad_param
        self.forward_module = cfg.nonfinite_forward_module
        self.kill_at_step = cfg.kill_at_step
        self.spike_steps = set(cfg.loss_spike_steps)
        self.spike_factor = cfg.loss_spike_factor
        self._spiked: set[int] = set()
        self.hang = (cfg.hang_at_step, cfg.hang_phase, cfg.hang_s) if cfg.hang_at_step and rank == cfg.hang_rank else None
        self.crash_at_step = cfg.crash_at_step if rank == cfg.crash_rank else 0
        self.step = 0

    def attach(self, model: nn.Module) -> None:
        """With faults.nonfinite_forward_module, corrupt that module's output instead of a gradient.
        Attach before any diagnostic hook so they see the corrupted output."""
        if self.forward_module is None:
            return
        modules = dict(model.named_modules())
        if self.forward_module not in modules:
            known = ", ".join(list(modules)[1:6])
            raise HarnessError(
                f"faults.nonfinite_forward_module={self.forward_module!r} is not a module of the model (e.g. {known}, ...)"
            )
        modules[self.forward_module].register_forward_hook(self._corrupt_output)

    def begin_step(self, step: int) -> None:
        self.step = step

    def _corrupt_output(self, module, inputs, output):
        if not self.active or self.step not in self.value_at or not module.training:
            return None
        first = output[0] if isinstance(output, tuple) else output
        corrupted = first.clone()
        corrupted.view(-1)[0] = _VALUES[self.value_at[self.step]]
        print(f"[rank {self.rank}] step {self.step}: fault injected: {self.value_at[self.step]} into the output "
              f"of {self.forward_module}", flush=True)
        return (corrupted, *output[1:]) if isinstance(output, tuple) else corrupted

    def scale_loss(self, step: int, loss):
        """faults.loss_spike_steps: the step's loss (and so its gradients) times the factor, on
        every rank, the first time the step runs: a bad batch, which a rollback leaves out."""
        if step in self.spike_steps and step not in self._spiked:
            self._spiked_now = step
            return loss * self.spike_factor
        return loss

    def end_step(self, step: int) -> None:
        if getattr(self, "_spiked_now", None) == step:
            self._spiked.add(step)

    def in_phase(self, step: int, phase: str = "forward") -> None:
        """The drills that act inside a phase (forward, eval, setup): a crash, then a hang."""
        if phase == "forward" and step and step == self.crash_at_step:
            raise RuntimeError(f"faults.crash_at_step={step}: an injected crash on rank {self.rank}")
        self.maybe_hang(step, phase)

    def maybe_hang(self, step: int, phase: str = "forward") -> None:
        """faults.hang_at_step: this rank stops making progress in `phase` (forward, eval, setup)."""
        if self.hang is None:
            return
        at_step, at_phase, seconds = self.hang
        if phase == at_phase and (phase == "setup" or step == at_step):
            where = "during setup" if phase == "setup" else f"step {step}: inside {phase}"
            print(f"[rank {self.rank}] {where}: fault injected: sleeping {seconds:g} s", flush=True)
            time.sleep(seconds)

    def maybe_kill(self, step: int) -> None:
        """The crash drill: die the way a preempted or OOM-killed job dies, with no cleanup."""
        if step == self.kill_at_step:
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    def maybe_corrupt(self, step: int, named_grads: Sequence[tuple[str, torch.Tensor]]) -> Optional[str]:
        """Write the step's value into one element of one local gradient shard.

        Returns a description ("inf into <param>") when it did, None otherwise."""
        if not self.active or step not in self.value_at or self.forward_module is not None:
            return None
        name, grad = self._pick(named_grads)
        value = self.value_at[step]
        grad.view(-1)[0] = _VALUES[value]
        return f"{value} into the gradient of {name}"

    def _pick(self, named_grads: Sequence[tuple[str, torch.Tensor]]) -> tuple[str, torch.Tensor]:
        if self.param is None:
            for name, grad in named_grads:
                if grad.numel() > 0:
                    return name, grad
            raise HarnessError("faults: this rank holds no gradient shard to corrupt", rank_local=True)
        for name, grad in named_grads:
            if name == self.param:
                if grad.numel() == 0:
                    raise HarnessError(
                        f"faults.nonfinite_grad_param={self.param!r} has no elements on this rank; pick another rank",
                        rank_local=True,
                    )
                return name, grad
        known = ", ".join(name for name, _ in list(named_grads)[:5])
        raise HarnessError(
            f"faults.nonfinite_grad_param={self.param!r} is not a parameter with a gradient (e.g. {known}, ...)"
        )
