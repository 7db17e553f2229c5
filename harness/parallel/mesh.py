"""The job's ranks arranged in named dimensions: built once from the config, handed to the backend
and read by everything that asks "which data does this rank take" or "is this copy the first".

Dimensions, outermost first (consecutive ranks differ in the innermost one, so an inner dimension's
frequent collectives stay on a node):

    replicate   HSDP replicas (FSDP2) or hpZ groups (ZeRO-3): parallel.replicate
    shard       the ranks one copy of the sharded state is spread over

The data-parallel ranks are replicate x shard: each takes its own slice of the global batch. Context,
tensor and expert parallelism add dimensions inside `shard` whose ranks share a data slice; until
then the data-parallel coordinates equal the world's. No component builds a mesh of its own or uses
the world rank as its data rank: torchtitan's ParallelDims is the model (one mesh, named views).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from harness.config import ParallelConfig

DIMENSIONS = ("replicate", "shard")
DATA_PARALLEL = ("replicate", "shard")
"""The dimensions whose ranks take different data."""


@dataclass(frozen=True)
class MeshShape:
    """How many ranks each dimension has; torch-free, so config checks and `harness estimate` can
    reason about a layout without a process group."""

    replicate: int = 1
    shard: int = 1

    @classmethod
    def of(cls, parallel: ParallelConfig, world_size: int) -> MeshShape:
        return cls(replicate=parallel.replicate, shard=world_size // parallel.replicate)

    def size(self, dim: str) -> int:
        return getattr(self, dim)

    @property
    def world(self) -> int:
        return math.prod(self.size(dim) for dim in DIMENSIONS)

    @property
    def data_parallel(self) -> int:
        """Ranks that take different data: the global batch is micro_batch_size x grad_accum x this."""
        return math.prod(self.size(dim) for dim in DATA_PARALLEL)

    def coordinates(self, rank: int) -> dict[str, int]:
        """A world rank's place on every dimension (row-major, the innermost dimension fastest:
        the order init_device_mesh lays ranks out in)."""
        coords = {}
        for dim in reversed(DIMENSIONS):
            rank, coords[dim] = divmod(rank, self.size(dim))
        return {dim: coords[dim] for dim in DIMENSIONS}


class ParallelMesh:
    """The device mesh of one job: its shape, this rank's coordinates, and the torch DeviceMesh over
    the dimensions with more than one rank (a dimension of size 1 costs no process group)."""

    def __init__(self, shape: MeshShape, device_type: str, rank: int) -> None:
        self.shape = shape
        self.coordinates = shape.coordinates(rank)
        self.sharding_dims = tuple(dim for dim in ("replicate", "shard") if dim == "shard" or shape.size(dim) > 1)
        """The dimensions FSDP2 shards and replicates over: 1-D (shard), or 2-D for HSDP."""
        self.device_mesh: DeviceMesh = init_device_mesh(
            device_type, tuple(shape.size(dim) for dim in self.sharding_dims), mesh_dim_names=self.sharding_dims
        )
        built = dict(zip(self.sharding_dims, self.device_mesh.get_coordinate() or ()))
        if any(built[dim] != self.coordinates[dim] for dim in built):
            raise AssertionError(f"torch laid rank {rank} out at {built}, harness expected {self.coordinates}")

    @property
    def data_rank(self) -> int:
        """This rank's index among the data-parallel ranks: which slice of the global batch it takes,
        which held-out sequences it evaluates, which dropout stream it draws."""
        index = 0
        for dim in DATA_PARALLEL:
            index = index * self.shape.size(dim) + self.coordinates[dim]
        return index

    @property
    def data_size(self) -> int:
        return self.shape.data_parallel

    def sharding_mesh(self) -> DeviceMesh:
        """What FSDP2's fully_shard takes: a 1-D shard mesh, or (replicate, shard) for HSDP."""
        return self.device_mesh

    def describe(self) -> str:
        dims = [f"{dim} {self.shape.size(dim)}" for dim in DIMENSIONS if self.shape.size(dim) > 1]
        return " x ".join(dims) if dims else "1 rank"


def holds_first_copy(tensor: torch.Tensor) -> bool:
    """Whether this rank's local part of `tensor` (a DTensor, or a plain tensor: this rank's alone)
    is the first copy of its elements: on every mesh dimension the tensor is replicated over, this
    rank sits at coordinate 0. Sums over the ranks (a gradient norm, the elements a checkpoint
    holds) count each element once by taking first copies only."""
    placements = getattr(tensor, "placements", None)
    if placements is None:
        return True
    coordinate = tensor.device_mesh.get_coordinate() or ()
    return all(not placement.is_replicate() or index == 0 for placement, index in zip(placements, coordinate))


def build_mesh(parallel: ParallelConfig, world_size: int, rank: int, device: torch.device) -> ParallelMesh:
    """The job's mesh; config validation has checked that parallel.replicate divides the world."""
    return ParallelMesh(MeshShape.of(parallel, world_size), device.type, rank)
