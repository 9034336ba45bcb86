"""``load_state_dict``: fills a trainer's state dict (plain tensors and DTensors) in place
from a Hugging Face checkpoint, each rank reading only its local shards.

The state dict is the plan: every entry becomes one slice request (the checkpoint tensor
and, per dimension, the global index ranges of the local shard, from the DTensor's mesh and
placements, see ``_placements``). The requests go to the Rust library (``SliceJob``), which
plans them into copy runs, agrees with the other ranks and reads (alone, or sharing reads
under a share mode) straight into the tensors' storage when the dtype matches on the CPU,
else into a staging arena from which the values are cast with ``Tensor.copy_``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import _dtypes, _placements
from ._safeshard import NativeCheckpoint, SafeshardError, load_slices

if TYPE_CHECKING:
    import torch



@dataclass(frozen=True)
class Reindex:
    """A ``key_map`` value for a tensor whose layout reorders the checkpoint's along one
    dimension: index ``i`` of the state-dict tensor along ``dim`` is index ``index[i]`` of
    checkpoint tensor ``name`` (the other dimensions match). torchtitan's Llama ``wq``/``wk``
    are the Hugging Face ``q_proj``/``k_proj`` with rows permuted this way (RoPE layout):
    each rank still reads exactly the rows of its own shard."""

    name: str
    dim: int
    index: Sequence[int]


KeyMap = (
    Mapping[str, "str | Reindex"] | Callable[[str], "str | Reindex | None"] | None
)


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_state_dict` did on this rank."""

    tensors: int
    """State-dict entries filled (tied entries sharing storage with a loaded one included)."""
    bytes_read: int
    """Tensor-data bytes this rank requested from storage (headers excluded, page-rounded)."""
    seconds: float
    """Wall time of the call on this rank."""
    missing: list[str] = field(default_factory=list)
    """Keys with no checkpoint tensor, left as they were (``strict=False`` only)."""
    skipped: list[str] = field(default_factory=list)
    """Keys for which ``key_map`` returned ``None``, left as they were."""
    bytes_received: int = 0
    """Bytes this rank received from other ranks (share modes)."""


# Seconds any collective of a load may wait for the other ranks (ten minutes, like
# torch.distributed's default).
_TIMEOUT = 600.0


class _Refused(Exception):
    """One entry that cannot be loaded: the message names the key and checkpoint name."""


@dataclass
class _Entry:
    key: str
    name: str
    local: torch.Tensor
    ranges: list[list[tuple[int, int]]]
    stored_dtype: str
    buffer: Any
    """Where the bytes go: the local tensor itself (CPU, same dtype, contiguous), a pinned
    buffer (CUDA tensors), or ``None`` (the staging arena, then ``copy_``)."""


def _label(key: str, name: str) -> str:
    return f"state dict key {key!r} (checkpoint tensor {name!r})"


def _map_key(key: str, key_map: KeyMap) -> tuple[str, Reindex | None] | None:
    """The checkpoint name of ``key`` and its reindexing, or ``None`` to skip it."""
    if key_map is None:
        return key, None
    got: object = key_map.get(key, key) if isinstance(key_map, Mapping) else key_map(key)
    if got is None or isinstance(got, str):
        return None if got is None else (got, None)
    if isinstance(got, Reindex) and isinstance(got.name, str):
        return got.name, got
    raise _Refused(
        f"state dict key {key!r}: key_map gave a {type(got).__name__}, not a checkpoint "
        "tensor name (str), a safeshard.Reindex or None"
    )


def _reindexed(
    label: str, ranges: list[list[tuple[int, int]]], shape: Sequence[int], stored: Sequence[int],
    r: Reindex,
) -> list[list[tuple[int, int]]]:
    """``ranges`` (in the state-dict tensor's indices) in the checkpoint tensor's indices."""
    index = [int(i) for i in (r.index.tolist() if hasattr(r.index, "tolist") else r.index)]
    d = r.dim + len(shape) if r.dim < 0 else r.dim
    if not 0 <= d < len(shape) or len(stored) != len(shape):
        raise _Refused(f"{label}: Reindex dim {r.dim} for shape {list(shape)}")
    if len(index) != shape[d] or any(not 0 <= i < stored[d] for i in index):
        raise _Refused(
            f"{label}: Reindex along dim {d} needs {shape[d]} indices in [0, {stored[d]}), got "
            f"{len(index)}"
        )
    mapped: list[tuple[int, int]] = []
    for b, e in ranges[d]:
        for i in index[b:e]:
            if mapped and mapped[-1][1] == i:
                mapped[-1] = (mapped[-1][0], i + 1)
            else:
                mapped.append((i, i + 1))
    return [*ranges[:d], mapped, *ranges[d + 1 :]]


