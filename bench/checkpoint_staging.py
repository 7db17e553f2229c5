"""A rank's checkpoint write, old path vs new, side by side in one run: save time and host peak.

    .venv/bin/python bench/checkpoint_staging.py [--config smollm2-135m|CONFIG] [--device cpu|cuda] [--saves 3]

The state is SmolLM2-135M's (by default) fp32 master weights and two AdamW moments, held as one
rank would (1.6 GB). Each method runs in its own process, so its host peak (RSS high-water mark
over the process's baseline) is its own:

- `cat`: what harness did before: copy every piece to the host, `torch.cat` them into one tensor
  per kind (a second copy), `safetensors.save_file`, then read the file back for its sha256;
- `staged`: harness.checkpoint.staging: reused flat buffers filled in place (pinned on CUDA),
  written in slices and hashed while writing.

Rank 0's state stands in for every rank: the write path is per rank and collective-free.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# SmolLM2-135M's architecture (its config.json), so that no weights package is needed to size it.
SMOLLM2_135M = dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)


def _state_pieces(config: str, device: str):
    import torch

    from harness.config import ModelConfig, load_config
    from harness.data import load_tokenizer
    from harness.model import build_skeleton, model_spec
    from harness.parallel.base import StatePiece, flat_range

    if config == "smollm2-135m":
        spec = model_spec(ModelConfig(config=SMOLLM2_135M), SMOLLM2_135M["vocab_size"])
    else:
        cfg = load_config(config, [])
        spec = model_spec(cfg.model, len(load_tokenizer(cfg.data.tokenizer)))
    skeleton = build_skeleton(spec)
    torch.manual_seed(0)
    pieces = []
    for name, param in skeleton.named_parameters():
        # Made where they live: a CPU detour would put its own high-water mark into the baseline.
        tensors = {kind: torch.randn(param.numel(), device=device) for kind in ("param", "exp_avg", "exp_avg_sq")}
        pieces.append(StatePiece(name, tuple(param.shape), flat_range(0, param.numel()), tensors))
    return pieces


class _Backend:
    """What HostStaging asks of a backend: the rank's pieces (all first copies, so all written)."""

    def __init__(self, pieces) -> None:
        self.pieces = pieces

    def state_pieces(self):
        return self.pieces


def _cat_path(pieces, path: Path) -> None:
    """The previous implementation, kept here as the baseline: a host copy of every piece, then
    torch.cat (a second copy), then a read-back for the hash."""
    import hashlib

    import torch
    from safetensors.torch import save_file

    flats = {kind: [p.tensors[kind].detach().to("cpu", torch.float32) for p in pieces] for kind in pieces[0].tensors}
    tensors = {kind: torch.cat(parts) for kind, parts in flats.items()}
    save_file(tensors, str(path), metadata={"format": "bench"})
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)


def _run_one(method: str, config: str, saves: int, device: str) -> dict:
    import torch

    from harness.checkpoint.staging import HostStaging, write_safetensors

    pieces = _state_pieces(config, device)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    staging = HostStaging(torch.device(device))
    times = []
    with tempfile.TemporaryDirectory(dir=ROOT / "runs") as out:
        for i in range(saves):
            path = Path(out, f"save-{i}.safetensors")
            started = time.perf_counter()
            if method == "cat":
                _cat_path(pieces, path)
            else:
                snapshot = staging.snapshot(_Backend(pieces))
                write_safetensors(path, snapshot.tensors, {"format": "bench"})
            times.append(time.perf_counter() - started)
            if method == "staged" and i == 0:  # what was written is what the device holds
                written = snapshot.tensors["param"][:pieces[0].numel]
                assert torch.equal(written, pieces[0].tensors["param"].cpu()), "staged copy differs from the source"
            path.unlink()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    state_gb = sum(t.numel() * 4 for p in pieces for t in p.tensors.values()) / 2**30
    return {"method": method, "save_s": sorted(times)[len(times) // 2], "peak_over_baseline_gb": peak - baseline,
            "state_gb": state_gb}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="smollm2-135m", help="smollm2-135m (built in) or a harness config")
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="where the state lives (cuda: a GPU rank's shards)")
    parser.add_argument("--method", choices=["cat", "staged"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        print(json.dumps(_run_one(args.method, args.config, args.saves, args.device)))
        return
    (ROOT / "runs").mkdir(exist_ok=True)
    rows = {}
    for method in ("cat", "staged"):
        out = subprocess.run([sys.executable, __file__, "--config", args.config, "--saves", str(args.saves),
                              "--device", args.device, "--method", method],
                             capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            sys.exit(f"checkpoint_staging: the {method} run failed:\n{out.stderr[-3000:]}")
        rows[method] = json.loads(out.stdout.strip().splitlines()[-1])
    state = rows["staged"]["state_gb"]
    print(f"config {args.config}: one rank's state {state:.2f} GiB (fp32 params + 2 AdamW moments) on "
          f"{args.device}, median of {args.saves} saves")
    print(f"{'method':<8} {'save s':>8} {'host peak over baseline GiB':>28}")
    for method, row in rows.items():
        print(f"{method:<8} {row['save_s']:>8.2f} {row['peak_over_baseline_gb']:>28.2f}")
    print(f"staged / cat: save time {rows['staged']['save_s'] / rows['cat']['save_s']:.2f}x, "
          f"host peak {rows['staged']['peak_over_baseline_gb'] / rows['cat']['peak_over_baseline_gb']:.2f}x")


if __name__ == "__main__":
    main()
