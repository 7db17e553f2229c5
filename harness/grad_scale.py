"""The one loss-scale and gradient-clipping module, shared by every backend.

Per optimizer step, after backward has left this rank's (sharded, fp32, still scaled) gradients:

  1. per-tensor norms of the local shards (accumulated in fp64), in one pass;
  2. ONE all-reduce (MAX) of "this rank saw a non-finite value" -> the same skip decision everywhere;
  3. if finite: ONE all-reduce (SUM) of the local sums of squares -> the global norm, bit-identical
     on every rank and equal to the norm of the unsharded gradient;
  4. one multiplier that unscales and clips together (scales are powers of two, so folding 1/scale
     into the clip coefficient changes no bits), which the backend applies to its gradients;
  5. the loss scale is updated with DeepSpeed's DynamicLossScaler rules, so a user's DeepSpeed
     fp16 settings (initial_scale_power, loss_scale_window, hysteresis, consecutive_hysteresis,
     min_loss_scale) produce the same scale trajectory here.

Backends only hand over their local gradient shards and apply the multiplier; they never decide
anything themselves.
bf16 and fp32 run with a fixed scale of 1 and the same non-finite detection and skip logic.
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from harness.config import ScalerConfig


class DynamicLossScale:
    """DeepSpeed's DynamicLossScaler state machine (deepspeed/runtime/fp16/loss_scaler.py), as data.

    An overflow multiplies the scale by `backoff_factor` only when the hysteresis counter is at 1
    (otherwise it decrements the counter). The scale grows by `growth_factor` once
    `growth_interval` overflow-free steps have passed since the last overflow, exactly as
    DeepSpeed counts them. The counter refills when the scale grows, or after every overflow-free
    step with `consecutive_hysteresis`. An overflow at `min_scale` is fatal, as in DeepSpeed.
    The settings are the `scaler.*` config; the rest is state.
    """

    def __init__(self, settings: ScalerConfig) -> None:
        self.settings = settings
        self.scale = settings.init_scale
        self.iteration = 0
        self.last_overflow_iteration = -1
        self.hysteresis_left = settings.hysteresis

    def at_floor(self) -> bool:
        """True when an overflow now would have to push the scale below min_scale."""
        s = self.settings
        return s.dynamic and self.scale <= s.min_scale and (s.hysteresis == 1 or self.hysteresis_left == 1)

    def update(self, overflow: bool) -> None:
        s = self.settings
        if not s.dynamic:
            self.iteration += 1
            return
        if overflow:
            if s.hysteresis == 1 or self.hysteresis_left == 1:
                self.scale = max(self.scale * s.backoff_factor, s.min_scale)
            else:
                self.hysteresis_left -= 1
            self.last_overflow_iteration = self.iteration
        else:
            if s.consecutive_hysteresis:
                self.hysteresis_left = s.hysteresis
            # DeepSpeed counts the steps strictly between the last overflow and this one.
            stable_steps = self.iteration - self.last_overflow_iteration - 1
            if stable_steps > 0 and stable_steps % s.growth_interval == 0:
                if not s.consecutive_hysteresis:
                    self.hysteresis_left = s.hysteresis
                self.scale *= s.growth_factor
        self.iteration += 1

    _STATE = ("scale", "iteration", "last_overflow_iteration", "hysteresis_left")

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in self._STATE}

    def load_state_dict(self, state: dict) -> None:
        for name in self._STATE:
            setattr(self, name, type(getattr(self, name))(state[name]))


@dataclass(frozen=True)
class StepDecision:
    """What the guard decided for one optimizer step; identical on every rank."""

    skipped: bool
    loss_scale: float
    """The scale the step's backward ran with (before this step's update)."""
    grad_norm: Optional[float]
    """Global L2 norm of the unscaled gradient before clipping; None when the step had non-finite values."""
    clip_coef: float
    """Clipping factor applied after unscaling (1.0 when not clipped)."""
    grad_multiplier: float
    """What the backend multiplies the (scaled) gradients by: clip_coef / loss_scale."""
    local_nonfinite: tuple[tuple[str, str], ...] = ()
    """(name, "inf" or "nan") of this rank's gradient shards that held non-finite values."""
    abort_reason: Optional[str] = None
    """Set when training must stop: the scale hit its floor, or too many consecutive skips."""


