"""Causal LMs from transformers, built so that no rank holds more than it must.

build.py    the model skeleton (meta parameters, real buffers) from model.config or a pretrained
            folder, checked against the tokenizer and the sequence length
blocks.py   the transformer blocks (the units every backend shards), activation checkpointing
            and torch.compile per block
weights.py  the initial weights (seeded per-block init or a safetensors folder), read in pieces;
            `build_model`, the whole model on one process
loss.py     next-token losses

Nothing here knows about ranks or sharding; harness/parallel/ shards the skeleton and writes the
pieces each rank owns.
"""

from harness.model.blocks import transformer_blocks
from harness.model.build import (
    ModelSpec,
    build_skeleton,
    flops_per_token,
    materialize_on,
    model_spec,
    on_meta_device,
)
from harness.model.loss import next_token_loss, per_sequence_loss
from harness.model.weights import InitialWeights, build_model, initial_weights

__all__ = [
    "InitialWeights", "ModelSpec", "build_model", "build_skeleton", "flops_per_token", "initial_weights",
    "materialize_on", "model_spec", "next_token_loss", "on_meta_device", "per_sequence_loss", "transformer_blocks",
]
