"""The one loss-scale and gradient-clipping module, shared by every backend.

Per optimizer step, after backward has left this rank's (sharded, fp32, still scaled) gradients:

  1. per-tensor norms of the local shards (accumulated in fp64), in one pass;
  2. ONE all-reduce (SUM) of the local sums of squares, the local loss sums and the local
     trained-token counts: inf and nan propagate through a sum, so the result is both the skip
     decision (non-finite anywhere) and, when finite, the global norm, bit-identical on every rank
     and equal to the norm of the unsharded gradient; the global mean loss feeds the loss-spike
     check (harness.numerics.spikes). Whatever else the ranks must agree on after a step (the
     trainer's stop and checkpoint flags) rides in the same packet (`riders`): one collective a
     step decides it all;
  3. one multiplier that unscales, normalizes and clips together, which the backend applies to its
     gradients. Backward ran on each rank's loss sum over a fixed token count (the tokens of the
     step if every one were trained), so the gradient becomes the global mean's by nominal /
     trained tokens, a count only known once summed over ranks: it rides in the same all-reduce.
     Scales are powers of two, so folding 1/scale into the coefficient changes no bits;
  4. the loss scale is updated with DeepSpeed's DynamicLossScaler rules, so a user's DeepSpeed
     fp16 settings (initial_scale_power, loss_scale_window, hysteresis, consecutive_hysteresis,
     min_loss_scale) produce the same scale trajectory here.

All of it stays on the device: the decision is a set of tensors (`DeviceDecision`) that a backend
applies without the host waiting (FSDP2: the multiplier and fused AdamW's `found_inf`, as
torch.amp.GradScaler does), and the host reads it (`read()`, or batched by the trainer) only when it
logs. An abort (the scale at its floor, too many consecutive skips) latches: every later step is
skipped unchanged until the host reads it and stops the run at the step where it happened.

Backends only hand over their local gradient shards and apply the decision; they never decide
anything themselves.
bf16 and fp32 run with a fixed scale of 1 and the same non-finite detection and skip logic.

Longer than 400 lines because the decision, its packed device form and DeepSpeed's scale state
machine are read together: a newcomer looking for where a step is skipped finds all of it here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.distributed as dist

from harness.config import ScalerConfig
from harness.numerics.spikes import SpikeGuard
from harness.observe.step_counter import host_read


class GradShard(NamedTuple):
    """One parameter's gradient as this rank holds it, as a backend hands it to the decision."""

    name: str
    grad: torch.Tensor
    """This rank's local part (writable in place)."""
    counted: bool = True
    """Whether this part is the first copy of its elements (harness.parallel.mesh decides, per tensor,
    from its placements): a copy (an HSDP replica's) adds nothing to the global norm, so every
    element counts once."""


