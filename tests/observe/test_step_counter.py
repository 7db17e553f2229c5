"""Host syncs and collectives per optimizer step (debug.count_syncs), counted on real 2-rank gloo
runs through fit(): FSDP2 never waits for the device between logged steps and waits once on a
logged one; gradient accumulation reduces once per step unless parallel.reduce_every_micro_batch;
DeepSpeed's syncs are its own plus harness's one read of the decision. One spawn for all runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from harness.observe.step_counter import StepCounter, host_read
from tests.distributed import run_on_ranks

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
BLOCKS = 2  # configs/tiny.yaml's n_layer
# Reads at step 1 (the first), 3 (log.every) and 4 (the last); step 2 is read with step 3.
SHAPE = ["train.steps=4", "log.every=3", "eval.every=0", "log.progress=off", "debug.count_syncs=true"]
RUNS = {
    "fsdp2_fp16": ["precision=fp16"],
    "fsdp2_accum": ["precision=fp32", "train.grad_accum=2"],
    "fsdp2_accum_every": ["precision=fp32", "train.grad_accum=2", "parallel.reduce_every_micro_batch=true"],
    "zero1": ["precision=bf16", "train.grad_accum=2", "parallel.backend=deepspeed", "parallel.zero_stage=1"],
    "zero2": ["precision=bf16", "train.grad_accum=2", "parallel.backend=deepspeed", "parallel.zero_stage=2"],
    "zero3": ["precision=bf16", "train.grad_accum=2", "parallel.backend=deepspeed", "parallel.zero_stage=3"],
}


def _runs(run_root: str) -> dict:
    from harness.config import load_config
    from harness.runtime import dist as hdist
    from harness.train.build import build_loop

    info = hdist.rank_info_from_env()
    device = torch.device("cpu")
    hdist.init_process_group(info, "gloo", 120, device)
    out = {}
    for label, extra in RUNS.items():
        cfg = load_config(TINY, [f"run.dir={run_root}/{label}", *SHAPE, *extra])
        build_loop(cfg, info, device).fit()
        out[label] = [json.loads(line) for line in Path(run_root, label, "metrics.jsonl").read_text().splitlines()] \
            if info.rank == 0 else None
    return out


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    return run_on_ranks(_runs, 2, str(tmp_path_factory.mktemp("counted")))[0]


def _column(rows: list[dict], field: str) -> list:
    return [row[field] for row in rows]


@pytest.mark.spawns
def test_fsdp2_waits_for_the_device_only_on_logged_steps(counted):
    for label in ("fsdp2_fp16", "fsdp2_accum", "fsdp2_accum_every"):
        assert _column(counted[label], "host_syncs") == [1, 0, 1, 1], label


@pytest.mark.spawns
def test_fsdp2_collectives_per_step(counted):
    units = BLOCKS + 1  # every block, and the root (embeddings, final norm, tied head)
    # Forward gathers every unit; backward gathers the blocks again, except the last one and the
    # root, which stay gathered from forward.
    gathers = units + BLOCKS - 1
    for row in counted["fsdp2_fp16"]:
        ops = row["collectives"]
        assert set(ops) == {"all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce"}
        assert ops["all_gather_into_tensor"]["count"] == gathers
        assert ops["reduce_scatter_tensor"]["count"] == units
        # ONE all-reduce a step decides it all (sum of squares, loss sum, trained tokens, stop,
        # still writing): fp64 each.
        assert ops["all_reduce"] == {"count": 1, "bytes": 5 * 8, "groups": {"2": {"count": 1, "bytes": 5 * 8}}}
    once, every = counted["fsdp2_accum"][1]["collectives"], counted["fsdp2_accum_every"][1]["collectives"]
    assert once["all_gather_into_tensor"]["count"] == every["all_gather_into_tensor"]["count"] == 2 * gathers
    assert once["reduce_scatter_tensor"]["count"] == units
    assert every["reduce_scatter_tensor"]["count"] == 2 * units
    assert every["reduce_scatter_tensor"]["bytes"] == 2 * once["reduce_scatter_tensor"]["bytes"]


@pytest.mark.spawns
def test_reducing_once_per_step_keeps_the_fp32_losses(counted):
    once, every = counted["fsdp2_accum"], counted["fsdp2_accum_every"]
    for a, b in zip(once, every):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)


# DeepSpeed takes the skip decision and the loss scale on the host: harness reads its decision
# once per step; the rest are DeepSpeed's own (measured on 0.19.8, see docs/throughput.md). ZeRO-2
# and ZeRO-3 read back the norm harness hands them, a host-side value: counted on a CPU run (every
# read is), no wait on a GPU. bf16 ZeRO-1 with fp32 accumulation is DeepSpeed's BF16_Optimizer, whose
# own norm check stays (one read).
DEEPSPEED_SYNCS = {"zero1": 2, "zero2": 2, "zero3": 2}


@pytest.mark.spawns
def test_deepspeed_syncs_are_its_own_plus_one_read_of_the_decision(counted):
    for label, per_step in DEEPSPEED_SYNCS.items():
        rows = counted[label]
        assert rows[1]["host_syncs"] == per_step, label  # an unlogged step
        assert rows[2]["host_syncs"] == per_step + 1, label  # a logged one adds the rows' read


@pytest.mark.spawns
def test_zero_stages_reduce_as_zero_does(counted):
    """ZeRO-1 reduces once per optimizer step; ZeRO-2 and ZeRO-3 after every micro-batch."""
    zero1, zero3 = counted["zero1"][1]["collectives"], counted["zero3"][1]["collectives"]
    harness_reductions = 1
    assert zero1["all_reduce"]["count"] - harness_reductions == 1
    assert zero3["reduce_scatter_tensor"]["count"] == 2  # one per micro-batch


def test_counter_counts_reads_and_names_collectives(world_of_one):
    counter = StepCounter(torch.device("cpu"))
    values = torch.arange(3.0)
    with counter:
        values.sum().item()
        host_read(values)
        dist.all_reduce(values)
        dist.broadcast(values, src=0)
    fields = counter.take()
    assert fields == {
        "host_syncs": 2,
        "collectives": {"all_reduce": {"count": 1, "bytes": 12, "groups": {"1": {"count": 1, "bytes": 12}}},
                        "broadcast": {"count": 1, "bytes": 12, "groups": {"1": {"count": 1, "bytes": 12}}}},
    }
    assert counter.take() == {"host_syncs": 0, "collectives": {}}
