"""A model from a callable (harness.Trainer(model=...)): built on the meta device, its blocks named,
its initial weights its layers' own reset_parameters(), seeded per block like a transformers model's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.config import ModelConfig
from harness.errors import HarnessError
from harness.model.blocks import transformer_blocks
from harness.model.source import CallableModel
from harness.model.weights import fill_flat_views


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.linear = nn.Linear(8, 8)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.layers = nn.ModuleList(Layer() for _ in range(3))
        self.head = nn.Linear(8, 16)


def _source(blocks=lambda m: list(m.layers)) -> CallableModel:
    return CallableModel(Net, blocks, ModelConfig())


def _whole(source: CallableModel, seed: int) -> dict[str, torch.Tensor]:
    model = source.skeleton()
    values = {n: torch.empty(p.shape) for n, p in model.named_parameters()}
    fill_flat_views({n: [(0, v.view(-1))] for n, v in values.items()}, source.initial_weights(seed))
    return values


def test_the_skeleton_is_on_the_meta_device_with_its_blocks_named():
    source = _source()
    model = source.skeleton()
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert transformer_blocks(model) == list(model.layers)
    assert source.hidden_size == 8
    assert source.describe(model) == '{"harness_custom_model": "tests.model.test_source.Net"}'


def test_initial_weights_are_each_layers_reset_parameters_seeded_per_block():
    source = _source()
    first, again, other = _whole(source, 0), _whole(source, 0), _whole(source, 1)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not torch.equal(first["layers.0.linear.weight"], other["layers.0.linear.weight"])
    assert torch.equal(first["layers.1.norm.weight"], torch.ones(8))  # LayerNorm.reset_parameters
    # Blocks differ from each other (each is seeded by its own name), and from a fresh nn.Linear's range.
    assert not torch.equal(first["layers.0.linear.weight"], first["layers.1.linear.weight"])
    assert first["layers.0.linear.weight"].abs().max() <= 8 ** -0.5
    # Pieces read one at a time are the same elements as the whole.
    model = source.skeleton()
    pieces = {n: torch.empty(p.numel() // 2) for n, p in model.named_parameters() if p.numel() % 2 == 0}
    fill_flat_views({n: [(v.numel(), v)] for n, v in pieces.items()}, source.initial_weights(0))
    for name, piece in pieces.items():
        assert torch.equal(piece, first[name].view(-1)[piece.numel():]), name


def test_blocks_that_cannot_be_told_are_one_line():
    with pytest.raises(HarnessError, match="cannot tell the transformer blocks of Net; pass blocks="):
        _source(blocks=None)
    with pytest.raises(HarnessError, match=r"names 2 modules, but 3 modules of their classes \(Layer\)"):
        _source(blocks=lambda m: list(m.layers)[:2])
    with pytest.raises(HarnessError, match="must return an nn.Module"):
        CallableModel(lambda: "not a model", None, ModelConfig())


def test_exporting_a_checkpoint_of_a_model_from_a_callable_is_one_line(tmp_path):
    from harness.checkpoint.export import export

    (tmp_path / "model_config.json").write_text(_source().describe(None))
    with pytest.raises(HarnessError, match="tests.model.test_source.Net, a model given to harness.Trainer"):
        export(tmp_path, tmp_path / "out", "fp32")
