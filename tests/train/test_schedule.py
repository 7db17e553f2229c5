"""When the loop reads, evaluates and saves (harness.train.schedule)."""

from __future__ import annotations

from pathlib import Path

from harness.config import Config, load_config
from harness.train.schedule import eval_due, reads_after, save_due

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def _cfg(**checkpoint) -> Config:
    cfg = Config()
    cfg.train.steps = 10
    for key, value in checkpoint.items():
        setattr(cfg.checkpoint, key, value)
    return cfg


def test_a_finished_run_saves_its_last_step_unless_told_not_to():
    assert [s for s in range(1, 11) if save_due(_cfg(), s)] == [10]
    assert [s for s in range(1, 11) if save_due(_cfg(every=4), s)] == [4, 8, 10]
    assert [s for s in range(1, 11) if save_due(_cfg(final=False), s)] == []
    assert [s for s in range(1, 11) if save_due(_cfg(every=5, final=False), s)] == [5, 10]


def test_reads_and_evaluations_fall_on_the_same_steps_for_every_rank():
    cfg = load_config(TINY, ["train.steps=10", "log.every=4", "eval.every=3", "checkpoint.every=5"])
    assert [s for s in range(1, 11) if reads_after(cfg, s, start_step=0)] == [1, 3, 4, 5, 6, 8, 9, 10]
    assert [s for s in range(1, 11) if eval_due(cfg, s)] == [3, 6, 9, 10]
