"""One optimizer step of a config on a cluster, predicted (step_time.py's model fed from the
config's collective plan and memory estimate), and shown as text or JSON."""

from __future__ import annotations

from harness.config import Config
from harness.estimate.communication import collective_plan
from harness.estimate.step_time import Cluster, StepTime, model_flops_utilization, step_time
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
    return step_time(plan, cluster, flops_per_token(model, t.seq_len), tokens, recompute, local_numel,
                     cfg.precision, device_bytes)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms"


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
        f"  compute     {result.flops / 1e12:,.1f} TFLOPs per rank ({result.tokens_per_rank:,} tokens) -> {_ms(result.compute_s)}",
        f"  {'collective':<24}{'group':>14}{'fabric':>8}{'calls':>7}{'buffers':>14}{'time':>12}",
    ]
    for c in result.collectives:
        lines.append(f"  {c.op:<24}{f'{c.group} of {c.group_size}':>14}{c.fabric:>8}{c.count:>7}"
                     f"{c.bytes / 2**20:>11,.1f} MiB{_ms(c.seconds):>12}")
    lines += [
        f"  communication {_ms(result.comm_s)}, exposed {_ms(result.exposed_s)}; optimizer {_ms(result.optimizer_s)}",
        f"  step {_ms(result.step_s)}: {result.tokens_per_rank / result.step_s:,.0f} tokens/s per GPU, MFU {mfu:.1%}",
        f"  limit: {result.limit}",
    ]
    if cfg.parallel.offload != "none":
        lines.append("  (host offload traffic over PCIe and the host AdamW are not in this step time)")
    return "\n".join(lines)


def _gbit(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:.1f}"


def step_json(step: StepTime, cluster: Cluster, cfg: Config) -> dict:
    return {
        "gpu": cluster.gpu.name, "nodes": cluster.nodes, "mfu_assumed": cluster.mfu, "memory_gib": cluster.memory_gib,
        "intra_gbps": cluster.intra_gbps, "inter_gbps": cluster.inter_gbps, "fabric_source": cluster.fabric_source,
        "flops": step.flops, "compute_s": step.compute_s, "comm_s": step.comm_s, "exposed_s": step.exposed_s,
        "optimizer_s": step.optimizer_s, "step_s": step.step_s,
        "tokens_per_s_per_gpu": step.tokens_per_rank / step.step_s,
        "mfu": model_flops_utilization(step, cluster, cfg.precision), "limit": step.limit,
        "collectives": [vars(c) for c in step.collectives],
    }
