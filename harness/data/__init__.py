"""Text -> tokens -> packed fixed-length sequences -> a globally defined batch order.

sources.py   where the text comes from, read as documents in a fixed order, in bounded memory
prepare.py   tokenization into shard files + an index, once per filesystem, crash-safe
stream.py    the prepared (or user-supplied, data.format=tokens) token stream, memory-mapped
corpus.py    a config's corpus: one source or a weighted mixture, split into train and validation
order.py     packed sequences and the world-size-independent global batch order
batch.py     what a batch is (a token tensor, or a dict of them) and what is done to one
user.py      datasets a user hands to harness.Trainer(data=...), batched and ordered the same way

Names are imported on first use: the tokenizing worker processes import prepare.py without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BatchShape": "order", "GlobalOrder": "order", "MixedSequences": "order", "PackedSequences": "order",
    "PrefetchedBatches": "order", "TrainBatches": "order", "eval_batches": "order",
    "CorpusPart": "corpus", "TokenCorpus": "corpus", "load_corpus": "corpus", "load_tokenizer": "corpus",
    "TokenStream": "stream",
    "user_sequences": "user", "to_device": "batch", "first_rows": "batch",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'harness.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"harness.data.{_EXPORTS[name]}"), name)
