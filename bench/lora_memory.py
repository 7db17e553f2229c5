"""LoRA vs full fine-tune: per-rank host memory on CPU, measured, beside harness estimate's prediction.

Writes configs/llama-300m.yaml's model (its seeded init) as a pretrained folder, then fine-tunes it
for a few steps on gloo ranks (FSDP2 on 4, ZeRO-3 on 2: four ZeRO-3 ranks of a full fine-tune do
not fit this 24 GB machine), once in full and once with lora.r=16 (bf16 compute). For each run it prints, for the largest rank: the step peak resident memory (ru_maxrss at
the end: setup included), the setup peak before step 1, the optimizer state + fp32 master bytes
the optimizer actually holds plus the fp32 gradients of those masters, and the estimator's per-rank
total and master + gradient + optimizer bytes for the same config. Target (issue 30): a LoRA run's
optimizer + gradient bytes at most 5% of the full fine-tune's.

    python bench/lora_memory.py [--quick]

--quick: the 2-block tiny Llama, 2 ranks each (seconds; the numbers then say little, the table is the same).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
TINY_SHAPE = dict(model_type="llama", num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)


def _write_base(config: str, folder: Path, quick: bool, dtype: str = "fp32") -> None:
    """`config`'s model (model.config) with its seeded init, as a Hugging Face folder."""
    import torch

    from harness.config import ModelConfig, load_config
    from harness.model import build_model

    shape = dict(TINY_SHAPE if quick else load_config(ROOT / config).model.config)
    shape.update(bos_token_id=50256, eos_token_id=50256)  # GPT-2's end of text: the runs' tokenizer
    model = build_model(ModelConfig(config=shape), vocab_size=50257, seed=0)
    model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]).save_pretrained(folder)


def _overrides(base: Path, run_dir: Path, lora: bool, backend: list[str]) -> list[str]:
    return [f"model.pretrained={base}", "model.config={}", "data.tokenizer=bundled:gpt2", f"run.dir={run_dir}", "train.steps=3", "eval.every=0",
            "log.progress=off", "checkpoint.final=false", "precision=bf16", f"lora.r={16 if lora else 0}",
            "lora.alpha=32", *backend]


def _worker(config: str, overrides: list[str], out: str) -> None:
    """One rank: train, then report what it holds."""
    import torch.distributed as dist

    from harness.config import load_config
    from harness.runtime import dist as hdist
    from harness.runtime.host_memory import peak_gb
    from harness.train.build import build_loop

    info = hdist.rank_info_from_env()
    device = hdist.device_for(info, "gloo")
    hdist.init_process_group(info, "gloo", 600, device)
    loop = build_loop(load_config(ROOT / config, overrides), info, device)
    setup_peak = peak_gb()
    loop.fit()
    # The live fp32 masters and AdamW moments, through the views a checkpoint reads; the fp32
    # gradients are freed after each step, and each master has one of its own size.
    pieces = loop.backend.state_pieces()
    held = sum(t.numel() * t.element_size() for piece in pieces for t in piece.tensors.values())
    held += sum(4 * piece.numel for piece in pieces)
    facts = {"peak_gb": peak_gb(), "setup_gb": setup_peak, "state_bytes": held}
    gathered: list = [None] * info.world_size
    dist.all_gather_object(gathered, facts)
    if info.is_main:
        Path(out).write_text(json.dumps(gathered))
    hdist.shutdown()
    os._exit(0)


def _run(config: str, ranks: int, overrides: list[str], out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", __file__,
           "--worker", config, str(out), "--", *overrides]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        sys.exit(f"run failed ({' '.join(overrides)}):\n{result.stderr[-3000:]}")
    return json.loads(out.read_text())


def _estimated(config: str, overrides: list[str], ranks: int, backend: str) -> tuple[float, float]:
    from harness.config import load_config
    from harness.estimate.memory import estimate, meta_model

    cfg = load_config(ROOT / config, overrides)
    numbers = estimate(cfg, ranks, meta_model(cfg))["backends"][backend]
    return numbers["total"], sum(numbers[k] for k in ("master", "gradients", "optimizer"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model on 2 ranks: seconds")
    args = parser.parse_args()
    config = "configs/tiny.yaml" if args.quick else "configs/llama-300m.yaml"
    # ZeRO-3 on gloo holds far more than its partitions (shared/NOTES.md: a 257M model's full
    # ZeRO-3 step took 19.7 GB on 4 ranks); 4 such ranks of the 300M model do not fit 24 GB.
    backends = {"fsdp2": (["parallel.backend=fsdp2"], 2 if args.quick else 4),
                "zero3": (["parallel.backend=deepspeed", "parallel.zero_stage=3"], 2)}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        _write_base(config, base, args.quick)
        print(f"### LoRA (r=16, every projection) vs full fine-tune: {config}'s model, gloo ranks, bf16 "
              "compute, largest rank\n")
        print("| method | backend | ranks | step peak host, GiB | setup peak, GiB | estimate total, GiB | "
              "optimizer + grads + masters, MiB (measured) | estimated, MiB | LoRA / full |")
        print("|---|---|---|---|---|---|---|---|---|")
        for backend, (settings, ranks) in backends.items():
            state = {}
            for method in ("full", "lora"):
                overrides = _overrides(base, Path(tmp) / f"{backend}-{method}", method == "lora", settings)
                ranks_facts = _run(config, ranks, overrides, Path(tmp) / f"{backend}-{method}.json")
                total, estimated_state = _estimated(config, overrides, ranks, backend)
                state[method] = max(f["state_bytes"] for f in ranks_facts)
                ratio = f"{state['lora'] / state['full']:.4f}" if method == "lora" else ""
                print(f"| {method} | {backend} | {ranks} | {max(f['peak_gb'] for f in ranks_facts):.2f} | "
                      f"{max(f['setup_gb'] for f in ranks_facts):.2f} | {total / GIB:.2f} | "
                      f"{state[method] / 2**20:.1f} | {estimated_state / 2**20:.1f} | {ratio} |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[5:], sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "--write-base":  # bench/gpu_fp8_lora.sh: CONFIG FOLDER, bf16
        _write_base(sys.argv[2], Path(sys.argv[3]), quick=False, dtype="bf16")
    else:
        main()
