"""eval.prompts: at every evaluation, each prompt completed greedily by the model being trained, so
a user sees it follow instructions as the loss falls (printed by rank 0, appended to
run.dir/completions.jsonl, logged to wandb as a table).

Every rank runs every forward pass (under FSDP2 and ZeRO-3 a forward is collective); the token
chosen at each position is rank 0's, broadcast, so all ranks stop at the same token. No KV cache
(training builds the model without one): each new token re-reads the sequence, which costs
prompt x new tokens forward positions, a few seconds on a CPU for short completions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from harness.model.loss import unpacked_sequences

Prompt = Union[str, list]


@dataclass
class PromptSet:
    prompts: list[Prompt]
    inputs: list[list[int]]
    """Each prompt's token ids, with the chat template's generation prompt."""
    stop_ids: set[int]
    max_new_tokens: int
    tokenizer: Any

    def describe(self, prompt: Prompt) -> str:
        """A prompt as one line: its last user message, or the string."""
        if isinstance(prompt, str):
            return prompt
        users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
        return users[-1] if users else str(prompt)


def prompt_set(prompts: list[Prompt], tokenizer: Any, max_new_tokens: int, generation_eos: Any = None) -> PromptSet:
    """Strings become one user message where the tokenizer has a chat template (raw text where it
    has none); message lists are rendered as they are. Generation stops at the tokenizer's EOS and
    at the model's generation-config end tokens (Llama 3's <|eot_id|>, ...)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    inputs = []
    for prompt in prompts:
        if isinstance(prompt, str) and not has_template:
            inputs.append(tokenizer(prompt)["input_ids"])
            continue
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        inputs.append(list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                         return_dict=True)["input_ids"]))
    stop = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if generation_eos is not None:
        stop |= set(generation_eos if isinstance(generation_eos, (list, tuple)) else [generation_eos])
    return PromptSet(list(prompts), inputs, stop, max_new_tokens, tokenizer)


@torch.no_grad()
def complete(model: nn.Module, prompts: PromptSet, device: torch.device) -> list[str]:
    """Each prompt's greedy completion (special tokens left out), the same on every rank."""
    model.eval()
    completions = []
    try:
        for ids in prompts.inputs:
            new = _greedy(model, ids, prompts, device)
            completions.append(prompts.tokenizer.decode(new, skip_special_tokens=True).strip())
    finally:
        model.train()
    return completions


def _greedy(model: nn.Module, ids: list[int], prompts: PromptSet, device: torch.device) -> list[int]:
    sequence = torch.tensor([ids], dtype=torch.int64, device=device)
    new: list[int] = []
    for _ in range(prompts.max_new_tokens):
        with unpacked_sequences():
            output = model(sequence)
        logits = output.logits if hasattr(output, "logits") else output
        token = logits[:, -1].float().argmax(dim=-1).reshape(1, 1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(token, src=0)  # rank 0's choice, so every rank stops together
        chosen = int(token)
        if chosen in prompts.stop_ids:
            break
        new.append(chosen)
        sequence = torch.cat([sequence, token], dim=1)
    return new


def complete_and_record(model: nn.Module, prompts: PromptSet, device: torch.device, step: int,
                        run_dir: Optional[Path]) -> Optional[list[dict]]:
    """Complete every prompt (all ranks); with a run_dir (rank 0), print and record the
    completions and return their rows."""
    completions = complete(model, prompts, device)
    if run_dir is None:
        return None
    rows = record(run_dir, step, prompts, completions)
    print(f"completions after step {step}:\n{show(rows)}", flush=True)
    return rows


def record(run_dir: Path, step: int, prompts: PromptSet, completions: list[str]) -> list[dict]:
    """Append this evaluation's completions to run.dir/completions.jsonl; returns the rows."""
    rows = [{"step": step, "prompt": prompts.describe(p), "completion": c} for p, c in zip(prompts.prompts, completions)]
    with open(run_dir / "completions.jsonl", "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return rows


def show(rows: list[dict]) -> str:
    """The console lines for one evaluation's completions."""
    return "\n".join(f"  prompt: {row['prompt']!r}\n  model:  {row['completion']!r}" for row in rows)
