"""DTensor placements -> global index ranges (``safeshard._placements``) against torch's own
``distribute_tensor``: every rank of 1-D, 2-D and 3-D meshes, ``Shard`` even and uneven
(empty shards included), ``Replicate`` and ``_StridedShard``, on an ``arange`` tensor whose
local values name the global elements. Each rank is simulated in this one process on
torch's ``fake`` process group (``src_data_rank=None``: local splitting only)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

from safeshard import _placements  # noqa: E402


def torch_local(rank: int, mesh_shape: tuple[int, ...], shape: tuple[int, ...],
                placements: list[Any]) -> tuple[Any, list[int]]:
    from torch.distributed.tensor import DeviceMesh, distribute_tensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    world = 1
    for m in mesh_shape:
        world *= m
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        mesh = DeviceMesh("cpu", torch.arange(world).reshape(mesh_shape))
        g = torch.arange(max(1, _numel(shape)))[: _numel(shape)].reshape(shape)
        local = distribute_tensor(g, mesh, placements, src_data_rank=None).to_local()
        return local.clone(), list(mesh.get_coordinate())
    finally:
        dist.destroy_process_group()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def gathered(shape: tuple[int, ...], ranges: list[list[tuple[int, int]]]) -> Any:
    """The elements the ranges name, by their definition, from the same arange tensor."""
    g = torch.arange(max(1, _numel(shape)))[: _numel(shape)].reshape(shape)
    idx = [torch.tensor([i for b, e in r for i in range(b, e)], dtype=torch.long)
           for r in ranges]
    return g[torch.meshgrid(*idx, indexing="ij")] if len(idx) > 1 else g[idx[0]]


def cases() -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[Any, ...]]]:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    out = []
    for shape, mesh_shape in [((7,), (4,)), ((10, 3), (4,)), ((10, 3), (2, 2)),
                              ((5, 6), (3, 2)), ((0, 4), (2, 2)), ((9, 4, 2), (2, 2, 2))]:
        opts: list[Any] = [Replicate()] + [Shard(d) for d in range(len(shape))]
        opts += [_StridedShard(0, split_factor=s) for s in (2, 3)]
        combos = list(itertools.product(opts, repeat=len(mesh_shape)))
        # 3-D meshes: every 7th combination keeps the test short.
        out += [(shape, mesh_shape, c) for c in combos[:: 7 if len(mesh_shape) == 3 else 1]]
    return out


def test_local_ranges_match_distribute_tensor() -> None:
    checked = 0
    for shape, mesh_shape, placements in cases():
        world = _numel(mesh_shape)
        for rank in range(world):
            local, coord = torch_local(rank, mesh_shape, shape, list(placements))
            ranges = _placements.local_ranges(shape, mesh_shape, coord, placements)
            want = gathered(shape, ranges)
            assert tuple(local.shape) == _placements.shape_of(ranges), (shape, placements, rank)
            assert torch.equal(local, want), (shape, mesh_shape, placements, rank, ranges)
            checked += 1
    assert checked > 500


def test_partial_is_refused() -> None:
    from torch.distributed.tensor import Partial, Shard

    with pytest.raises(_placements.PlacementError, match="Partial"):
        _placements.local_ranges((4, 4), (2, 2), (0, 1), [Shard(0), Partial()])


def test_a_lone_strided_shard_is_several_ranges() -> None:
    from torch.distributed.tensor.placement_types import _StridedShard

    # 16 rows, split factor 2 over 4 ranks: rank 1 holds rows 2-3 and 10-11.
    r = _placements.local_ranges((16, 3), (4,), (1,), [_StridedShard(0, split_factor=2)])
    assert r == [[(2, 4), (10, 12)], [(0, 3)]]