def _shard_of(key: str, name: str, value: Any) -> tuple[Any, list[list[tuple[int, int]]]] | None:
    """The local tensor and its global ranges, or ``None`` when this rank holds no part."""
    from torch.distributed.tensor import DTensor

    if not isinstance(value, DTensor):
        return value, [[(0, int(n))] if n else [] for n in value.shape]
    mesh = value.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # this rank is outside the tensor's mesh
        return None
    try:
        ranges = _placements.local_ranges(
            tuple(value.shape), tuple(mesh.shape), coordinate, value.placements
        )
    except _placements.PlacementError as e:
        raise _Refused(f"{_label(key, name)}: {e}") from None
    local = value.to_local()
    want = _placements.shape_of(ranges)
    if tuple(local.shape) != want:
        raise _Refused(
            f"{_label(key, name)}: the local shard has shape {list(local.shape)} but its "
            f"placements {list(value.placements)} on mesh {tuple(mesh.shape)} give "
            f"{list(want)} (a shard made by other rules than DTensor's, e.g. FSDP2 over an "
            "uneven TP split)"
        )
    return local, ranges


def _storage_key(t: Any) -> tuple[Any, ...] | None:
    """What identifies a tensor's memory: two keys with the same one are tied."""
    if t.numel() == 0:
        return None
    return (
        t.device,
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        tuple(t.shape),
        tuple(t.stride()),
        t.dtype,
    )


@dataclass
class _Planned:
    entries: list[_Entry] = field(default_factory=list)
    filled: int = 0
    missing: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _plan(
    state_dict: Mapping[str, Any],
    catalog: Mapping[str, tuple[str, tuple[int, ...]]],
    where: str,
    key_map: KeyMap,
    strict: bool,
) -> _Planned:
    """Checks every entry and makes the requests; nothing is read or written."""
    import torch

    out = _Planned()
    # Tied entries: the first entry of a storage whose checkpoint tensor exists loads it.
    loader_of: dict[tuple[Any, ...], str] = {}
    pending_missing: list[tuple[str, str, tuple[Any, ...] | None]] = []
    for key, value in state_dict.items():
        try:
            if not isinstance(key, str):
                raise _Refused(f"state dict key {key!r}: keys must be str")
            if not isinstance(value, torch.Tensor):
                raise _Refused(f"state dict key {key!r}: a {type(value).__name__}, not a tensor")
            mapped = _map_key(key, key_map)
            if mapped is None:
                out.skipped.append(key)
                continue
            name, reindex = mapped
            stored = catalog.get(name)
            shard = _shard_of(key, name, value)
            local = shard[0] if shard is not None else None
            tie = None if local is None else _storage_key(local)
            if stored is None:
                pending_missing.append((key, name, tie))
                continue
            dtype, shape = stored
            if reindex is not None:
                whole = [[(0, int(n))] for n in value.shape]
                ranges = _reindexed(
                    _label(key, name), whole if shard is None else shard[1], value.shape, shape,
                    reindex,
                )
                shard = None if shard is None else (shard[0], ranges)
                # Checked above: the reindexed dimension has the state-dict tensor's size.
                d = reindex.dim % len(shape)
                shape = tuple(value.shape[i] if i == d else n for i, n in enumerate(shape))
            if tuple(value.shape) != tuple(shape):
                raise _Refused(
                    f"{_label(key, name)}: shape {list(value.shape)}; the checkpoint's is "
                    f"{list(shape)} ({where})"
                )
            if _dtypes.torch_dtype(dtype) is None:
                raise _Refused(
                    f"{_label(key, name)}: the checkpoint's {dtype} has no torch dtype to "
                    "cast from"
                )
            if local is not None and local.is_complex() != (dtype == "C64"):
                raise _Refused(
                    f"{_label(key, name)}: cannot cast the checkpoint's {dtype} to {local.dtype}"
                )
            if tie is not None and tie in loader_of:
                out.filled += 1  # shares storage with a loaded entry
                continue
            if tie is not None:
                loader_of[tie] = key
            out.filled += 1
            if shard is None or local is None or local.numel() == 0:
                continue
            out.entries.append(_Entry(key, name, local, shard[1], dtype, _buffer(local, dtype)))
        except _Refused as e:
            out.errors.append(str(e))
    for key, name, tie in pending_missing:
        if tie is not None and tie in loader_of:
            out.filled += 1  # tied to an entry that is loaded
        elif strict:
            out.errors.append(f"{_label(key, name)}: the checkpoint has no such tensor ({where})")
        else:
            out.missing.append(key)
    return out


def _buffer(local: Any, dtype: str) -> Any:
    """The memory the checkpoint bytes of ``local`` are read into (see ``_Entry.buffer``)."""
    import torch

    stored = _dtypes.torch_dtype(dtype)
    if local.device.type == "cpu":
        same = local.dtype == stored and local.is_contiguous()
        return local.detach() if same else None
    # Device tensors: read into page-locked host memory, then one DMA per tensor.
    return torch.empty(tuple(local.shape), dtype=stored, pin_memory=True)


