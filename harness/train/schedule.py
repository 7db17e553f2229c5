"""When the loop reads the device, evaluates and saves: functions of the config and the step
alone, so every rank acts at the same steps."""

from __future__ import annotations

from harness.config import Config


def _due(every: int, step: int) -> bool:
    return bool(every) and step % every == 0


def reads_after(cfg: Config, step: int, start_step: int) -> bool:
    """Steps after which the host reads the device: the first, every log.every-th, the last, and
    those where it acts (checkpoint, evaluation, a kill drill). The same on every rank, so a stop
    signal or an abort is acted on by all ranks at the same step."""
    return (
        step in (start_step + 1, cfg.train.steps, cfg.faults.kill_at_step)
        or _due(cfg.log.every, step) or _due(cfg.checkpoint.every, step) or _due(cfg.eval.every, step)
    )


def eval_due(cfg: Config, step: int) -> bool:
    """Every eval.every steps and at the last step (eval.every=0: never)."""
    return bool(cfg.eval.every) and (_due(cfg.eval.every, step) or step == cfg.train.steps)


def save_due(cfg: Config, step: int) -> bool:
    """Every checkpoint.every steps, and at the last step unless checkpoint.final=false: a run that
    finishes always leaves a checkpoint to export or resume from."""
    if step == cfg.train.steps and cfg.checkpoint.final:
        return True
    return _due(cfg.checkpoint.every, step)
