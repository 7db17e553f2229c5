"""Supervised fine-tuning of the real SmolLM2-135M on bundled:shakespeare-chat, on 2 gloo ranks:
attention never crosses a packed example (the held-out loss is the same packed and padded, on
FSDP2 and ZeRO-3), and the masking is the one an independent computation gets (each held-out
conversation alone, with plain transformers: the mean cross entropy over exactly its assistant
turns, found by tokenizing the turns apart)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.distributed import run_on_ranks

pytestmark = pytest.mark.spawns

ROOT = Path(__file__).resolve().parents[2]
SFT = str(ROOT / "configs" / "smollm2-135m-sft.yaml")
EVAL_EXAMPLES = 8
BACKENDS = {"fsdp2": ["parallel.backend=fsdp2"], "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"]}


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
    for example in sorted(e for row in val.rows for e in row):
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


def test_packed_and_padded_held_out_losses_are_equal_on_fsdp2_and_zero3(runs):
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