def _comm(group: Any) -> Any:
    """The communicator of ``group``: a ``TorchComm``, or ``None`` for a process alone."""
    try:
        import torch.distributed as dist

        initialized = dist.is_available() and dist.is_initialized()
    except ImportError:
        initialized = False
    if not initialized:
        if group is not None:
            from . import _error

            raise _error(
                "usage", "group: torch.distributed is not initialized (init_process_group first)"
            )
        return None
    from ._dist import TorchComm

    # Every collective of the load has this deadline (as Plan.load_shared's default).
    return TorchComm(group, timeout=_TIMEOUT)


def _finish(entries: list[_Entry], arena: dict[str, Any]) -> None:
    """Puts the values of entries not read in place into their tensors: staged ones from
    the arena, pinned ones from their buffers (queued on the current stream, then waited
    for), cast as ``Tensor.copy_`` casts."""
    import torch

    device = False
    with torch.no_grad():
        for e in entries:
            if e.buffer is None:
                e.local.copy_(arena[e.key])
            elif e.local.device.type != "cpu":
                e.local.copy_(e.buffer, non_blocking=True)
                device = True
    if device:
        torch.cuda.synchronize()


def load_state_dict(
    state_dict: Mapping[str, Any],
    checkpoint: str | os.PathLike[str],
    *,
    key_map: KeyMap = None,
    share: str = "none",
    group: Any = None,
    strict: bool = True,
) -> LoadReport:
    """Fills ``state_dict`` (``model.state_dict()``, ``get_model_state_dict(model)``: plain
    tensors and DTensors) in place from a Hugging Face checkpoint, each rank reading only
    the bytes of its local shards.

    Collective over ``group`` (default: the default process group; without
    ``torch.distributed`` the process loads alone): every rank calls it, with its own state
    dict. A DTensor's local shard gets exactly the checkpoint bytes of that shard, for any
    mesh and ``Shard`` (even or not), ``Replicate`` and ``_StridedShard`` placements;
    ``Partial`` is refused. A plain tensor is filled whole.

    ``checkpoint``: a directory, an index, one ``.safetensors`` file, a Hugging Face cache
    snapshot or a repo id in the local cache. ``key_map``: ``None`` (identity), a dict
    ``{key: checkpoint_name}`` (keys it does not name keep their name) or a callable
    ``key -> name`` (``None`` skips the key, listed in ``report.skipped``). ``share``:
    ``"none"``, ``"broadcast"`` (shards several ranks hold are read once and broadcast) or
    ``"read-once"`` (every byte of the job read once and exchanged). Values are cast as
    ``Tensor.copy_`` casts them when the dtype differs from the checkpoint's.

    ``strict=True``: a key with no checkpoint tensor, a global shape unlike the stored one or
    an unsupported placement is one :class:`SafeshardError` on every rank, raised before any
    tensor is written (the ranks agree first). ``strict=False`` skips missing keys
    (``report.missing``); shapes and placements are always checked. A key whose tensor shares
    storage with a loaded key (tied weights) counts as loaded. A read that fails mid-load
    raises on every rank.
    """
    start = time.perf_counter()
    comm = _comm(group)
    from . import _error, _resolve_path

    local_error: SafeshardError | None = None
    native: NativeCheckpoint | None = None
    planned = _Planned()
    try:
        if key_map is not None and not isinstance(key_map, Mapping) and not callable(key_map):
            raise _error(
                "usage",
                f"key_map: expected None, a dict or a callable, got {type(key_map).__name__}",
            )
        if not isinstance(state_dict, Mapping):
            raise _error(
                "usage", f"state_dict: expected a mapping, got {type(state_dict).__name__}"
            )
        native = NativeCheckpoint(_resolve_path(checkpoint))
        planned = _plan(state_dict, native.tensors(), native.root, key_map, strict)
        if planned.errors:
            more = len(planned.errors) - 1
            tail = f" (and {more} more)" if more else ""
            raise _error("plan", planned.errors[0] + tail)
    except SafeshardError as e:
        local_error = e
        planned = _Planned()
    except Exception as e:  # noqa: BLE001 - whatever fails here must fail every rank
        local_error = _error("plan", f"{type(e).__name__}: {e}")
        planned = _Planned()
    requests = [(e.key, e.name, e.ranges) for e in planned.entries]
    into = [(e.key, e.buffer) for e in planned.entries if e.buffer is not None]
    try:
        rank = load_slices(
            native,
            comm,
            requests,
            into,
            precheck=None if local_error is None else str(local_error),
            share=share,
            timeout=_TIMEOUT,
        )
    except SafeshardError:
        if local_error is not None:
            raise local_error from None
        raise
    from . import Rank

    _finish(planned.entries, Rank(rank).torch())
    stats = rank.stats()
    return LoadReport(
        tensors=planned.filled,
        bytes_read=int(stats["read_bytes"]),
        seconds=time.perf_counter() - start,
        missing=planned.missing,
        skipped=planned.skipped,
        bytes_received=int(stats["received_bytes"]),
    )
