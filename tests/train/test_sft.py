"""Supervised fine-tuning of the real SmolLM2-135M on bundled:shakespeare-chat, on 2 gloo ranks:
attention never crosses a packed example (the held-out loss is the same packed and padded, on
FSDP2 and ZeRO-3), and the masking is the one an independent computation gets (each held-out
conversation alone, with plain transformers: the mean cross entropy over exactly its assistant
turns, found by tokenizing the turns apart)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pytest
import torch

from tests.distributed import run_on_ranks

pytestmark = pytest.mark.spawns

ROOT = Path(__file__).resolve().parents[2]
SFT = str(ROOT / "configs" / "smollm2-135m-sft.yaml")
EVAL_EXAMPLES = 8
BACKENDS = {"fsdp2": ["parallel.backend=fsdp2"], "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"],
            "fsdp2-eager": ["parallel.backend=fsdp2", "model.attn_implementation=eager"]}


def _overrides(root: str, label: str) -> list[str]:
    return [f"run.dir={root}/{label}", f"data.cache_dir={root}/cache", "precision=fp32", "log.progress=off",
            f"eval.sequences={EVAL_EXAMPLES}", "train.steps=1"]


def _scenarios(root: str) -> dict:
    from harness.config import load_config
    from harness.runtime import dist as hdist
    from harness.train.build import build_loop

    info = hdist.rank_info_from_env()
    device = torch.device("cpu")
    hdist.init_process_group(info, "gloo", 300, device)
    out = {}
    for backend, args in BACKENDS.items():
        for pack in (True, False):
            cfg = load_config(SFT, [*_overrides(root, f"{backend}-{pack}"), f"data.pack={str(pack).lower()}", *args])
            loop = build_loop(cfg, info, device)
            out[(backend, pack)] = loop.evaluate(0)
    return out


def _reference_loss(root: str) -> tuple[float, int]:
    """Mean cross entropy over the held-out conversations' assistant tokens, each conversation
    alone through plain transformers (no packing, no padding, no harness loss code)."""
    from transformers import AutoModelForCausalLM

    from harness import assets
    from harness.config import load_config
    from harness.data.corpus import load_tokenizer
    from harness.data.packing import instruction_rows
    from harness.data.shakespeare_chat import chat_file

    cfg = load_config(SFT, _overrides(root, "reference"))
    _, val, _ = instruction_rows(cfg.data, cfg.train.seq_len, EVAL_EXAMPLES, log=lambda *_: None)
    rows = [json.loads(line) for line in chat_file().read_text().splitlines()]  # none dropped at seq_len 256
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    model = AutoModelForCausalLM.from_pretrained(assets.resolve_model(cfg.model.pretrained), dtype=torch.float32)
    model.eval()
    total, count = 0.0, 0
    for example in sorted(e for r in range(len(val)) for e in val.examples_of(r)):
        messages = rows[example]["messages"]
        ids, trained = [], []
        rendered = ""
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
                pieces = [(prompt[len(rendered):], False)]
            else:
                pieces = []
            rendered_through = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
            start = len(rendered) + sum(len(text) for text, _ in pieces)
            pieces.append((rendered_through[start:], message["role"] == "assistant"))
            for text, is_trained in pieces:
                piece_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                ids += piece_ids
                trained += [is_trained] * len(piece_ids)
            rendered = rendered_through
        assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)
        inputs = torch.tensor([ids])
        with torch.no_grad():
            logits = model(inputs).logits[0, :-1].float()
        targets = torch.tensor(ids[1:])
        mask = torch.tensor(trained[1:])
        losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        total += float(losses[mask].double().sum())
        count += int(mask.sum())
    return total / count, count


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sft"))
    return root, run_on_ranks(_scenarios, 2, root)


def test_packed_and_padded_held_out_losses_are_equal_on_fsdp2_and_zero3_with_sdpa_and_eager(runs):
    _, ranks = runs
    for backend in BACKENDS:
        for result in ranks:
            packed, padded = result[(backend, True)], result[(backend, False)]
            assert packed == pytest.approx(padded, rel=1e-5), backend
    assert ranks[0] == ranks[1]


def test_the_held_out_loss_is_the_independent_mean_over_assistant_tokens(runs):
    root, ranks = runs
    want, tokens = _reference_loss(root)
    assert tokens > 50
    for key, got in ranks[0].items():
        assert got == pytest.approx(want, rel=1e-5), key


# --------------------------------------------------------------------------------------------
# Whole jobs, as a user starts them


TINY_SFT = """
# A 2-layer Llama from scratch with SmolLM2's tokenizer, on the chat data: the resume drill.
train: {steps: 6, micro_batch_size: 2, grad_accum: 1, seq_len: 128, lr: 1.0e-3, warmup_steps: 0}
precision: fp32
model:
  config: {model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2,
           num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 256}
