"""DTensor placements -> the exact global index ranges of a rank's local shard.

A DTensor's local shard is made by applying its placements left to right, one mesh
dimension at a time, to what the previous ones left (``distribute_tensor`` does exactly
this): ``Shard(d)`` cuts dimension ``d`` of the current piece like ``torch.chunk`` (chunks of
``ceil(n / k)``, the last ones short or empty) and keeps chunk ``coordinate``;
``_StridedShard(d, split_factor=s)`` first cuts the current piece into ``s`` chunks, cuts each
of those into ``k`` chunks, and keeps chunk ``coordinate`` of every one of them, in order (the
right-to-left sharding FSDP2 over TP produces); ``Replicate`` keeps everything.

The current piece along a dimension is kept as a list of global ``[begin, end)`` ranges in
local order, so a strided shard is several ranges, exactly, where a "local shape + global
offset" box would be wrong. Pure functions of shapes, mesh sizes and coordinates: the tests
compare them with torch's own ``distribute_tensor``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Ranges = list[tuple[int, int]]


class PlacementError(ValueError):
    """A placement that cannot be loaded into (``Partial``, unknown kinds)."""


def _chunk(length: int, chunks: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of chunk ``index`` when ``torch.chunk`` cuts ``length`` into ``chunks``
    (``torch.distributed.tensor`` fills the missing trailing chunks with empty ones)."""
    size = -(-length // chunks) if length else 0
    return min(index * size, length), min((index + 1) * size, length)


def _take(ranges: Ranges, start: int, stop: int) -> Ranges:
    """The sub-list of ``ranges`` at local positions ``[start, stop)``."""
    out: Ranges = []
    pos = 0
    for b, e in ranges:
        n = e - b
        lo, hi = max(start, pos), min(stop, pos + n)
        if lo < hi:
            out.append((b + lo - pos, b + hi - pos))
        pos += n
    return out


def _length(ranges: Ranges) -> int:
    return sum(e - b for b, e in ranges)


def shard(ranges: Ranges, chunks: int, index: int) -> Ranges:
    """``Shard``: chunk ``index`` of ``chunks``."""
    return _take(ranges, *_chunk(_length(ranges), chunks, index))


def strided_shard(ranges: Ranges, split_factor: int, chunks: int, index: int) -> Ranges:
    """``_StridedShard``: chunk ``index`` of every one of ``split_factor`` chunks."""
    out: Ranges = []
    total = _length(ranges)
    for j in range(split_factor):
        piece = _take(ranges, *_chunk(total, split_factor, j))
        out.extend(shard(piece, chunks, index))
    return out


def _merge(ranges: Ranges) -> Ranges:
    out: Ranges = []
    for b, e in ranges:
        if b == e:
            continue
        if out and out[-1][1] == b:
            out[-1] = (out[-1][0], e)
        else:
            out.append((b, e))
    return out


def kind(p: Any) -> str:
    """``"replicate"``, ``"shard"``, ``"strided"``, ``"partial"`` or ``"unknown"``."""
    from torch.distributed.tensor import placement_types

    strided = getattr(placement_types, "_StridedShard", None)
    if strided is not None and isinstance(p, strided):  # before Shard: older torch subclasses it
        return "strided"
    if p.is_shard():
        return "shard"
    if p.is_replicate():
        return "replicate"
    if p.is_partial():
        return "partial"
    return "unknown"


def local_ranges(
    global_shape: Sequence[int],
    mesh_shape: Sequence[int],
    coordinate: Sequence[int],
    placements: Sequence[Any],
) -> list[Ranges]:
    """Per tensor dimension, the global ranges of this rank's local shard, in local order.

    Raises :class:`PlacementError` for ``Partial`` (its local values are addends of the
    tensor, not slices of it) and placements this function does not know.
    """
    ndim = len(global_shape)
    ranges: list[Ranges] = [[(0, int(n))] if n else [] for n in global_shape]
    for mesh_dim, p in enumerate(placements):
        k = kind(p)
        if k == "replicate":
            continue
        if k == "partial":
            raise PlacementError(
                f"{p} on mesh dimension {mesh_dim}: a Partial tensor holds addends of the "
                "checkpoint's values, not slices; redistribute it to Shard or Replicate first"
            )
        if k == "unknown":
            raise PlacementError(f"{p} on mesh dimension {mesh_dim}: unsupported placement")
        d = int(p.dim)
        d = d + ndim if d < 0 else d
        if not 0 <= d < ndim:
            raise PlacementError(f"{p} on mesh dimension {mesh_dim}: no dimension {d}")
        n, c = int(mesh_shape[mesh_dim]), int(coordinate[mesh_dim])
        if k == "strided":
            ranges[d] = strided_shard(ranges[d], int(p.split_factor), n, c)
        else:
            ranges[d] = shard(ranges[d], n, c)
    return [_merge(r) for r in ranges]


def shape_of(ranges: Sequence[Ranges]) -> tuple[int, ...]:
    """The local shape the ranges make."""
    return tuple(_length(list(r)) for r in ranges)
