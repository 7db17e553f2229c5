"""One optimizer step of a config on a cluster, predicted (step_time.py's model fed from the
config's collective plan and memory estimate), and shown as text or JSON."""

from __future__ import annotations

import dataclasses

from harness.config import Config
from harness.errors import HarnessError
from harness.estimate.communication import collective_plan
from harness.estimate.step_time import Cluster, StepTime, model_flops_utilization, offload_seconds, step_time
from harness.estimate.table import ms, size, table
from harness.model.build import flops_per_token
from harness.parallel import layout_name


def predict_step(cfg: Config, cluster: Cluster, model, memory: dict) -> StepTime:
    plan = collective_plan(model, cfg, cluster.world_size)
    t = cfg.train
    tokens = t.micro_batch_size * t.grad_accum * t.seq_len
    mode = cfg.model.checkpointing_mode()
    recompute = {"none": 0.0, "full": 1.0}.get(mode, 0.0 if cfg.model.selective_ac == "op" else 1.0 / cfg.model.selective_ac)
    numbers = memory["backends"][layout_name(cfg.parallel)]
    local_numel = numbers["master"] // 4
    device_bytes = numbers["device"]
    compute_cluster = fp8_cluster(cfg, cluster, model) if cfg.precision == "fp8" else cluster
    result = step_time(plan, compute_cluster, flops_per_token(model, t.seq_len), tokens, recompute, local_numel,
                       cfg.precision, device_bytes)
    if cfg.parallel.offload != "none":  # the host steps: no AdamW on the GPU, a round trip instead
        result.optimizer_s = 0.0
        result.offload_s = offload_seconds(local_numel, cluster, 2 if cfg.precision != "fp32" else 4,
                                           cfg.parallel.offload == "params", t.grad_accum)
    return result


def format_step(result: StepTime, cluster: Cluster, cfg: Config) -> str:
    gpu = cluster.gpu
    mfu = model_flops_utilization(result, cluster, cfg.precision)
    lines = [
        "",
        f"one optimizer step, {layout_name(cfg.parallel)}"
        + (f" x {cfg.parallel.replicate} replicas" if cfg.parallel.replicate > 1 else "")
        + f", on {cluster.world_size} x {gpu.name} in {cluster.nodes} node(s): "
        f"intra {_gbit(cluster.intra_gbps)} Gbit/s, inter {_gbit(cluster.inter_gbps)} Gbit/s per GPU ({cluster.fabric_source}); "
        f"assumed MFU {cluster.mfu:.0%}",
        f"  compute     {result.flops / 1e12:,.1f} TFLOPs per rank ({result.tokens_per_rank:,} tokens) -> {ms(result.compute_s)}",
    ]
    rows = [[c.op, f"{c.group} of {c.group_size}", c.fabric, f"{c.count:,}", size(c.bytes), ms(c.seconds)]
            for c in result.collectives]
    lines += table(["collective", "group", "fabric", "calls", "buffers", "time"], rows, indent="  ", left=3)
    lines.append(f"  communication {ms(result.comm_s)}, exposed {ms(result.exposed_s)}; optimizer {ms(result.optimizer_s)}")
    if result.offload_s:
        lines.append(f"  offload     {ms(result.offload_s)}: gradients down and parameters up over PCIe "
                     f"({gpu.pcie_gbytes_s:g} GB/s per GPU) and the node's CPU Adam, not overlapped")
    lines += [
        f"  step {ms(result.step_s)}: {result.tokens_per_rank / result.step_s:,.0f} tokens/s per GPU, MFU {mfu:.1%}",
        f"  limit: {result.limit}",
    ]
    return "\n".join(lines)


def fp8_cluster(cfg: Config, cluster: Cluster, model) -> Cluster:
    """The cluster with an fp8 peak that blends the FP8 rate for the FLOPs of the layers
    precision=fp8 converts (harness.numerics.fp8's rule, on this model) with the bf16 rate for the
    rest (attention, the head, unconverted layers)."""
    from harness.numerics.fp8 import plan_fp8

    gpu = cluster.gpu
    if "fp8" not in gpu.peak_tflops:
        raise HarnessError(f"precision=fp8 needs FP8 tensor cores and the {gpu.name} has none; estimate on "
                           "--gpu h100|h200|b200|l40s|mi300x, or use precision=bf16")
    modules = dict(model.named_modules())
    converted = sum(modules[name].in_features * modules[name].out_features for name in plan_fp8(model, cfg.fp8).converted)
    share = min(1.0, 6 * converted / flops_per_token(model, cfg.train.seq_len))
    peak = 1 / (share / gpu.peak_tflops["fp8"] + (1 - share) / gpu.peak_tflops["bf16"])
    return dataclasses.replace(cluster, gpu=dataclasses.replace(gpu, peak_tflops={**gpu.peak_tflops, "fp8": peak}))


def _gbit(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:.1f}"


def step_json(step: StepTime, cluster: Cluster, cfg: Config) -> dict:
    return {
        "gpu": cluster.gpu.name, "nodes": cluster.nodes, "mfu_assumed": cluster.mfu, "memory_gib": cluster.memory_gib,
        "intra_gbps": cluster.intra_gbps, "inter_gbps": cluster.inter_gbps, "fabric_source": cluster.fabric_source,
        "flops": step.flops, "compute_s": step.compute_s, "comm_s": step.comm_s, "exposed_s": step.exposed_s,
        "optimizer_s": step.optimizer_s, "offload_s": step.offload_s, "step_s": step.step_s,
        "tokens_per_s_per_gpu": step.tokens_per_rank / step.step_s,
        "mfu": model_flops_utilization(step, cluster, cfg.precision), "limit": step.limit,
        "collectives": [vars(c) for c in step.collectives],
    }
