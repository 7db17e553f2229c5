"""Each throughput switch on and off, side by side in one run: step time, tokens/s, MFU, memory.

    # CPU, 2 gloo ranks (make bench):
    .venv/bin/python -m torch.distributed.run --standalone --nproc-per-node 2 bench/switches.py \
        [--config configs/tiny.yaml] [--steps 6] [--set cpu] [--out runs/bench-switches.md]
    # one GPU (bench/gpu.sh):
    python bench/switches.py --config configs/llama-1b.yaml --set gpu --steps 8

Every variant is the base config plus a few overrides, built as its own trainer in this process
(imports and data are paid once) and freed before the next. A variant runs one warm-up step
(compilation, first allocations), then `--rounds` times `--steps` steps issued back to back and
read once at the end, as fit() runs them between two logged steps; step time is the median over
rounds of the wall time of those steps over their count, device-synchronized. On a CPU all
variants stay built and the rounds are interleaved (machine drift hits them alike); on a GPU
each is built, timed and freed in turn. Memory: peak CUDA allocation on a GPU; "host GiB added":
how far rank 0's resident-set high-water mark rose above its RSS while the variant was built and
took its first step (its state and the first step's activations).
`plain` (GPU set) is bench/plain_loop.py's hand-written loop, in the same process.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {
    # name: overrides on the base config; "base" is what the ratios divide by.
    "cpu": {
        "base": [],
        "reduce_every_micro_batch": ["parallel.reduce_every_micro_batch=true"],
        "no_explicit_prefetch": ["parallel.prefetch=0"],
        "no_batch_prefetch": ["data.prefetch=false"],
        "compile": ["train.compile=true"],
        "ac_full": ["model.activation_checkpointing=full"],
        "ac_selective_op": ["model.activation_checkpointing=selective"],
        "ac_selective_2": ["model.activation_checkpointing=selective", "model.selective_ac=2"],
        "chunked_ce": ["train.loss_chunk_tokens=1024"],
        "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"],
        "zero3_module": ["parallel.backend=deepspeed", "parallel.zero_stage=3", "parallel.zero3_unit=module"],
    },
    "gpu": {
        "base": ["precision=bf16"],
        "compile": ["precision=bf16", "train.compile=true"],
        "compile_chunked_ce": ["precision=bf16", "train.compile=true", "train.loss_chunk_tokens=4096"],
        "compile_chunked_ce_ac_op": ["precision=bf16", "train.compile=true", "train.loss_chunk_tokens=4096",
                                     "model.activation_checkpointing=selective"],
        "ac_full": ["precision=bf16", "model.activation_checkpointing=full"],
        "fp16": ["precision=fp16"],
        "fp32": ["precision=fp32"],
        "zero3": ["precision=bf16", "parallel.backend=deepspeed", "parallel.zero_stage=3"],
    },
}


def _reset_host_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
    except OSError:
        pass


def _host_peak_gb() -> Optional[float]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 2**30
    except OSError:
        return None
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 2**30
    return 0.0


class HarnessVariant:
    """One variant's trainer: built and warmed up once, then timed in rounds."""

    def __init__(self, cfg, info, device) -> None:
        from harness.train.build import build_loop

        self.info, self.device = info, device
        _reset_host_peak()
        before = _rss_gb()
        self.trainer = build_loop(cfg, info, device)
        self.trainer.run_step(1)  # warm-up: compilation, first allocations, lazy init
        peak = _host_peak_gb()
        # What this variant added to the process: its state, plus the first step's activations.
        self.host_added_gb = None if peak is None else peak - before
        self.next_step = 2
        self.times: list[float] = []
        self.loss = float("nan")

    def time(self, steps: int) -> None:
        from harness.observe.step_counter import host_read
        from harness.train.rows import pack_pending

        _sync(self.device)
        started = time.perf_counter()
        pending = [self.trainer.train_step(step) for step in range(self.next_step, self.next_step + steps)]
        values = host_read(pack_pending(pending))  # the one read fit() makes for these steps
        _sync(self.device)
        self.times.append((time.perf_counter() - started) / steps)
        self.next_step += steps
        last = pending[-1].decision
        self.loss = last.unpack(values[-last.packed_width:]).mean_loss

    def row(self) -> dict:
        from harness.observe.metrics import peak_memory_gb

        step_time = statistics.median(self.times)
        trainer = self.trainer
        return {
            "step_time_s": step_time,
            "tokens_per_s": trainer.tokens_per_step / step_time,
            "mfu": trainer._mfu(trainer.tokens_per_step / step_time),
            "mem_gb": peak_memory_gb(self.device) if self.device.type == "cuda" else None,
            "host_added_gb": self.host_added_gb,
            "loss": self.loss,
        }

    def close(self) -> None:
        if self.trainer.prefetched is not None:
            self.trainer.prefetched.close()
        del self.trainer


