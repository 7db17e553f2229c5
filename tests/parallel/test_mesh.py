"""The job's mesh (harness.parallel.mesh) and the runs that place a piece of any sharding in its
parameter (harness.parallel.base): pure arithmetic, checked against torch's own layout and slicing."""

from __future__ import annotations

import itertools

import pytest
import torch

from harness.config import ParallelConfig
from harness.parallel.base import StatePiece, box_runs, flat_range
from harness.parallel.mesh import MeshShape, ParallelMesh


def _elements(runs) -> list[int]:
    return [offset + i for run in runs for offset, length in run.spans() for i in range(length)]


@pytest.mark.parametrize("shape", [(6,), (4, 6), (3, 4, 5), (2, 3, 4, 2)])
def test_every_box_of_a_tensor_is_its_elements_in_the_boxs_own_order(shape):
    full = torch.arange(torch.Size(shape).numel()).view(shape)
    for starts in itertools.product(*(range(n) for n in shape)):
        for sizes in itertools.product(*(range(1, n - s + 1) for n, s in zip(shape, starts))):
            box = full[tuple(slice(s, s + n) for s, n in zip(starts, sizes))]
            runs = box_runs(shape, starts, sizes)
            assert _elements(runs) == box.reshape(-1).tolist(), (starts, sizes)
            assert len(runs) <= max(1, torch.Size(sizes[:-2]).numel())  # compact: strided runs, not rows


def test_a_dim0_shard_and_a_whole_tensor_are_one_flat_run():
    assert box_runs((8, 4), (2, 0), (3, 4)) == flat_range(8, 12)
    assert box_runs((8, 4), (0, 0), (8, 4)) == flat_range(0, 32)
    assert box_runs((8, 4), (2, 1), (3, 2))[0].as_list() == [9, 2, 3, 4]


def test_a_piece_hands_out_one_view_per_stretch_into_its_live_tensor():
    live = torch.zeros(6)
    piece = StatePiece("w", (4, 6), box_runs((4, 6), (1, 2), (2, 3)), {"param": live})
    views = piece.flat_views()
    assert [offset for offset, _ in views] == [8, 14]
    views[1][1].fill_(1.0)
    assert live.tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("replicate,world", [(1, 1), (1, 4), (2, 4), (4, 4), (2, 8)])
def test_coordinates_are_init_device_mesh_order_and_data_ranks_are_the_world_today(replicate, world):
    shape = MeshShape.of(ParallelConfig(replicate=replicate), world)
    assert (shape.world, shape.data_parallel) == (world, world)
    seen = [shape.coordinates(rank) for rank in range(world)]
    assert seen[0] == {"replicate": 0, "shard": 0}
    # Consecutive ranks shard together: a shard group is a run of neighbours (one node).
    assert [c["replicate"] for c in seen] == [rank // (world // replicate) for rank in range(world)]
    assert [c["shard"] for c in seen] == [rank % (world // replicate) for rank in range(world)]


def test_a_one_rank_mesh_is_built_on_the_process_group(world_of_one):
    mesh = ParallelMesh(MeshShape(), "cpu", 0)
    assert (mesh.data_rank, mesh.data_size, mesh.describe()) == (0, 1, "1 rank")
    assert mesh.sharding_mesh().mesh_dim_names == ("shard",)
