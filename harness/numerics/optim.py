"""AdamW with the usual no-decay groups, and the learning-rate schedule.

The learning rate is a pure function of the step number (skipped steps included), so it is the
same on every rank and after any resume.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from harness.config import TrainConfig
from harness.errors import HarnessError


def param_groups(model: nn.Module, weight_decay: float,
                 full_shape: Callable[[torch.Tensor], torch.Size] = lambda p: p.shape) -> list[dict]:
    """Decay matrices (weights of linear layers and embeddings); leave biases and norm gains alone.
    `full_shape`: a parameter's unsharded shape (the backend's: a ZeRO-3 parameter built
    partitioned is an empty placeholder)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        ndim = len(full_shape(param))
        (decay if ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_adamw(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    # Fused (one kernel per step, on CUDA and CPU alike) is the fastest AdamW, and the one that
    # takes a device-side skip flag (`found_inf`), so a skipped step needs no host decision.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)


def check_skips_on_device(optimizer: torch.optim.Optimizer) -> None:
    """FSDP2 skips a step by handing the optimizer the device-side skip flag (`found_inf`), as
    torch.amp.GradScaler does; only an optimizer whose step honours it may be used there. torch's
    foreach and single-tensor AdamW refuse the flag; an optimizer that silently ignored it would
    apply a skipped step's non-finite update."""
    fused = bool(optimizer.defaults.get("fused"))
    if not (fused and getattr(optimizer, "_step_supports_amp_scaling", False)):
        raise HarnessError(
            f"{type(optimizer).__name__}(fused={fused}) cannot skip a step on the device (it does not take "
            "found_inf); FSDP2 needs one that does: torch.optim.AdamW(..., fused=True)"
        )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warmup, then the decay."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, max(0.0, progress))
    if cfg.lr_schedule == "linear":
        return cfg.lr - (cfg.lr - cfg.min_lr) * progress
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ensure_adam_state(optimizer: torch.optim.Optimizer, params: Optional[Iterable[torch.Tensor]] = None,
                      steps_in_python: bool = False) -> None:
    """Create AdamW's state (zero moments, step 0) where no step has created it yet, exactly as
    AdamW's first step would, so a checkpoint can be loaded into a fresh optimizer. `params`
    defaults to the optimizer's param groups (DeepSpeed ZeRO-3 fills those only during step).
    `steps_in_python`: the optimizer counts `step` as a Python int (DeepSpeed's CPU Adam hands it
    to its C++ kernel), as the backend that built it knows."""
    on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
    if params is None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        if "exp_avg" in optimizer.state.get(p, {}):
            continue
        if steps_in_python:
            step = 0
        else:
            step = torch.zeros((), dtype=torch.float32, device=p.device) if on_device else torch.tensor(0.0)
        optimizer.state[p] = {
            "step": step,
            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
        }


def adam_step_count(optimizer: torch.optim.Optimizer) -> int:
    """How many steps AdamW has applied (skipped steps excluded); the same for every parameter."""
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def set_adam_step_count(optimizer: torch.optim.Optimizer, count: int) -> None:
    for state in optimizer.state.values():
        if "step" not in state:
            continue
        if isinstance(state["step"], torch.Tensor):
            state["step"].fill_(count)
        else:
            state["step"] = count