def _measure_plain(cfg, device, steps: int) -> dict:
    """bench/plain_loop.py's loop: one device, autocast, fused AdamW, nothing else."""
    from plain_loop import measure  # bench/ is this script's folder

    return measure(cfg, device, steps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--set", choices=sorted(VARIANTS), default="cpu")
    parser.add_argument("--only", default="", help="comma-separated variant names (default: all of the set)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per variant (CPU: interleaved)")
    parser.add_argument("--override", action="append", default=[], help="a config override for every variant")
    parser.add_argument("--extra", action="append", default=[],
                        help="another variant, NAME=override;override;... (run with the set's)")
    parser.add_argument("--no-plain", action="store_true", help="skip the hand-written loop (GPU set)")
    parser.add_argument("--out", default=None, help="append the Markdown table to this file")
    parser.add_argument("--sdpa", choices=("default", "flash", "cudnn", "efficient"), default="default",
                        help="restrict scaled_dot_product_attention to one kernel for every variant")
    args = parser.parse_args()
    with _sdpa_backend(args.sdpa):
        run(args)


def _sdpa_backend(name: str):
    """The attention kernel every variant uses: torch picks one per call by default; the others
    pin one, to compare (cuDNN's Hopper kernels against FlashAttention-2, say)."""
    import contextlib

    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]
    return sdpa_kernel([backend])


def run(args) -> None:

    from harness.config import load_config
    from harness.runtime import dist as hdist

    info, device = hdist.start(timeout_s=900)
    variants = dict(VARIANTS[args.set])
    if args.only:  # --only picks among the set's variants; --extra ones always run
        variants = {k: v for k, v in variants.items() if k in args.only.split(",") or k == "base"}
    for extra in args.extra:
        name, _, overrides = extra.partition("=")
        variants[name] = [o for o in overrides.split(";") if o]
    shape = [f"train.steps={1 + args.rounds * args.steps}", "eval.every=0", "log.progress=off", "checkpoint.every=0", *args.override]
    rows: dict[str, dict] = {}
    plain = args.set == "gpu" and info.world_size == 1 and not args.no_plain
    if plain:
        cfg = load_config(args.config, ["run.dir=runs/bench-switches/plain", *shape, *variants["base"]])
        rows["plain"] = _guarded(lambda: _measure_plain(cfg, device, args.steps))
    # On a GPU each variant is built, timed and freed in turn (a 1B model's state is 17 GB); on a
    # CPU every variant stays built and they are timed in interleaved rounds, so the machine's
    # drift hits them alike.
    interleave = device.type != "cuda"
    built: dict[str, HarnessVariant] = {}
    for name, overrides in variants.items():
        cfg = load_config(args.config, [f"run.dir=runs/bench-switches/{name}", *shape, *overrides])
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            built[name] = HarnessVariant(cfg, info, device)
        except Exception as exc:  # a variant that cannot run here is a row saying why, not a lost bench
            rows[name] = {"error": _first_line(exc)}
            continue
        if not interleave:
            for _ in range(args.rounds):
                built[name].time(args.steps)
            variant = built.pop(name)
            rows[name] = variant.row()
            variant.close()
    for _ in range(args.rounds if interleave else 0):
        for variant in built.values():
            variant.time(args.steps)
    for name, variant in built.items():
        rows[name] = variant.row()
        variant.close()
    rows = {name: rows[name] for name in ([*(["plain"] if plain else [])] + list(variants)) if name in rows}
    for name, row in rows.items():
        if info.is_main:
            print(json.dumps({"variant": name, **row}), flush=True)
    if info.is_main:
        table = _table(args, info.world_size, device, rows)
        print(table)
        if args.out:
            with open(args.out, "a") as f:
                f.write(table + "\n")
    hdist.shutdown()


def _first_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]


def _guarded(measure) -> dict:
    try:
        return measure()
    except Exception as exc:
        return {"error": _first_line(exc)}


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _table(args, world_size: int, device: torch.device, rows: dict) -> str:
    base = rows.get("base", {}).get("step_time_s")
    lines = [f"config `{args.config}`, set `{args.set}`, {world_size} rank(s), device {device}, "
             f"{args.steps} steps per variant after one warm-up step"
             + ("" if args.sdpa == "default" else f", attention kernel {args.sdpa}"),
             "", "| variant | step s | tokens/s | vs base (time) | MFU | device mem GiB | host GiB added | loss |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error']} | | | | | | |")
            continue
        ratio = row["step_time_s"] / base if base else None
        mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        lines.append(f"| {name} | {row['step_time_s']:.3f} | {row['tokens_per_s']:,.0f} | {_fmt(ratio, '.2f')}x | "
                     f"{mfu} | {_fmt(row['mem_gb'], '.1f')} | {_fmt(row.get('host_added_gb'), '.2f')} | "
                     f"{row['loss']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
    from harness.runtime.process import exit_process

    exit_process(0)
