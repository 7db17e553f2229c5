"""Deliberate faults, for tests and drills: non-finite gradients and outputs (the skip/scale
machinery), loss spikes (train.spike), a rank that hangs (the watchdog) and a crash (resume).

The loop knows nothing of them: the injector wraps what the loop uses and listens where it
already speaks. It wraps the training loss (`wrap_loss`: a spike) and the backend (`wrap_backend`:
a non-finite gradient shard), hooks a module's forward (`attach`: a non-finite output), hears
the loop's phases like the watchdog does (`enter`: a crash or a hang in forward, eval or setup),
and runs between steps like any hook (`between_steps`: the kill drill)."""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from harness.config import FaultsConfig
from harness.errors import HarnessError
from harness.numerics.grad_scale import GradShard

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
        self._spiking: Optional[int] = None
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

    def enter(self, phase: str, step: int) -> None:
        """The loop entered `phase` of step `step` (it tells the watchdog the same)."""
        if phase == "data":  # a step begins: the previous one's spike, if any, has run
            if self._spiking is not None:
                self._spiked.add(self._spiking)
                self._spiking = None
            self.step = step
        self.in_phase(step, phase)

    def _corrupt_output(self, module, inputs, output):
        if not self.active or self.step not in self.value_at or not module.training:
            return None
        first = output[0] if isinstance(output, tuple) else output
        corrupted = first.clone()
        corrupted.view(-1)[0] = _VALUES[self.value_at[self.step]]
        print(f"[rank {self.rank}] step {self.step}: fault injected: {self.value_at[self.step]} into the output "
              f"of {self.forward_module}", flush=True)
        return (corrupted, *output[1:]) if isinstance(output, tuple) else corrupted

    def wrap_loss(self, loss: Callable[[nn.Module, Any], tuple]) -> Callable[[nn.Module, Any], tuple]:
        """faults.loss_spike_steps: the step's loss (and so its gradients) times the factor, on
        every rank, the first time the step runs: a bad batch, which a rollback leaves out."""
        if not self.spike_steps:
            return loss

        def spiking(model: nn.Module, batch: Any) -> tuple:
            total, count = loss(model, batch)
            if self.step in self.spike_steps and self.step not in self._spiked:
                self._spiking = self.step
                total = total * self.spike_factor
            return total, count

        return spiking

    def wrap_backend(self, backend: Any) -> Any:
        """faults.nonfinite_grad_steps: the backend, whose gradient shards as the loop reads them for
        the decision carry the step's value in one element on faults.nonfinite_grad_rank."""
        if not self.active or self.forward_module is not None:
            return backend
        return _CorruptedGradients(backend, self)

    def between_steps(self, step: int) -> None:
        """After step `step` was read and checkpointed when due: the kill drill."""
        self.maybe_kill(step)

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

    def maybe_corrupt(self, step: int, shards: Sequence[GradShard]) -> Optional[str]:
        """Write the step's value into one element of one local gradient shard.

        Returns a description ("inf into <param>") when it did, None otherwise."""
        if step not in self.value_at:
            return None
        name, grad = self._pick(shards)
        value = self.value_at[step]
        grad.view(-1)[0] = _VALUES[value]
        return f"{value} into the gradient of {name}"

    def _pick(self, shards: Sequence[GradShard]) -> tuple[str, torch.Tensor]:
        if self.param is None:
            for name, grad, _ in shards:
                if grad.numel() > 0:
                    return name, grad
            raise HarnessError("faults: this rank holds no gradient shard to corrupt", rank_local=True)
        for name, grad, _ in shards:
            if name == self.param:
                if grad.numel() == 0:
                    raise HarnessError(
                        f"faults.nonfinite_grad_param={self.param!r} has no elements on this rank; pick another rank",
                        rank_local=True,
                    )
                return name, grad
        known = ", ".join(shard.name for shard in list(shards)[:5])
        raise HarnessError(
            f"faults.nonfinite_grad_param={self.param!r} is not a parameter with a gradient (e.g. {known}, ...)"
        )


class _CorruptedGradients:
    """A backend whose gradient shards, read for the step's decision, carry the injected value;
    everything else is the backend's own."""

    def __init__(self, backend: Any, faults: FaultInjector) -> None:
        self._backend = backend
        self._faults = faults

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def local_grad_shards(self) -> list[GradShard]:
        grads = self._backend.local_grad_shards()
        corrupted = self._faults.maybe_corrupt(self._faults.step, grads)
        if corrupted:
            print(f"[rank {self._faults.rank}] step {self._faults.step}: fault injected: {corrupted}", flush=True)
        return grads
