"""What harness costs over the loop it drives: harness vs a hand-written loop of the same model,
same batch shape and same sharding, side by side in one run.

    .venv/bin/python -m torch.distributed.run --standalone --nproc-per-node 2 bench/overhead.py \
        [--config configs/tiny.yaml] [--steps 6] [--rounds 2] [--override KEY=VALUE ...]

Cases: FSDP2 fp32, FSDP2 bf16, DeepSpeed ZeRO-3 fp32 and bf16 (`--only` picks). The hand-written loops are what a user
would write without harness: FSDP2 by hand (fully_shard per block and the root, fp32 masters, the
compute dtype gathered, fp32 reduce-scatter, fused AdamW, clip_grad_norm_), or a DeepSpeed engine
(engine.backward, engine.step, its own clipping) with the DeepSpeed settings harness uses. Both
issue `--steps` steps and read the loss once at the end, as fit() does between logged steps;
the loops take turns for `--rounds` rounds and each reports its median. Ratio = harness / hand
(target <= 1.03). Random tokens for the hand loops; harness reads its own data (part of its cost).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = {
    "fsdp2 fp32": ["precision=fp32"],
    "fsdp2 bf16": ["precision=bf16"],
    "zero3 fp32": ["precision=fp32", "parallel.backend=deepspeed", "parallel.zero_stage=3"],
    "zero3 bf16": ["precision=bf16", "parallel.backend=deepspeed", "parallel.zero_stage=3"],
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HandFSDP2:
    def __init__(self, cfg, device: torch.device, vocab: int) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from harness.model import build_model, transformer_blocks
        from harness.numerics.precision import precision_policy

        policy = precision_policy(cfg.precision)
        self.model = build_model(cfg.model, vocab, cfg.train.seed).to(device)
        mp = MixedPrecisionPolicy(param_dtype=policy.compute_dtype if policy.is_mixed else None,
                                  reduce_dtype=torch.float32)
        for block in transformer_blocks(self.model):
            fully_shard(block, mp_policy=mp)
        fully_shard(self.model, mp_policy=mp, reshard_after_forward=False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr, fused=True)
        self.cfg, self.device, self.vocab = cfg, device, vocab

    def step(self) -> torch.Tensor:
        t = self.cfg.train
        for i in range(t.grad_accum):
            self.model.set_requires_gradient_sync(i == t.grad_accum - 1)
            batch = torch.randint(0, self.vocab, (t.micro_batch_size, t.seq_len + 1), device=self.device)
            logits = self.model(input_ids=batch[:, :-1]).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
            (loss / t.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


class HandZeRO:
    def __init__(self, cfg, device: torch.device, vocab: int, world_size: int) -> None:
        import deepspeed

        from harness.config.deepspeed_json import runtime_config
        from harness.model import build_model

        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), dist_init_required=False)
        model = build_model(cfg.model, vocab, cfg.train.seed)
        ds = runtime_config(cfg, world_size, hidden_size=model.config.hidden_size)
        ds["gradient_clipping"] = cfg.train.grad_clip  # the hand loop lets DeepSpeed clip
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, fused=True)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds, dist_init_required=False)
        self.cfg, self.device, self.vocab = cfg, device, vocab

    def step(self) -> torch.Tensor:
        t = self.cfg.train
        for _ in range(t.grad_accum):
            batch = torch.randint(0, self.vocab, (t.micro_batch_size, t.seq_len + 1), device=self.device)
            logits = self.engine(input_ids=batch[:, :-1]).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
            self.engine.backward(loss)
            self.engine.step()
        return loss.detach()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated case names, e.g. 'fsdp2 fp32'")
    parser.add_argument("--override", action="append", default=[])
    parser.add_argument("--out", default=None, help="append the Markdown table to this file")
    args = parser.parse_args()

    from harness.config import load_config
    from harness.observe.step_counter import host_read
    from harness.runtime import dist as hdist
    from harness.train.build import build_loop
    from harness.train.rows import pack_pending

    info, device = hdist.start(timeout_s=900)
    total = 1 + args.rounds * args.steps + 1
    rows = []
    cases = {k: v for k, v in CASES.items() if not args.only or k in args.only.split(",")}
    for case, overrides in cases.items():
        cfg = load_config(args.config, [f"run.dir=runs/bench-overhead/{case.replace(' ', '-')}", f"train.steps={total}",
                                        "eval.every=0", "log.progress=off", *args.override, *overrides])
        trainer = build_loop(cfg, info, device)
        vocab = trainer.backend.module.get_input_embeddings().num_embeddings
        hand = HandZeRO(cfg, device, vocab, info.world_size) if "zero" in case else HandFSDP2(cfg, device, vocab)
        trainer.run_step(1)
        hand.step()
        times = {"harness": [], "hand": []}
        step = 2
        for _ in range(args.rounds):
            _sync(device)
            started = time.perf_counter()
            pending = [trainer.train_step(s) for s in range(step, step + args.steps)]
            host_read(pack_pending(pending))
            _sync(device)
            times["harness"].append((time.perf_counter() - started) / args.steps)
            step += args.steps
            started = time.perf_counter()
            losses = [hand.step() for _ in range(args.steps)]
            host_read(torch.stack(losses))
            _sync(device)
            times["hand"].append((time.perf_counter() - started) / args.steps)
        if trainer.prefetched is not None:
            trainer.prefetched.close()
        ours, theirs = statistics.median(times["harness"]), statistics.median(times["hand"])
        rows.append((case, ours, theirs))
        del trainer, hand
    if info.is_main:
        lines = [f"config `{args.config}` {' '.join(args.override)}, {info.world_size} rank(s), device {device}, "
                 f"{args.rounds} rounds x {args.steps} steps", "",
                 "| case | harness s/step | hand-written s/step | harness / hand |", "|---|---|---|---|"]
        lines += [f"| {case} | {ours:.3f} | {theirs:.3f} | {ours / theirs:.3f} |" for case, ours, theirs in rows]
        table = "\n".join(lines)
        print(table)
        if args.out:
            with open(args.out, "a") as f:
                f.write(table + "\n")
    hdist.shutdown()


if __name__ == "__main__":
    main()
    from harness.runtime.process import exit_process

    exit_process(0)
