"""`harness estimate` against what real FSDP2 and ZeRO-3 runs hold, on 1 and 2 ranks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.config import load_config
from harness.estimate import activation_bytes, estimate, fsdp2_local_numel
from tests.distributed import run_on_ranks

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
BACKENDS = {"fsdp2": ["parallel.backend=fsdp2"], "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"]}


def _measure(run_root: str) -> dict:
    """One step per backend; bytes of what each rank really holds."""
    from harness import dist as hdist
    from harness.optim import lr_at
    from harness.trainer import build_trainer

    info = hdist.rank_info_from_env()
    hdist.init_process_group(info, "gloo", 120, torch.device("cpu"))
    out = {}
    for label, extra in BACKENDS.items():
        cfg = load_config(TINY, [f"run.dir={run_root}/{label}", "precision=bf16", "log.progress=off", *extra])
        trainer = build_trainer(cfg, info, torch.device("cpu"))
        trainer.forward_backward(1, loss_scale=1.0)
        grads = sum(g.numel() * g.element_size() for _, g in trainer.backend.local_grad_shards())
        trainer.apply_gradients(1, lr_at(1, cfg.train))
        optimizer = trainer.backend.torch_optimizer
        master = sum(t.numel() * t.element_size() for t in optimizer.state)  # what AdamW steps on
        moments = sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values()
                      if v.numel() > 1)
        if label == "fsdp2":
            master = sum(p.to_local().numel() * 4 for p in trainer.backend.module.parameters())
            moments = sum(v.to_local().numel() * v.element_size() for st in optimizer.state.values()
                          for v in st.values() if v.numel() > 1)
        out[label] = {"master": master, "optimizer": moments, "gradients": grads}
    return out


@pytest.mark.parametrize("world_size", [1, 2])
def test_state_bytes_are_exact_and_total_is_close(world_size, tmp_path):
    measured = run_on_ranks(_measure, world_size, str(tmp_path))[0]  # rank 0 holds the largest shards
    cfg = load_config(TINY, [f"run.dir={tmp_path}", "precision=bf16"])
    predicted = estimate(cfg, world_size)["backends"]

    from harness.data import load_tokenizer
    from harness.model import build_model

    model = build_model(cfg.model, len(load_tokenizer(cfg.data.tokenizer)), 0).to(torch.bfloat16)
    batch = torch.randint(0, 50257, (cfg.train.micro_batch_size, cfg.train.seq_len + 1))
    real_activations = activation_bytes(model, batch)
    for label in BACKENDS:
        for component in ("master", "optimizer", "gradients"):
            assert predicted[label][component] == measured[label][component], (label, component)
        assert predicted[label]["activations"] == pytest.approx(real_activations, rel=0.02)
        measured_total = sum(measured[label].values()) + real_activations
        # The estimate adds working copies (gathered units, ZeRO-3's bf16 partition) on top.
        assert measured_total <= predicted[label]["total"] <= 1.25 * measured_total, label


def test_fsdp2_chunking_rule():
    assert [fsdp2_local_numel((5, 3), 2, r) for r in (0, 1)] == [9, 6]
    assert [fsdp2_local_numel((1, 4), 2, r) for r in (0, 1)] == [4, 0]


def test_cli_table_and_json():
    result = subprocess.run([str(Path(sys.executable).parent / "harness"), "estimate", str(TINY), "--world-size", "2",
                             "parallel.backend=deepspeed", "parallel.zero_stage=2"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "zero2*" in result.stdout and "activations" in result.stdout and "1,637,792 parameters" in result.stdout
    as_json = subprocess.run([str(Path(sys.executable).parent / "harness"), "estimate", str(TINY), "--json"],
                             capture_output=True, text=True, timeout=120)
    numbers = json.loads(as_json.stdout)
    assert numbers["backends"]["fsdp2"]["master"] == 4 * 1_637_792
