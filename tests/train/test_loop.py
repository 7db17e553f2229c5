"""The loop reads the device only through host_read: the one read the watchdog recognises as
waiting for the other ranks (on a GPU, a rank blocked in `.item()` elsewhere looks busy in its own
code, so a hang there would never be named)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from harness.config import load_config
from harness.runtime import dist as hdist
from harness.train.build import build_loop

ROOT = Path(__file__).resolve().parents[2]


def test_training_steps_and_evaluation_read_the_device_only_through_host_read(world_of_one, tmp_path, monkeypatch):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"run.dir={tmp_path}", "train.steps=2", "log.progress=off",
                                                       "eval.every=2"])
    loop = build_loop(cfg, hdist.rank_info_from_env({}), torch.device("cpu"))
    harness_dir = str(ROOT / "harness")
    direct_reads = []
    real_item, real_tolist = torch.Tensor.item, torch.Tensor.tolist

    host_read_file = str(ROOT / "harness" / "observe" / "step_counter.py")

    def record_harness_caller() -> None:
        frame = sys._getframe(2)
        path = frame.f_code.co_filename
        if path.startswith(harness_dir) and path != host_read_file:
            direct_reads.append(f"{path}:{frame.f_lineno}")

    def item(self):
        record_harness_caller()
        return real_item(self)

    def tolist(self):
        record_harness_caller()
        return real_tolist(self)

    monkeypatch.setattr(torch.Tensor, "item", item)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    summary = loop.fit()
    assert summary.eval_loss is not None
    assert direct_reads == []
