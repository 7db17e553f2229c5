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
def unpacked_sequences():
    """transformers looks for packed sequences in the position ids whenever no attention mask and
    no cache are given (training), with a data-dependent `.all()`: a host sync in every forward,
    and a question a meta tensor cannot answer. harness passes neither position ids nor masks,
    so the positions are 0..L-1 in every row and the answer is always "not packed": give it."""
    from transformers import masking_utils

    if not hasattr(masking_utils, "find_packed_sequence_indices"):  # a transformers without the check
        yield
        return
    with mock.patch.object(masking_utils, "find_packed_sequence_indices", lambda position_ids: None):
        yield


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


def _chunked_token_losses(model: nn.Module, batch: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """fp32 cross entropy of every next-token prediction, shape (batch, seq_len), computed by the
    chunked head (the model went through enable_chunked_loss)."""
    token = _targets.set((batch[:, 1:], chunk_tokens))
    try:
        with unpacked_sequences():
            return model(input_ids=batch[:, :-1]).logits
    finally:
        _targets.reset(token)


def _logits(output) -> torch.Tensor:
    """A transformers model returns an output with `.logits`; a plain module, the logits."""
    return output.logits if hasattr(output, "logits") else output


def _labeled_token_losses(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 losses of every labelled position and the mask of those positions, shape (rows, length - 1):
    `labels` aligned with `input_ids` (transformers' convention), -100 where no loss is taken."""
    with unpacked_sequences():
        logits = _logits(model(batch["input_ids"]))[:, :-1]
    targets = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100,
                             reduction="none").view(targets.shape)
    return losses, targets != -100


def next_token_loss(model: nn.Module, batch, chunk_tokens: int = 0) -> torch.Tensor:
    """Mean next-token cross entropy over the batch, computed in fp32 whatever the compute dtype.
    chunk_tokens > 0: chunked (same value up to the order of the fp32 sum). A dict batch
    (input_ids, labels) averages over its labelled positions."""
    if isinstance(batch, dict):
        losses, mask = _labeled_token_losses(model, batch)
        return losses.sum() / mask.sum()
    if chunk_tokens:
        return _chunked_token_losses(model, batch, chunk_tokens).mean()
    with unpacked_sequences():
        logits = _logits(model(batch[:, :-1]))
    targets = batch[:, 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def per_sequence_loss(model: nn.Module, batch, chunk_tokens: int = 0) -> torch.Tensor:
    """Mean next-token cross entropy of each sequence (fp32), for weighted evaluation."""
    if isinstance(batch, dict):
        losses, mask = _labeled_token_losses(model, batch)
        return losses.sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    if chunk_tokens:
        return _chunked_token_losses(model, batch, chunk_tokens).mean(dim=1)
    with unpacked_sequences():
        logits = _logits(model(batch[:, :-1]))
    targets = batch[:, 1:]
    losses = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    return losses.view(targets.shape).mean(dim=1)