class DynamicLossScale:
    """DeepSpeed's DynamicLossScaler state machine (deepspeed/runtime/fp16/loss_scaler.py), on the device.

    An overflow multiplies the scale by `backoff_factor` only when the hysteresis counter is at 1
    (otherwise it decrements the counter). The scale grows by `growth_factor` once
    `growth_interval` overflow-free steps have passed since the last overflow, exactly as
    DeepSpeed counts them. The counter refills when the scale grows, or after every overflow-free
    step with `consecutive_hysteresis`. An overflow at `min_scale` is fatal, as in DeepSpeed.
    The settings are the `scaler.*` config; the state is 0-dim tensors (fp64 scale, int64
    counters) updated without the host reading them. The properties read them (a sync).
    """

    def __init__(self, settings: ScalerConfig, device: Optional[torch.device] = None) -> None:
        self.settings = settings
        self.device = device or torch.device("cpu")
        self.scale_t = torch.tensor(settings.init_scale, dtype=torch.float64, device=self.device)
        self.iteration_t = torch.tensor(0, dtype=torch.int64, device=self.device)
        self.last_overflow_iteration_t = torch.tensor(-1, dtype=torch.int64, device=self.device)
        self.hysteresis_left_t = torch.tensor(settings.hysteresis, dtype=torch.int64, device=self.device)

    @property
    def scale(self) -> float:
        return host_read(self.scale_t)

    @property
    def iteration(self) -> int:
        return host_read(self.iteration_t)

    @property
    def hysteresis_left(self) -> int:
        return host_read(self.hysteresis_left_t)

    def at_floor_t(self) -> torch.Tensor:
        """True when an overflow now would have to push the scale below min_scale."""
        s = self.settings
        if not s.dynamic:
            return torch.zeros((), dtype=torch.bool, device=self.device)
        spent = self.hysteresis_left_t == 1 if s.hysteresis != 1 else torch.ones((), dtype=torch.bool, device=self.device)
        return (self.scale_t <= s.min_scale) & spent

    def at_floor(self) -> bool:
        return bool(host_read(self.at_floor_t()))

    def update(self, overflow: Union[bool, torch.Tensor], active: Optional[torch.Tensor] = None) -> None:
        """One step of the state machine; with `active` false (a tensor) the state stays as it is."""
        s = self.settings
        overflow = torch.as_tensor(overflow, device=self.device)
        keep = torch.ones((), dtype=torch.bool, device=self.device) if active is None else active
        if s.dynamic:
            may_back_off = torch.ones_like(overflow) if s.hysteresis == 1 else self.hysteresis_left_t == 1
            back_off = overflow & may_back_off
            scale = torch.where(back_off, torch.clamp(self.scale_t * s.backoff_factor, min=s.min_scale), self.scale_t)
            hysteresis = torch.where(overflow & ~back_off, self.hysteresis_left_t - 1, self.hysteresis_left_t)
            last_overflow = torch.where(overflow, self.iteration_t, self.last_overflow_iteration_t)
            # DeepSpeed counts the steps strictly between the last overflow and this one.
            stable_steps = self.iteration_t - self.last_overflow_iteration_t - 1
            grow = ~overflow & (stable_steps > 0) & (stable_steps % s.growth_interval == 0)
            refill = ~overflow if s.consecutive_hysteresis else grow
            hysteresis = torch.where(refill, torch.full_like(hysteresis, s.hysteresis), hysteresis)
            scale = torch.where(grow, scale * s.growth_factor, scale)
            self.scale_t = torch.where(keep, scale, self.scale_t)
            self.hysteresis_left_t = torch.where(keep, hysteresis, self.hysteresis_left_t)
            self.last_overflow_iteration_t = torch.where(keep, last_overflow, self.last_overflow_iteration_t)
        self.iteration_t = self.iteration_t + keep.to(torch.int64)

    _STATE = ("scale", "iteration", "last_overflow_iteration", "hysteresis_left")

    def state_dict(self) -> dict:
        values = host_read(torch.stack([getattr(self, f"{name}_t").double() for name in self._STATE]))
        return {name: type_(value) for (name, type_), value in zip(zip(self._STATE, (float, int, int, int)), values)}

    def load_state_dict(self, state: dict) -> None:
        for name in self._STATE:
            current = getattr(self, f"{name}_t")
            setattr(self, f"{name}_t", torch.tensor(state[name], dtype=current.dtype, device=self.device))


@dataclass(frozen=True)
class StepDecision:
    """What the guard decided for one optimizer step, as the host reads it; identical on every rank."""

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
    scale_after: float = 1.0
    """The loss scale after this step's update (what the next backward uses)."""
    spike: bool = False
    """The step's mean loss was a spike (train.spike): non-finite, or far above its running median."""
    loss_median: float = math.nan
    """The running median of the loss the spike check compared with."""
    overflow: bool = False
    """Some rank's gradients held inf/NaN."""
    loss_sum: float = 0.0
    """The step's summed token losses over every rank (or, given per-rank mean losses, their sum)."""
    trained_tokens: float = 0.0
    """The step's trained tokens over every rank (0 when per-rank mean losses were given)."""
    riders: tuple[float, ...] = ()
    """The riders' sums over every rank, in the order given to decide()."""

    @property
    def mean_loss(self) -> float:
        """The step's loss: the mean over the global batch's trained tokens."""
        return self.loss_sum / max(self.trained_tokens, 1.0)


# The scalars a DeviceDecision packs for the host, in order.
_PACKED = ("skip", "loss_scale", "grad_norm", "clip_coef", "grad_multiplier", "abort", "consecutive_skips", "scale_after",
           "spike", "loss_median", "overflow", "loss_sum", "trained_tokens")
