"""`harness estimate` against what real FSDP2 and ZeRO-3 runs hold, on 1 and 2 ranks."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.config import load_config
from harness.estimate import activation_bytes, estimate, fsdp2_local_numel
from tests.distributed import run_on_ranks

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
BACKENDS = {"fsdp2": ["parallel.backend=fsdp2"], "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"]}


def _measure(run_root: str) -> dict:
    """One step per backend; bytes of what each rank really holds."""
    from harness.numerics.optim import lr_at
    from harness.runtime import dist as hdist
    from harness.train.build import build_loop

    info = hdist.rank_info_from_env()
    hdist.init_process_group(info, "gloo", 120, torch.device("cpu"))
    out = {}
    for label, extra in BACKENDS.items():
        cfg = load_config(TINY, [f"run.dir={run_root}/{label}", "precision=bf16", "log.progress=off", *extra])
        trainer = build_loop(cfg, info, torch.device("cpu"))
        local_loss = trainer.forward_backward(1, loss_scale=None)
        grads = sum(g.numel() * g.element_size() for _, g, _ in trainer.backend.local_grad_shards())
        trainer.apply_gradients(1, lr_at(1, cfg.train), local_loss)
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


@pytest.mark.spawns
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


@pytest.mark.spawns
def test_cli_table_and_json():
    result = subprocess.run([str(Path(sys.executable).parent / "harness"), "estimate", str(TINY), "--world-size", "2",
                             "parallel.backend=deepspeed", "parallel.zero_stage=2"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "zero2*" in result.stdout and "activations" in result.stdout and "1,639,296 parameters" in result.stdout  # GPT-2 rows padded to 50,304
    as_json = subprocess.run([str(Path(sys.executable).parent / "harness"), "estimate", str(TINY), "--json"],
                             capture_output=True, text=True, timeout=120)
    numbers = json.loads(as_json.stdout)
    assert numbers["backends"]["fsdp2"]["master"] == 4 * 1_639_296


def _offload_estimate(offload: str, world_size: int = 2) -> dict:
    cfg = load_config(TINY, ["precision=bf16", f"parallel.offload={offload}", "parallel.backend=deepspeed"])
    return estimate(cfg, world_size)["backends"]


def test_offload_moves_state_to_host_memory_per_backend():
    none, optimizer, params = (_offload_estimate(o) for o in ("none", "optimizer", "params"))
    for b in ("fsdp2", "zero1", "zero2", "zero3"):
        assert none[b]["host"] == 0 and none[b]["device"] == none[b]["total"]
        # Offload moves bytes; it does not change what a rank holds in all.
        assert optimizer[b]["total"] == none[b]["total"] and optimizer[b]["device"] + optimizer[b]["host"] == none[b]["total"]
    z3 = none["zero3"]
    assert optimizer["zero3"]["host"] == z3["master"] + z3["gradients"] + z3["optimizer"]
    # params also moves ZeRO-3's compute-dtype partition; ZeRO-1/2 cannot offload parameters.
    assert params["zero3"]["host"] > optimizer["zero3"]["host"]
    assert params["zero2"]["host"] == optimizer["zero2"]["host"]
    # FSDP2 has one switch: sharded parameters, gradients and optimizer state together.
    f = none["fsdp2"]
    assert optimizer["fsdp2"]["host"] == params["fsdp2"]["host"] == f["master"] + f["gradients"] + f["optimizer"]
    # ZeRO-1 keeps the compute-dtype gradients of the whole model on the device.
    assert optimizer["zero1"]["device"] - none["zero1"]["working"] - none["zero1"]["activations"] > 0


def test_setup_peak_columns_compare_sharded_init_with_a_full_build():
    cfg = load_config(ROOT / "configs" / "llama-1b.yaml", ["train.micro_batch_size=1", "train.seq_len=64"])
    b = estimate(cfg, 8)["backends"]
    for name, numbers in b.items():
        assert numbers["setup_host"] < numbers["setup_host_full_build"], name
    # Without zero.Init DeepSpeed moves the whole bf16 module to the device.
    n_params = estimate(cfg, 8)["parameters"]
    assert b["zero3"]["setup_device_full_build"] >= max(b["zero3"]["device"], 2 * n_params)
    assert b["zero3"]["setup_host_full_build"] - b["zero3"]["setup_host"] > 3 * n_params
    assert b["fsdp2"]["setup_device_full_build"] == b["fsdp2"]["device"]


@pytest.mark.spawns
def test_70b_on_8x80gb_fits_with_zero3_offload_and_sharded_init_only():
    cfg = load_config(ROOT / "configs" / "llama-70b.yaml")
    assert (cfg.parallel.zero_stage, cfg.parallel.offload) == (3, "params")
    zero3 = estimate(cfg, 8)["backends"]["zero3"]
    gib = 2**30
    assert zero3["device"] < 80 * gib < zero3["setup_device_full_build"]
    assert zero3["setup_device_full_build"] >= 2 * 69e9  # the whole bf16 module, before partitioning
    no_offload = estimate(load_config(ROOT / "configs" / "llama-70b.yaml", ["parallel.offload=none"]), 8)["backends"]
    assert no_offload["zero3"]["device"] > 80 * gib


@pytest.mark.spawns
def test_cli_marks_what_fits():
    result = subprocess.run([str(Path(sys.executable).parent / "harness"), "estimate", "configs/llama-70b.yaml",
                             "--world-size", "8", "--device-gb", "80"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    table = result.stdout.split("\n\n")[1].splitlines()  # the memory table: header, then one row per line
    rows = {re.split(r"\s{2,}", line.strip())[0]: re.split(r"\s{2,}", line.strip())[1:] for line in table[1:]}
    assert rows["fits (80.0 GiB)"] == ["yes", "NO", "NO", "yes"]
    assert rows["fits, full build (80.0 GiB)"][-1] == "NO"
    assert "setup host" in rows and "in host mem" in rows and "host per node (8)" in rows
    # Aligned: every cell of a column ends where its header does, whatever the numbers' sizes.
    header_ends = [m.end() for m in re.finditer(r"\S+", table[0])]
    for line in table[1:]:
        ends = [m.end() for m in re.finditer(r"\S+(?: \S+)*", line)][1:]
        assert ends == header_ends, line
    legend = result.stdout.split("\n\n")[2]
    for term in ("working", "setup host", "full-build dev", "host per node"):
        assert re.search(rf"^  {term} +\S", legend, re.M), term


# --------------------------------------------------------------------------------------------
# The step-time model (harness/estimate/step_time.py). Its byte counts are checked against real
# runs in tests/parallel/test_parallel_hierarchical.py; here: fabrics, overlap, limits and the CLI.

HARNESS = str(Path(sys.executable).parent / "harness")


def _step(config: str, world_size: int, *overrides: str, nodes: int = 0, **cluster) -> tuple:
    from harness.estimate.memory import meta_model
    from harness.estimate.step import predict_step
    from harness.estimate.step_time import GPUS, Cluster

    cfg = load_config(ROOT / "configs" / config, list(overrides))
    gpu = GPUS[cluster.pop("gpu", "h100")]
    nodes = nodes or max(1, world_size // 8)
    settings = dict(intra_gbps=gpu.intra_gbps, inter_gbps=gpu.inter_gbps, mfu=0.4, memory_gib=gpu.memory_gib)
    settings.update(cluster)
    layout = Cluster(world_size, nodes, gpu, **settings)
    model = meta_model(cfg)
    return predict_step(cfg, layout, model, estimate(cfg, world_size, model)), layout


def test_ring_costs_and_fabrics():
    from harness.estimate.step_time import _ring_seconds

    gbit = 8.0  # Gbit/s: 1 GB/s
    assert _ring_seconds("all_gather_into_tensor", 8e9, 8, gbit) == pytest.approx(7.0)
    assert _ring_seconds("all_reduce", 8e9, 8, gbit) == pytest.approx(14.0)
    assert _ring_seconds("all_reduce", 8e9, 1, gbit) == 0.0
    flat, _ = _step("llama-1b.yaml", 16, "train.micro_batch_size=1")
    hsdp, _ = _step("llama-1b.yaml", 16, "train.micro_batch_size=1", "parallel.replicate=2")
    # Flat FSDP2 over 2 nodes: every gather crosses nodes. HSDP, one node per shard group:
    # gathers and reduce-scatters stay on NVLink, only the replicas' all-reduce crosses.
    assert {(c.op, c.fabric) for c in flat.collectives if c.group == "shard"} == {
        ("all_gather_into_tensor", "inter"), ("reduce_scatter_tensor", "inter")}
    assert {(c.op, c.group, c.fabric) for c in hsdp.collectives if c.op != "all_reduce" or c.group != "world"} == {
        ("all_gather_into_tensor", "shard", "intra"), ("reduce_scatter_tensor", "shard", "intra"),
        ("all_reduce", "replicate", "inter")}
    assert hsdp.comm_s < flat.comm_s / 3


@pytest.mark.spawns
def test_limits_are_named():
    memory, _ = _step("llama-70b.yaml", 8, "parallel.backend=fsdp2", "parallel.offload=none")
    assert memory.limit.startswith("memory: ") and "GiB per GPU needed" in memory.limit
    compute, _ = _step("llama-8b.yaml", 64, "train.micro_batch_size=1")
    assert compute.limit.startswith("compute")
    # 1,024 GPUs on a slow network, a small batch per GPU and flat sharding: the gathers dominate.
    slow, _ = _step("llama-1b.yaml", 1024, "train.micro_batch_size=1", "train.grad_accum=1", inter_gbps=25)
    assert slow.limit.startswith("exposed communication") and "inter-node network" in slow.limit
    assert slow.exposed_s > slow.compute_s
    # Compute time follows the FLOPs at the assumed MFU; the step is never faster than that.
    for result in (compute, slow):
        assert result.step_s >= result.compute_s > 0


def test_mfu_and_recompute_move_compute_time():
    base, _ = _step("llama-1b.yaml", 8, "train.micro_batch_size=1")
    full, _ = _step("llama-1b.yaml", 8, "train.micro_batch_size=1", "model.activation_checkpointing=full")
    faster, _ = _step("llama-1b.yaml", 8, "train.micro_batch_size=1", mfu=0.8)
    assert full.compute_s == pytest.approx(base.compute_s * 4 / 3)  # one more forward of three thirds
    assert faster.compute_s == pytest.approx(base.compute_s / 2)
    assert full.flops == base.flops  # model FLOPs do not count recomputation


def test_hsdp_and_hpz_memory_columns():
    flat4 = estimate(load_config(TINY, []), 4)["backends"]
    flat2 = estimate(load_config(TINY, []), 2)["backends"]
    hsdp = estimate(load_config(TINY, ["parallel.replicate=2"]), 4)["backends"]
    assert hsdp["fsdp2"]["master"] == flat2["fsdp2"]["master"] > flat4["fsdp2"]["master"]
    # hpZ adds the secondary copy (compute dtype, sharded over the group of 2) to ZeRO-3's working set.
    assert hsdp["zero3"]["master"] == flat4["zero3"]["master"]
    assert hsdp["zero3"]["working"] - flat4["zero3"]["working"] == 4 * (1_639_296 // 2)  # fp32 tiny, no padding


@pytest.mark.spawns
def test_cli_step_section_json_and_errors():
    result = subprocess.run([HARNESS, "estimate", "configs/llama-8b.yaml", "--world-size", "64", "--nodes", "8",
                             "--gpu", "h100", "--intra-gbps", "2400", "--inter-gbps", "400", "parallel.replicate=8"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "on 64 x H100 SXM 80GB in 8 node(s): intra 2,400 Gbit/s, inter 400 Gbit/s" in out
    assert "fsdp2 x 8 replicas" in out and "limit: " in out and "tokens/s per GPU" in out
    as_json = subprocess.run([HARNESS, "estimate", "configs/llama-8b.yaml", "--world-size", "16", "--json"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    step = json.loads(as_json.stdout)["step"]
    assert step["nodes"] == 2 and step["step_s"] >= step["compute_s"] and 0 < step["mfu"] <= 0.4
    assert {c["op"] for c in step["collectives"]} == {"all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce"}
    # A GPU not in --gpu: its peak given, the compute time scales with it.
    slower = subprocess.run([HARNESS, "estimate", "configs/llama-8b.yaml", "--world-size", "16", "--json",
                             "--peak-tflops", "494.5"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert json.loads(slower.stdout)["step"]["compute_s"] == pytest.approx(2 * step["compute_s"])
    for args, message in (
        (["--world-size", "16", "--nodes", "3"], "--nodes 3 does not divide --world-size 16"),
        (["--world-size", "8", "--mfu", "0"], "--mfu must be in (0, 1]"),
        (["--world-size", "8", "--inter-gbps", "-1"], "--inter-gbps must be > 0"),
        (["--world-size", "8", "--peak-tflops", "0"], "--peak-tflops must be > 0"),
        (["--world-size", "6", "parallel.replicate=4"], "parallel.replicate=4 does not divide the world size 6"),
    ):
        bad = subprocess.run([HARNESS, "estimate", "configs/tiny.yaml", *args], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, (args, bad.stderr)


@pytest.mark.parametrize("override, message", [
    ("model.pretrained=/nowhere/llama", "model.pretrained '/nowhere/llama' does not exist; point it at a local"),
    ("train.seq_len=100000", "train.seq_len=100000 is beyond the model's 8192 positions"),
])
def test_estimate_of_a_model_it_cannot_build_is_one_line(capsys, override, message):
    from harness.cli.estimate import main

    assert main([str(ROOT / "configs" / "smollm2-135m.yaml"), override, "--world-size", "2"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0 and "Traceback" not in err


@pytest.mark.parametrize("gpu", ["h100", "h200", "a100", "a100-40", "l40s", "b200", "mi300x"])
def test_every_gpu_a_user_rents_has_its_published_numbers(gpu):
    from harness.estimate.step_time import GPUS

    spec = GPUS[gpu]
    assert {"bf16", "fp16", "fp32"} <= set(spec.peak_tflops) and spec.peak_tflops["bf16"] > spec.peak_tflops["fp32"]
    assert 30 < spec.memory_gib < 200 and spec.hbm_gbytes_s > 500 and spec.intra_gbps > 0 and spec.pcie_gbytes_s > 0


def test_offload_adds_its_host_round_trip_to_the_step():
    from harness.estimate.memory import meta_model
    from harness.estimate.step import predict_step
    from harness.estimate.step_time import CPU_ADAM_PARAMS_S_PER_NODE, GPUS, Cluster

    cfg = load_config(ROOT / "configs" / "llama-300m.yaml", ["parallel.backend=deepspeed", "parallel.zero_stage=3"])
    offloaded = load_config(ROOT / "configs" / "llama-300m.yaml", ["parallel.backend=deepspeed", "parallel.zero_stage=3",
                                                                     "parallel.offload=optimizer"])
    cluster = Cluster(8, 1, GPUS["a100"], GPUS["a100"].intra_gbps, GPUS["a100"].inter_gbps, 0.4, 79.2)
    model = meta_model(cfg)
    on_gpu = predict_step(cfg, cluster, model, estimate(cfg, 8, model))
    on_host = predict_step(offloaded, cluster, model, estimate(offloaded, 8, model))
    assert on_gpu.offload_s == 0 and on_gpu.optimizer_s > 0
    local = estimate(offloaded, 8, model)["backends"]["zero3"]["master"] // 4
    pcie = 2 * local * 2 / 25e9  # bf16 gradients down, parameters up, at the A100's PCIe 4
    assert on_host.optimizer_s == 0
    assert on_host.offload_s == pytest.approx(pcie + 8 * local / CPU_ADAM_PARAMS_S_PER_NODE)
    assert on_host.step_s == pytest.approx(on_host.compute_s + on_host.exposed_s + on_host.offload_s)


@pytest.mark.spawns
def test_the_collectives_table_stays_aligned_at_70b_sizes():
    result = subprocess.run([HARNESS, "estimate", "configs/llama-70b.yaml", "--world-size", "64"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("collective"))
    block = lines[start:start + 1 + sum(1 for line in lines[start + 1:] if "_" in line.split()[0] if line.strip())]
    header_ends = [m.end() for m in re.finditer(r"\S+", block[0])]
    for line in block[1:]:
        assert [m.end() for m in re.finditer(r"\S+(?: \S+)*", line)][-3:] == header_ends[-3:], line
    assert "TiB" in result.stdout and "offload " in result.stdout  # 70B moves TiB; its params are offloaded


def test_fp8_runs_the_converted_layers_flops_at_the_fp8_peak_and_the_rest_at_bf16():
    from harness.errors import HarnessError
    from harness.estimate.memory import meta_model
    from harness.estimate.step import fp8_cluster, predict_step
    from harness.estimate.step_time import GPUS, Cluster
    from harness.model.build import flops_per_token
    from harness.numerics.fp8 import plan_fp8

    cfg = load_config(ROOT / "configs" / "llama-8b.yaml", ["precision=fp8"])
    model = meta_model(cfg)
    h100 = GPUS["h100"]
    cluster = Cluster(8, 1, h100, h100.intra_gbps, h100.inter_gbps, 0.4, 79.6)
    modules = dict(model.named_modules())
    converted = plan_fp8(model, cfg.fp8).converted
    # Blocks 1..30; torchao's tensorwise rule keeps k_proj and v_proj (4096 -> 1024) in bf16.
    assert len(converted) == 30 * 5 and not any(n.endswith(("k_proj", "v_proj")) for n in converted)
    share = 6 * sum(modules[n].in_features * modules[n].out_features for n in converted) / flops_per_token(model, 8192)
    assert 0.5 < share < 1
    peak = fp8_cluster(cfg, cluster, model).gpu.peak_tflops["fp8"]
    assert peak == pytest.approx(1 / (share / 1979.0 + (1 - share) / 989.0))
    bf16 = load_config(ROOT / "configs" / "llama-8b.yaml")
    fast = predict_step(cfg, cluster, model, estimate(cfg, 8, model))
    slow = predict_step(bf16, cluster, meta_model(bf16), estimate(bf16, 8))
    assert fast.compute_s == pytest.approx(slow.compute_s * 989.0 / peak)
    a100 = Cluster(8, 1, GPUS["a100"], 1840, 200, 0.4, 79.2)
    with pytest.raises(HarnessError, match="precision=fp8 needs FP8 tensor cores and the A100 SXM 80GB has none"):
        fp8_cluster(cfg, a100, model)
