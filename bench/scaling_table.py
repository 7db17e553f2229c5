"""The scaling table of docs/scaling.md: `harness estimate`'s step model for ~1B, 8B and 70B
Llama-style models on 8 to 1,024 H100s, flat FSDP2 next to HSDP (one node per shard group).

    .venv/bin/python bench/scaling_table.py            # the markdown table
    .venv/bin/python bench/scaling_table.py --quick    # one model, two sizes (the test's form)

Assumptions (the defaults of `harness estimate --gpu h100`): 8 GPUs per node, NVLink within a node
(2,880 Gbit/s bus bandwidth per GPU), 400 Gbit/s per GPU across nodes, the executed math at 40%
of the bf16 peak, fp32 masters, one 8,192-token sequence per GPU per step, Llama 3 vocabulary
(128,256). HSDP shards within one node (70B: within 4 nodes, the least that holds its state).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = ["train.micro_batch_size=1", "train.grad_accum=1", "train.seq_len=8192", "precision=bf16",
         "model.config.vocab_size=128256", "model.config.max_position_embeddings=8192",
         "parallel.backend=fsdp2", "parallel.offload=none"]
# (config, overrides, HSDP shard group): a node per group, except 70B, whose state (16 bytes per
# parameter) needs 4 nodes to fit.
MODELS = {
    "1B": ("llama-1b.yaml", ["model.activation_checkpointing=selective", "model.config.tie_word_embeddings=true"], 8),
    "8B": ("llama-8b.yaml", ["model.activation_checkpointing=selective"], 8),
    "70B": ("llama-70b.yaml", ["model.gradient_checkpointing=true"], 32),
}
WORLD_SIZES = (8, 64, 512, 1024)
GPUS_PER_NODE = 8


def rows(models: dict, world_sizes: tuple) -> list[dict]:
    from harness.config import load_config
    from harness.estimate.memory import estimate, meta_model
    from harness.estimate.step import predict_step
    from harness.estimate.step_time import GPUS, Cluster, model_flops_utilization

    gpu = GPUS["h100"]
    out = []
    for name, (config, extra, shard_group) in models.items():
        base = load_config(ROOT / "configs" / config, [*SHAPE, *extra])
        model = meta_model(base)
        for world in world_sizes:
            nodes = max(1, world // GPUS_PER_NODE)
            cluster = Cluster(world, nodes, gpu, gpu.intra_gbps, gpu.inter_gbps, 0.40, gpu.memory_gib)
            for replicas in sorted({1, max(1, world // shard_group)}):
                cfg = load_config(ROOT / "configs" / config, [*SHAPE, *extra, f"parallel.replicate={replicas}"])
                memory = estimate(cfg, world, model)
                step = predict_step(cfg, cluster, model, memory)
                out.append({
                    "model": name, "gpus": world, "nodes": nodes,
                    "layout": "FSDP2" if replicas == 1 else f"HSDP {replicas}x{world // replicas}",
                    "memory_gib": memory["backends"]["fsdp2"]["device"] / 2**30,
                    "compute_ms": step.compute_s * 1e3, "comm_ms": step.comm_s * 1e3,
                    "exposed_ms": step.exposed_s * 1e3, "step_ms": step.step_s * 1e3,
                    "tokens_per_gpu": step.tokens_per_rank / step.step_s,
                    "mfu": model_flops_utilization(step, cluster, cfg.precision), "limit": step.limit,
                })
    return out


def markdown(table: list[dict]) -> str:
    lines = ["| model | GPUs | layout | memory/GPU | compute | comm | exposed | step | tokens/s/GPU | MFU | limit |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in table:
        limit = r["limit"].split(" (")[0] if r["limit"].startswith(("compute", "memory")) else r["limit"].split(";")[0]
        if r["limit"].startswith("memory"):
            limit = f"memory ({r['memory_gib']:,.0f} GiB > 79.6)"
        lines.append(
            f"| {r['model']} | {r['gpus']:,} | {r['layout']} | {r['memory_gib']:,.1f} GiB | {r['compute_ms']:,.0f} ms "
            f"| {r['comm_ms']:,.0f} ms | {r['exposed_ms']:,.0f} ms | {r['step_ms']:,.0f} ms | {r['tokens_per_gpu']:,.0f} "
            f"| {r['mfu']:.1%} | {limit} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1B on 8 and 64 GPUs only")
    args = parser.parse_args()
    if args.quick:
        table = rows({"1B": MODELS["1B"]}, (8, 64))
    else:
        table = rows(MODELS, WORLD_SIZES)
    print(markdown(table))


if __name__ == "__main__":
    main()