data: {path: bundled:shakespeare-chat, format: chat, tokenizer: bundled:smollm2-135m}
eval: {every: 0}
log: {every: 1, progress: "off"}
"""


def _job(run_dir: Path, config: str, *overrides: str, timeout: float = 900, env: Optional[dict] = None):
    import os
    import subprocess

    result = subprocess.run(["launch/local.sh", "2", config, f"run.dir={run_dir}", *overrides], cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    return result


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_killed_sft_run_resumes_with_the_same_losses(tmp_path):
    config = tmp_path / "tiny-sft.yaml"
    config.write_text(TINY_SFT)
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    whole = _job(tmp_path / "whole", str(config), cache)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = _job(tmp_path / "drill", str(config), cache, "checkpoint.every=3", "faults.kill_at_step=3")
    assert killed.returncode != 0
    resumed = _job(tmp_path / "drill", str(config), cache, "checkpoint.every=3", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want = {row["step"]: row for row in _rows(tmp_path / "whole")}
    got = {row["step"]: row for row in _rows(tmp_path / "drill")}
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-6), step
        assert got[step]["trained_tokens"] == want[step]["trained_tokens"]
        assert 0 < got[step]["packing_efficiency"] <= 1
    # Rows carry tokens that do not count: the trained ones are far fewer than the rows' tokens.
    assert all(row["trained_tokens"] < row["tokens"] // row["step"] for row in want.values())


def test_smollm2_fine_tune_learns_exports_and_generates_what_it_showed(tmp_path):
    run_dir = tmp_path / "run"
    wandb_dir = tmp_path / "wandb"
    # One micro-batch of 128-token rows a step (the config: 2 of 256): 4 steps still learn.
    result = _job(run_dir, SFT, "precision=fp32", "train.steps=4", "train.grad_accum=1", "train.seq_len=128", "eval.every=2", "eval.sequences=8",
                  "eval.max_new_tokens=12", "log.progress=off", f"data.cache_dir={tmp_path / 'cache'}", "log.wandb=true",
                  env={"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    from harness.observe.wandb_file import find_runs, read_run

    history = read_run(find_runs(wandb_dir)[-1])["history"]
    # The run file keeps a logged table as its parts ("completions/_type", ...); the rows go to media/.
    tables = {row["step"]: row for row in history if row.get("completions/_type") == "table-file"}
    assert sorted(tables) == [2, 4] and tables[2]["completions/nrows"] == 2 and tables[4]["completions/nrows"] == 4
    evals = [row["eval_loss"] for row in _rows(run_dir) if row.get("eval_loss") is not None]
    assert len(evals) == 2 and evals[1] < evals[0]
    assert "completions after step 4:" in result.stdout
    shown = [json.loads(line) for line in (run_dir / "completions.jsonl").read_text().splitlines()]
    assert [row["step"] for row in shown] == [2, 2, 4, 4]

    # checkpoint.every is unset: the final step was saved all the same.
    checkpoint = run_dir / "checkpoints" / "step-00000004"
    out = tmp_path / "export"
    import subprocess
    import sys

    exported = subprocess.run([sys.executable, "-m", "harness", "export", str(checkpoint), str(out)], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "read back and compared" in exported.stdout
    assert {"generation_config.json", "tokenizer.json", "config.json", "model.safetensors"} <= {
        p.name for p in out.iterdir()}

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert tokenizer.chat_template  # the model's own template came with it
    from harness.config import load_config

    prompt = load_config(SFT).eval.prompts[0]
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    generated = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert text == shown[2]["completion"]


def test_a_tokenizer_that_is_not_the_models_stops_before_any_data_is_prepared(tmp_path):
    import subprocess
    import sys

    cache = tmp_path / "cache"
    result = subprocess.run([sys.executable, "-m", "harness", "train", SFT, "data.tokenizer=bundled:gpt2",
                             f"data.cache_dir={cache}", f"run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "data.tokenizer 'bundled:gpt2' has 50,257 tokens but model.pretrained 'bundled:smollm2-135m'" in result.stderr
    assert not cache.exists() or not any(cache.iterdir())
    assert not (tmp_path / "run").exists()