_NO_ABORT, _FLOOR, _CONSECUTIVE = 0, 1, 2


@dataclass(frozen=True)
class DeviceDecision:
    """One step's decision as 0-dim device tensors; no value has been read by the host."""

    skip: torch.Tensor
    """bool: skip this step (non-finite gradients on some rank, or an abort latched earlier)."""
    loss_scale: torch.Tensor
    grad_norm: torch.Tensor
    clip_coef: torch.Tensor
    grad_multiplier: torch.Tensor
    """fp64: clip_coef / loss_scale, or 0 on a skipped step."""
    abort: torch.Tensor
    consecutive_skips: torch.Tensor
    scale_after: torch.Tensor
    spike: torch.Tensor
    """bool: the step's loss was a spike (skipped too, unless train.spike.action=warn)."""
    loss_median: torch.Tensor
    """The running median the step's loss was compared with (NaN before the window fills)."""
    overflow: torch.Tensor
    """bool: some rank's gradients held inf/NaN (the loss scale's business, unlike a spike)."""
    loss_sum: torch.Tensor
    trained_tokens: torch.Tensor
    riders: torch.Tensor
    """fp64: the riders' global sums."""
    local_norms: torch.Tensor
    """This rank's per-tensor gradient norms (fp64), to name non-finite tensors when read."""
    names: tuple[str, ...]
    settings: ScalerConfig
    max_consecutive_skips: int

    def packed(self) -> torch.Tensor:
        """Everything the host needs, in one fp64 vector (one transfer, batched across steps)."""
        scalars = torch.stack([getattr(self, name).to(torch.float64) for name in _PACKED])
        return torch.cat([scalars, self.riders, self.local_norms.to(scalars.device)])

    @property
    def packed_width(self) -> int:
        return len(_PACKED) + len(self.riders) + len(self.names)

    def unpack(self, values: Sequence[float]) -> StepDecision:
        skip, loss_scale, grad_norm, clip_coef, multiplier, abort, consecutive, scale_after, spike, median, overflow, \
            loss_sum, trained_tokens = values[: len(_PACKED)]
        riders = tuple(values[len(_PACKED):len(_PACKED) + len(self.riders)])
        norms = values[len(_PACKED) + len(self.riders):]
        local_bad = tuple(
            (name, "nan" if math.isnan(norm) else "inf") for name, norm in zip(self.names, norms) if not math.isfinite(norm)
        )
        return StepDecision(
            skipped=bool(skip),
            loss_scale=loss_scale,
            grad_norm=None if skip else grad_norm,
            clip_coef=0.0 if skip else clip_coef,
            grad_multiplier=0.0 if skip else multiplier,
            local_nonfinite=local_bad if skip else (),
            abort_reason=self._abort_reason(int(abort), int(consecutive)),
            scale_after=scale_after,
            spike=bool(spike),
            loss_median=median,
            overflow=bool(overflow),
            loss_sum=loss_sum,
            trained_tokens=trained_tokens,
            riders=riders,
        )

    def read(self) -> StepDecision:
        """The host's view (one sync)."""
        return self.unpack(host_read(self.packed()))

    def _abort_reason(self, code: int, consecutive: int) -> Optional[str]:
        if code == _FLOOR:
            return (
                f"fp16 loss scale is at its floor (scaler.min_scale={self.settings.min_scale:g}) and the "
                f"gradients still overflow; the run is diverging: lower train.lr, check the data, "
                f"or use precision=bf16"
            )
        if code == _CONSECUTIVE:
            return (
                f"{consecutive} consecutive steps had non-finite gradients "
                f"(scaler.max_consecutive_skips={self.max_consecutive_skips}); the run is diverging: "
                f"lower train.lr or check the data"
            )
        return None