class GradScaler:
    """Loss scaling, global non-finite detection, global-norm clipping and the skip decision."""

    def __init__(
        self,
        loss_scale: DynamicLossScale,
        grad_clip: float,
        max_consecutive_skips: int,
        device: torch.device,
        group: Optional[dist.ProcessGroup] = None,
    ) -> None:
        self.loss_scale = loss_scale
        self.grad_clip = grad_clip
        self.max_consecutive_skips = max_consecutive_skips
        self.device = device
        self.group = group
        self.consecutive_skips = 0
        self.total_skips = 0

    @property
    def scale(self) -> float:
        return self.loss_scale.scale

    def decide(self, named_grads: Sequence[tuple[str, torch.Tensor]]) -> StepDecision:
        """Runs on every rank with that rank's local gradient shards (disjoint across ranks).
        Reads the gradients only; the backend applies `grad_multiplier` (or skips)."""
        names = [name for name, _ in named_grads]
        grads = [grad for _, grad in named_grads]
        used_scale = self.scale
        # fp64 accumulation: an fp32 norm over millions of elements drifts by ~1e-5 relative on
        # CPU, and cannot overflow on large-but-finite gradients.
        norms = torch._foreach_norm(grads, 2, dtype=torch.float64) if grads else []
        local_sumsq = (
            torch.stack(norms).square().sum()
            if norms
            else torch.zeros((), dtype=torch.float64, device=self.device)
        )
        # With CPU offload the gradient shards live in host memory; the collectives run on the
        # process group's device (nccl takes no host tensor).
        local_sumsq = local_sumsq.to(self.device)
        found_nonfinite = (~torch.isfinite(local_sumsq)).to(torch.float32).reshape(1)
        dist.all_reduce(found_nonfinite, op=dist.ReduceOp.MAX, group=self.group)

        if found_nonfinite.item() > 0:
            stacked = torch.stack(norms) if norms else torch.zeros(0)
            finite, nan = torch.isfinite(stacked).tolist(), torch.isnan(stacked).tolist()
            local_bad = tuple((name, "nan" if is_nan else "inf") for name, ok, is_nan in zip(names, finite, nan) if not ok)
            return self._skip(used_scale, local_bad)

        global_sumsq = local_sumsq.reshape(1)
        dist.all_reduce(global_sumsq, op=dist.ReduceOp.SUM, group=self.group)
        grad_norm = math.sqrt(global_sumsq.item()) / used_scale
        clip_coef = 1.0
        if self.grad_clip > 0:
            # Same coefficient as torch.nn.utils.clip_grad_norm_.
            clip_coef = min(1.0, self.grad_clip / (grad_norm + 1e-6))
        self.loss_scale.update(overflow=False)
        self.consecutive_skips = 0
        return StepDecision(
            skipped=False,
            loss_scale=used_scale,
            grad_norm=grad_norm,
            clip_coef=clip_coef,
            grad_multiplier=clip_coef / used_scale,
        )

    def _skip(self, used_scale: float, local_bad: tuple[tuple[str, str], ...]) -> StepDecision:
        self.consecutive_skips += 1
        self.total_skips += 1
        abort = None
        if self.loss_scale.at_floor():
            abort = (
                f"fp16 loss scale is at its floor (scaler.min_scale={self.loss_scale.settings.min_scale:g}) and the "
                f"gradients still overflow; the run is diverging: lower train.lr, check the data, "
                f"or use precision=bf16"
            )
        else:
            self.loss_scale.update(overflow=True)
        if abort is None and self.consecutive_skips >= self.max_consecutive_skips:
            abort = (
                f"{self.consecutive_skips} consecutive steps had non-finite gradients "
                f"(scaler.max_consecutive_skips={self.max_consecutive_skips}); the run is diverging: "
                f"lower train.lr or check the data"
            )
        return StepDecision(
            skipped=True,
            loss_scale=used_scale,
            grad_norm=None,
            clip_coef=0.0,
            grad_multiplier=0.0,
            local_nonfinite=local_bad,
            abort_reason=abort,
        )

    def state_dict(self) -> dict:
        return {
            "loss_scale": self.loss_scale.state_dict(),
            "consecutive_skips": self.consecutive_skips,
            "total_skips": self.total_skips,
        }

    def load_state_dict(self, state: dict) -> None:
        self.loss_scale.load_state_dict(state["loss_scale"])
        self.consecutive_skips = int(state["consecutive_skips"])
        self.total_skips = int(state["total_skips"])


def build_grad_scaler(
    scaler_cfg: ScalerConfig, uses_loss_scaling: bool, grad_clip: float, device: torch.device
) -> GradScaler:
    """fp16: the configured dynamic (or static) scale. bf16/fp32: a fixed scale of 1."""
    settings = scaler_cfg if uses_loss_scaling else dataclasses.replace(scaler_cfg, init_scale=1.0, dynamic=False)
    return GradScaler(DynamicLossScale(settings), grad_clip, scaler_cfg.max_consecutive_skips, device)
