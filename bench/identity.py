"""Two commits side by side: the same runs on both, and what a user sees compared bit for bit.

    .venv/bin/python bench/identity.py --base 82a524a [--only tiny-fp32,lora-bf16]

Checks out --base into a temporary worktree, runs every scenario below with this checkout and with
the base (the same .venv, the same overrides, real launch/local.sh jobs on gloo), and compares each
step's loss, gradient norm, loss scale, skip and spike decisions and trained tokens exactly, then
every checkpoint tensor (master weights, both AdamW moments, RNG states) and the trainer state of
every manifest. Prints one Markdown row per scenario and exits 1 if any differs: a refactoring that
claims to change nothing proves it here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["log.progress=off", "train.steps=6", "checkpoint.every=3", "eval.every=3", "eval.prompts=[]"]
FAULTS = ["faults.nonfinite_grad_steps=[2]", "faults.nonfinite_grad_rank=1"]
ROLLBACK = ["train.spike.action=rollback", "train.spike.window=2", "faults.loss_spike_steps=[5]",
            "train.lr_schedule=constant", "train.warmup_steps=0", "checkpoint.every=2"]
LORA = ["model.config={}", "lora.r=4", "lora.alpha=8", "train.lr=1e-2"]
ZERO3 = ["parallel.backend=deepspeed", "parallel.zero_stage=3"]

# name: (config, ranks, overrides); "{base}" is a small pretrained Llama folder the bench writes.
SCENARIOS = {
    "tiny-fp32": ("configs/tiny.yaml", 2, ["precision=fp32"]),
    "tiny-bf16": ("configs/tiny.yaml", 2, ["precision=bf16"]),
    "tiny-fp16-faults": ("configs/tiny.yaml", 2, ["precision=fp16", *FAULTS]),
    "tiny-zero3-fp32": ("configs/tiny-zero3.yaml", 2, ["precision=fp32"]),
    "tiny-zero3-bf16": ("configs/tiny-zero3.yaml", 2, ["precision=bf16"]),
    "tiny-zero2-fp16": ("configs/tiny-zero2-fp16.yaml", 2, [*FAULTS]),
    "hsdp-fp32": ("configs/tiny.yaml", 4, ["precision=fp32", "parallel.replicate=2", "train.micro_batch_size=1"]),
    "hsdp-bf16": ("configs/tiny.yaml", 4, ["precision=bf16", "parallel.replicate=2", "train.micro_batch_size=1"]),
    "lora-fp32": ("configs/tiny.yaml", 2, ["model.pretrained={base}", *LORA, "precision=fp32"]),
    "lora-bf16": ("configs/tiny.yaml", 2, ["model.pretrained={base}", *LORA, "precision=bf16"]),
    "lora-zero3-bf16": ("configs/tiny.yaml", 2, ["model.pretrained={base}", *LORA, "precision=bf16", *ZERO3]),
    "rollback-fp32": ("configs/tiny.yaml", 2, ["precision=fp32", *ROLLBACK]),
}
ROW_FIELDS = ("step", "loss", "grad_norm", "loss_scale", "skipped", "spike", "trained_tokens", "skipped_batches",
              "eval_loss")


def write_base(folder: Path) -> None:
    """A small pretrained Llama on GPT-2's vocabulary, written by transformers (the LoRA runs' base)."""
    from harness.config import ModelConfig
    from harness.runtime.process import quiet_imports_without_gpus

    quiet_imports_without_gpus()  # torchao's CUDA-kernel load lines on a CPU machine
    from harness.model import build_model

    shape = dict(model_type="llama", num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=64, bos_token_id=50256,
                 eos_token_id=50256)
    build_model(ModelConfig(config=shape), vocab_size=50257, seed=11).save_pretrained(folder)


def run(tree: Path, config: str, ranks: int, overrides: list[str], run_dir: Path) -> float:
    started = time.perf_counter()
    result = subprocess.run([str(tree / "launch" / "local.sh"), str(ranks), config, f"run.dir={run_dir}", *COMMON,
                             *overrides], cwd=tree, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHONPATH": str(tree), "PYTHON": sys.executable})
    if result.returncode != 0:
        raise SystemExit(f"{tree} {config} {overrides} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: row.get(k) for k in ROW_FIELDS} for row in map(json.loads, lines)]


def checkpoints(run_dir: Path) -> dict[str, object]:
    """Every checkpoint's tensors (sha256 of their bytes) and trainer state, by step folder and rank file."""
    from safetensors.torch import load_file

    found: dict[str, object] = {}
    for folder in sorted((run_dir / "checkpoints").glob("step-*")):
        manifest = json.loads((folder / "manifest.json").read_text())
        found[f"{folder.name}/trainer_state"] = manifest["trainer_state"]
        found[f"{folder.name}/lora_base"] = manifest.get("lora_base") and manifest["lora_base"]["fingerprint"]
        for file in sorted(folder.glob("rank-*.safetensors")):
            for key, tensor in load_file(file).items():
                data = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                found[f"{folder.name}/{file.name}/{key}"] = hashlib.sha256(data).hexdigest()
    return found


def first_difference(a: dict, b: dict) -> str:
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return key
    return ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the commit to compare this checkout with")
    parser.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(SCENARIOS)
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        print(f"identity: unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    head = "this checkout"
    with tempfile.TemporaryDirectory(prefix="harness-identity-") as tmp:
        work = Path(tmp)
        base_tree = work / "base-tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(base_tree), args.base], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            write_base(work / "llama")
            print(f"| scenario | ranks | rows equal | checkpoint tensors equal | seconds (base / {head}) |")
            print("|---|---|---|---|---|")
            failed = False
            for name in names:
                config, ranks, overrides = SCENARIOS[name]
                overrides = [o.replace("{base}", str(work / "llama")) for o in overrides]
                seconds = [run(tree, config, ranks, overrides, work / label / name)
                           for label, tree in (("base", base_tree), ("head", ROOT))]
                base_rows, head_rows = rows(work / "base" / name), rows(work / "head" / name)
                rows_equal = base_rows == head_rows
                base_ck, head_ck = checkpoints(work / "base" / name), checkpoints(work / "head" / name)
                ck_equal = base_ck == head_ck
                failed |= not (rows_equal and ck_equal)
                row_note = f"yes ({len(head_rows)})" if rows_equal else "NO: " + _row_difference(base_rows, head_rows)
                ck_note = f"yes ({len(head_ck)} entries)" if ck_equal else "NO: " + first_difference(base_ck, head_ck)
                print(f"| {name} | {ranks} | {row_note} | {ck_note} | {seconds[0]:.0f} / {seconds[1]:.0f} |", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, capture_output=True)
    return 1 if failed else 0


def _row_difference(a: list[dict], b: list[dict]) -> str:
    if len(a) != len(b):
        return f"{len(a)} rows vs {len(b)}"
    for x, y in zip(a, b):
        if x != y:
            key = next(k for k in ROW_FIELDS if x.get(k) != y.get(k))
            return f"step {x['step']} {key}: {x.get(key)!r} vs {y.get(key)!r}"
    return "?"


if __name__ == "__main__":
    sys.exit(main())
