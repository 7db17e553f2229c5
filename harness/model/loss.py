"""Next-token losses, computed in fp32 whatever the compute dtype.

Plain: the model returns logits for every position (compute dtype), which are cast to fp32 for the
cross entropy; with a 50k-128k vocabulary those two copies (and the fp32 gradient) dwarf every
other activation. Chunked (`train.loss_chunk_tokens`): the output head computes the loss itself, a
chunk of tokens at a time, each chunk's logits recomputed in backward instead of kept, so the
logits of a whole micro-batch never exist. The head's `forward` is swapped while the targets are
set, inside the model's own call, so sharding hooks (FSDP2's unshard, ZeRO-3's gather) still run
around it; the head's per-token losses come back as `.logits`.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Optional
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from harness.errors import HarnessError

_targets: contextvars.ContextVar[Optional[tuple[torch.Tensor, int]]] = contextvars.ContextVar("targets", default=None)


@contextlib.contextmanager
def sequence_layout(packed: bool):
    """How transformers is told where the sequences of a row are, without a host sync.

    transformers looks for packed sequences in the position ids whenever no attention mask and
    no cache are given (training), with a data-dependent `.all()`: a host sync in every forward,
    and a question a meta tensor cannot answer. harness knows the answer. Unpacked (packed=False:
    no position ids, positions 0..L-1 in every row): "not packed". Packed (a batch of several
    examples per row, its position ids restarting at each): every row's sequence numbers, computed
    on the device as transformers does, so attention stays within each example (sdpa/eager: a
    block-diagonal causal mask; flash-attention's varlen path reads the position ids itself)."""
    from transformers import masking_utils

    if not hasattr(masking_utils, "find_packed_sequence_indices"):  # a transformers without the check
        yield
        return
    with mock.patch.object(masking_utils, "find_packed_sequence_indices",
                           _sequence_numbers if packed else lambda position_ids: None):
        yield


def _sequence_numbers(position_ids: torch.Tensor) -> torch.Tensor:
    """Row-wise sequence numbers: a new sequence starts wherever the position does not go up by 1
    (transformers' own rule, without its "is anything packed" check)."""
    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


def unpacked_sequences():
    """sequence_layout for rows that hold one sequence each."""
    return sequence_layout(packed=False)


# Config fields by which a model post-processes its logits after the head: a chunked head would
# hand that post-processing losses instead of logits.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def enable_chunked_loss(model: nn.Module) -> None:
    """Let next_token_loss compute the loss inside the output head, chunk by chunk."""
    config = model.config
    for field in _LOGIT_POSTPROCESSING:
        if getattr(config, field, None) not in (None, 1, 1.0):
            raise HarnessError(
                f"train.loss_chunk_tokens cannot be used with {type(model).__name__}: it changes its logits after the "
                f"output head ({field}={getattr(config, field)}); set train.loss_chunk_tokens=0"
            )
    head = model.get_output_embeddings()
    if head is None:
        raise HarnessError(f"{type(model).__name__} has no output head for train.loss_chunk_tokens; set it to 0")
    head_forward = head.forward

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        chunking = _targets.get()
        if chunking is None:
            return head_forward(hidden)
        targets, chunk = chunking
        flat_hidden, flat_targets = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
        losses = [
            checkpoint(_chunk_losses, head_forward, flat_hidden[i:i + chunk], flat_targets[i:i + chunk],
                       use_reentrant=False)
            for i in range(0, flat_targets.numel(), chunk)
        ]
        return torch.cat(losses).view(targets.shape)

    head.forward = forward


def _chunk_losses(head_forward, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head_forward(hidden).float(), targets, reduction="none")


def _chunked_token_losses(model: nn.Module, batch, chunk_tokens: int) -> torch.Tensor:
    """fp32 cross entropy of every next-token prediction, shape (rows, predictions), computed by
    the chunked head (the model went through enable_chunked_loss); 0 where no loss is taken."""
    if isinstance(batch, dict):
        # The head sees every input position; the last one predicts nothing (-100).
        labels = batch["labels"]
        targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        token = _targets.set((targets, chunk_tokens))
        try:
            return _forward(model, batch).logits[:, :-1]
        finally:
            _targets.reset(token)
    token = _targets.set((batch[:, 1:], chunk_tokens))
    try:
        with unpacked_sequences():
            return model(input_ids=batch[:, :-1]).logits
    finally:
        _targets.reset(token)


def _logits(output) -> torch.Tensor:
    """A transformers model returns an output with `.logits`; a plain module, the logits."""
    return output.logits if hasattr(output, "logits") else output


def _forward(model: nn.Module, batch: dict):
    """A dict batch through the model: with `position_ids` (packed examples), attention stays
    within each example."""
    if "position_ids" in batch:
        with sequence_layout(packed=True):
            return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    with unpacked_sequences():
        return model(batch["input_ids"])


def token_losses(model: nn.Module, batch, chunk_tokens: int = 0) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """fp32 loss of every next-token prediction, shape (rows, predictions), and the mask of those
    that count (None: all). A token batch (rows, L + 1) holds inputs and targets; a dict batch's
    `labels` are aligned with its `input_ids` (transformers' convention), -100 where no loss is
    taken (prompts, padding, the first token of each packed example)."""
    if isinstance(batch, dict):
        mask = batch["labels"][:, 1:] != -100
        if chunk_tokens:
            return _chunked_token_losses(model, batch, chunk_tokens), mask
        logits = _logits(_forward(model, batch))[:, :-1]
        targets = batch["labels"][:, 1:]
        losses = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100,
                                 reduction="none").view(targets.shape)
        return losses, mask
    if chunk_tokens:
        return _chunked_token_losses(model, batch, chunk_tokens), None
    with unpacked_sequences():
        logits = _logits(model(batch[:, :-1]))
    targets = batch[:, 1:]
    losses = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    return losses.view(targets.shape), None


def loss_sum_and_count(model: nn.Module, batch, chunk_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed fp32 loss over the batch's trained tokens, and how many there are (a device
    tensor: the host never counts them). The trainer divides sums by counts only once they are
    summed over the whole global batch."""
    losses, mask = token_losses(model, batch, chunk_tokens)
    if mask is None:
        return losses.sum(), torch.tensor(losses.numel(), dtype=torch.float32, device=losses.device)
    return losses.sum(), mask.sum().to(torch.float32)


def next_token_loss(model: nn.Module, batch, chunk_tokens: int = 0) -> torch.Tensor:
    """Mean next-token cross entropy over the batch's trained tokens, in fp32 whatever the compute
    dtype. chunk_tokens > 0: chunked (same value up to the order of the fp32 sum)."""
    total, count = loss_sum_and_count(model, batch, chunk_tokens)
    return total / count


def per_sequence_sums(model: nn.Module, batch, chunk_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed fp32 loss and trained-token count, for evaluation."""
    losses, mask = token_losses(model, batch, chunk_tokens)
    if mask is None:
        return losses.sum(dim=1), torch.full((losses.size(0),), losses.size(1), dtype=torch.float32,
                                             device=losses.device)
    return losses.sum(dim=1), mask.sum(dim=1).to(torch.float32)


def per_sequence_loss(model: nn.Module, batch, chunk_tokens: int = 0) -> torch.Tensor:
    """Mean next-token cross entropy of each sequence (fp32)."""
    sums, counts = per_sequence_sums(model, batch, chunk_tokens)
    return sums / counts.clamp(min=1)