class GradScaler:
    """Loss scaling, global non-finite detection, global-norm clipping and the skip decision."""

    def __init__(
        self,
        loss_scale: DynamicLossScale,
        grad_clip: float,
        max_consecutive_skips: int,
        device: torch.device,
        group: Optional[dist.ProcessGroup] = None,
        spikes: Optional[SpikeGuard] = None,
    ) -> None:
        self.loss_scale = loss_scale
        self.spikes = spikes
        self.grad_clip = grad_clip
        self.max_consecutive_skips = max_consecutive_skips
        self.device = device
        self.group = group
        self.consecutive_skips_t = torch.zeros((), dtype=torch.int64, device=device)
        self.total_skips_t = torch.zeros((), dtype=torch.int64, device=device)
        self.aborted_t = torch.zeros((), dtype=torch.bool, device=device)
        """Latched by an abort: every later step is skipped and changes nothing."""

    @property
    def fixed_scale_of_one(self) -> bool:
        """bf16/fp32: the loss is never multiplied (known without reading the device)."""
        s = self.loss_scale.settings
        return not s.dynamic and s.init_scale == 1.0

    @property
    def scale_tensor(self) -> torch.Tensor:
        """The loss scale the next backward uses, on the device."""
        return self.loss_scale.scale_t

    @property
    def scale(self) -> float:
        return self.loss_scale.scale

    @property
    def consecutive_skips(self) -> int:
        return host_read(self.consecutive_skips_t)

    @property
    def total_skips(self) -> int:
        return host_read(self.total_skips_t)

    def decide(self, shards: Sequence[GradShard],
               loss: Optional[torch.Tensor] = None, loss_and_tokens: Optional[torch.Tensor] = None,
               nominal_tokens: Optional[float] = None, riders: Optional[torch.Tensor] = None) -> DeviceDecision:
        """Runs on every rank with that rank's local gradient shards (disjoint across ranks where
        `counted`; a shard that is not counted is a copy of another rank's: an HSDP replica's).
        The step's loss, either
        `loss` (this rank's mean loss: the step's loss is the mean over ranks), or
        `loss_and_tokens` (this rank's (loss sum, trained tokens): the step's loss is the global
        sum over the global count) with `nominal_tokens` (the global count backward divided by:
        the gradients are rescaled by nominal / trained tokens). `riders`: a vector of this rank's
        values that every rank needs summed (flags), carried by the same all-reduce. Reads the
        gradients only; the backend applies the decision. Nothing is read by the host."""
        names = tuple(shard.name for shard in shards)
        grads = [shard.grad for shard in shards]
        used_scale = self.scale_tensor
        # fp64 accumulation: an fp32 norm over millions of elements drifts by ~1e-5 relative on
        # CPU, and cannot overflow on large-but-finite gradients.
        norms = torch._foreach_norm(grads, 2, dtype=torch.float64) if grads else []
        local_norms = torch.stack(norms) if norms else torch.zeros(0, dtype=torch.float64, device=self.device)
        # With CPU offload the gradient shards live in host memory; the collective runs on the
        # process group's device (nccl takes no host tensor).
        sumsq = _sum_of_squares(norms, [shard.counted for shard in shards], local_norms).to(self.device).reshape(1)
        riders = torch.zeros(0, dtype=torch.float64, device=self.device) if riders is None else \
            riders.to(device=self.device, dtype=torch.float64).reshape(-1)
        packet = torch.cat([sumsq, self._loss_packet(loss, loss_and_tokens), riders])
        dist.all_reduce(packet, op=dist.ReduceOp.SUM, group=self.group)
        sumsq = packet[:1]
        nonfinite = ~torch.isfinite(sumsq[0])
        if loss_and_tokens is not None:
            trained = packet[2].clamp(min=1.0)
            mean_loss = packet[1] / trained
            normalize = nominal_tokens / trained if nominal_tokens else torch.ones_like(trained)
        else:
            mean_loss = packet[1] / dist.get_world_size(self.group)
            normalize = torch.ones_like(packet[1])
        no_spike = torch.zeros((), dtype=torch.bool, device=self.device)
        spike, median = no_spike, torch.full((), math.nan, dtype=torch.float64, device=self.device)
        if self.spikes is not None and (loss is not None or loss_and_tokens is not None):
            spike, median = self.spikes.check(mean_loss)

        already_aborted = self.aborted_t
        fresh = ~already_aborted
        floor_abort = nonfinite & fresh & self.loss_scale.at_floor_t()
        self.loss_scale.update(nonfinite, active=fresh & ~floor_abort)
        counted_skip = nonfinite & fresh
        self.consecutive_skips_t = torch.where(
            fresh, torch.where(nonfinite, self.consecutive_skips_t + 1, torch.zeros_like(self.consecutive_skips_t)),
            self.consecutive_skips_t,
        )
        self.total_skips_t = self.total_skips_t + counted_skip.to(torch.int64)
        too_many = counted_skip & ~floor_abort & (self.consecutive_skips_t >= self.max_consecutive_skips)
        abort = torch.where(floor_abort, _FLOOR, torch.where(too_many, _CONSECUTIVE, _NO_ABORT))
        self.aborted_t = already_aborted | (abort != _NO_ABORT)

        # A spike's skip leaves the loss scale and the overflow counters alone: it is not an overflow.
        skip = nonfinite | already_aborted | (spike if self.spikes is not None and self.spikes.skips else no_spike)
        unscale = normalize / used_scale
        grad_norm = sumsq[0].sqrt() * unscale
        clip_coef = torch.ones_like(grad_norm)
        if self.grad_clip > 0:
            # Same coefficient as torch.nn.utils.clip_grad_norm_.
            clip_coef = torch.clamp(self.grad_clip / (grad_norm + 1e-6), max=1.0)
        multiplier = torch.where(skip, torch.zeros_like(clip_coef), clip_coef * unscale)
        return DeviceDecision(
            skip=skip,
            loss_scale=used_scale,
            grad_norm=grad_norm,
            clip_coef=clip_coef,
            grad_multiplier=multiplier,
            abort=abort,
            consecutive_skips=self.consecutive_skips_t,
            scale_after=self.scale_tensor,
            spike=spike,
            loss_median=median,
            overflow=nonfinite,
            loss_sum=packet[1],
            trained_tokens=packet[2],
            riders=packet[3:],
            local_norms=local_norms,
            names=names,
            settings=self.loss_scale.settings,
            max_consecutive_skips=self.max_consecutive_skips,
        )

    def _loss_packet(self, loss: Optional[torch.Tensor], loss_and_tokens: Optional[torch.Tensor]) -> torch.Tensor:
        """(loss, tokens) of this rank as the all-reduce carries them, fp64."""
        if loss_and_tokens is not None:
            return loss_and_tokens.detach().to(device=self.device, dtype=torch.float64).reshape(2)
        packet = torch.zeros(2, dtype=torch.float64, device=self.device)
        if loss is not None:
            packet[0] = loss.detach().to(device=self.device, dtype=torch.float64).reshape(())
        return packet

    def state_dict(self) -> dict:
        return {
            "loss_scale": self.loss_scale.state_dict(),
            "consecutive_skips": self.consecutive_skips,
            "total_skips": self.total_skips,
        }

    def load_state_dict(self, state: dict) -> None:
        self.loss_scale.load_state_dict(state["loss_scale"])
        self.consecutive_skips_t.fill_(int(state["consecutive_skips"]))
        self.total_skips_t.fill_(int(state["total_skips"]))


def _sum_of_squares(norms: list[torch.Tensor], counted: list[bool], local_norms: torch.Tensor) -> torch.Tensor:
    """The squared norms of the counted shards, summed. A copy adds 0 to the sum, so each element
    counts once, but a non-finite value in it still poisons the sum (0 * inf = nan): the same
    decision on every rank. (A replica's loss and tokens are its own data's and count in full.)
    Selected in Python, not by a mask tensor: a host-built mask would be a copy to the device
    every step."""
    if all(counted):
        return local_norms.square().sum()
    first = [norm for norm, mine in zip(norms, counted) if mine]
    copies = [norm for norm, mine in zip(norms, counted) if not mine]
    copies_sum = torch.stack(copies).square().sum() * 0
    return torch.stack(first).square().sum() + copies_sum if first else copies_sum


def build_grad_scaler(
    scaler_cfg: ScalerConfig, uses_loss_scaling: bool, grad_clip: float, device: Optional[torch.device],
    spikes: Optional[SpikeGuard] = None,
) -> GradScaler:
    """fp16: the configured dynamic (or static) scale. bf16/fp32: a fixed scale of 1."""
    settings = scaler_cfg if uses_loss_scaling else dataclasses.replace(scaler_cfg, init_scale=1.0, dynamic=False)
    device = device or torch.device("cpu")
    return GradScaler(DynamicLossScale(settings, device), grad_clip, scaler_cfg.max_consecutive_skips, device,
                      spikes=spikes)
