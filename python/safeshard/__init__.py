"""safeshard: load safetensors checkpoints into TP/PP/DP/EP jobs, each rank reading only
the bytes it holds, as zero-copy torch or numpy tensors.

>>> import safeshard
>>> state = safeshard.load("model-dir", tp=4, rank=1)          # dict[str, torch.Tensor]
>>> plan = safeshard.plan("model-dir", tp=4, pp=2)              # headers only
>>> rank = plan.load(5)
>>> arrays = rank.numpy()                                        # or rank.torch("cuda")
>>> report = safeshard.load_state_dict(model.state_dict(), "model-dir")  # DTensors in place

Planning and loading are the Rust library's (the GIL is released while they run). A loaded
rank is one owned arena; every tensor is a view into it, and the arena lives until the last
view is gone. See docs/python.md.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from . import _dtypes
from ._safeshard import NativePlan, NativeRank, SafeshardError, __version__
from ._safeshard import check_share as _check_share
from ._safeshard import error as _native_error
from ._safeshard import launch_env as _launch_env
from ._safeshard import launcher_variables as _launcher_variables
from ._safeshard import synth as _synth

_log = logging.getLogger("safeshard")

if TYPE_CHECKING:
    import torch

__all__ = [
    "LoadReport",
    "Plan",
    "Rank",
    "RankInfo",
    "Reindex",
    "SafeshardError",
    "TensorInfo",
    "load",
    "load_state_dict",
    "plan",
    "__version__",
]

PathLike = str | os.PathLike[str]


class TensorInfo(NamedTuple):
    """One tensor a rank holds: checkpoint name, safetensors dtype, rank-local shape, bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class RankInfo:
    """What one rank holds and reads, from the plan (nothing loaded)."""

    rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    ep_rank: int
    bytes: int
    """Bytes held after loading (the tensors' sizes, vocab padding included)."""
    read_bytes: int
    """Bytes read from storage (page-rounded)."""
    staging_bytes: int
    arena_bytes: int
    """Size of the rank's one arena (``bytes`` plus alignment gaps)."""
    tensors: tuple[TensorInfo, ...]


def _error(kind: str, message: str) -> SafeshardError:
    """A ``SafeshardError`` found by this module; ``kind`` and ``exit_code`` as the library's
    errors of that kind have them (the mapping is the Rust library's, not repeated here)."""
    return _native_error(kind, message)


def _resolve_path(path: PathLike) -> str:
    """A local path as given; otherwise, when ``huggingface_hub`` is installed, a repo id
    resolved from the local Hugging Face cache only (never the network)."""
    p = os.fspath(path)
    if os.path.exists(p) or os.path.isabs(p) or p.startswith("."):
        return p
    if p.count("/") == 1 and not p.endswith(".safetensors"):
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            return p
        try:
            return str(snapshot_download(p, local_files_only=True))
        except Exception as exc:  # noqa: BLE001 - the hub raises several unrelated types
            raise _error(
                "not_a_checkpoint",
                f"{p}: not a local path and not in the Hugging Face cache "
                f"({type(exc).__name__}; download it first, e.g. `hf download {p}`)",
            ) from None
    return p


class Plan:
    """Every rank's tensors and reads for one checkpoint and topology (from headers only)."""

    def __init__(self, native: NativePlan) -> None:
        self._native = native

    @property
    def world_size(self) -> int:
        """Number of ranks, tp × pp × dp."""
        return self._native.world_size

    @property
    def hash(self) -> str:
        """SHA-256 (hex) of the plan: equal on every rank of a consistent job."""
        return self._native.hash

    @property
    def spec(self) -> str:
        """Name of the sharding spec used."""
        return self._native.spec

    @property
    def warnings(self) -> list[str]:
        """What planning noticed but did not refuse (one line each)."""
        return self._native.warnings

    @property
    def tp(self) -> int:
        return self._native.topology[0]

    @property
    def pp(self) -> int:
        return self._native.topology[1]

    @property
    def dp(self) -> int:
        return self._native.topology[2]

    @property
    def ep(self) -> int:
        return self._native.topology[3]

    def rank(self, rank: int) -> RankInfo:
        """What ``rank`` holds: coordinates, byte counts and its tensors."""
        d = self._native.rank_info(rank)
        tensors = tuple(TensorInfo(n, dt, tuple(s), b) for n, dt, s, b in d.pop("tensors"))
        return RankInfo(tensors=tensors, **d)

    @property
    def ranks(self) -> list[RankInfo]:
        """Every rank's :class:`RankInfo`, in rank order."""
        return [self.rank(r) for r in range(self.world_size)]

    def to_json(self) -> str:
        """The same document as ``safeshard plan --json`` (without the trailing newline)."""
        return self._native.to_json()

    def load(
        self,
        rank: int,
        *,
        io: str = "auto",
        threads: int | None = None,
        progress: bool | None = None,
        out: Any = None,
        into: Mapping[str, Any] | None = None,
        node_ranks: Sequence[int] | None = None,
    ) -> Rank:
        """Loads ``rank`` in this process, reading only its own slices, into one arena.

        ``io`` is ``"auto"`` (the default, as the CLI's: decided per read by what the page
        cache holds), ``"mmap"``, ``"pread"`` or ``"direct"``; ``threads`` the copy threads
        (default: the cores, at least 8 so that several reads are in flight). ``progress``:
        a bar (tqdm) on stderr; ``None`` shows it for rank 0 when stderr is a terminal and
        tqdm is installed. Ctrl-C stops the load between chunks and raises
        ``KeyboardInterrupt``.

        ``out``: load into this memory instead of a fresh arena: a contiguous, writable CPU
        ``torch.Tensor`` (e.g. ``torch.empty(n, dtype=torch.uint8, pin_memory=True)`` for a
        fast device copy), numpy array or other writable buffer of at least
        ``plan.rank(rank).arena_bytes`` bytes, reused across loads without new page faults.
        The rank's tensors are views of it (at their arena offsets); do not use ``out``
        while the load runs.

        ``into``: ``{name: buffer}``, tensors written straight into their final memory (a
        model's parameters: each byte is copied once, from the file to its place, with no
        arena in between). Each buffer is a contiguous, writable CPU ``torch.Tensor`` of the
        tensor's dtype and shape, or a numpy array or writable buffer of exactly its bytes;
        buffers may not overlap. The returned rank holds the other tensors only. Not with
        ``out``; do not use the buffers while the load runs.

        ``node_ranks``: the ranks of this plan that other processes on this machine load at
        the same time (this one included), sharing its page cache. Where together they read
        every byte of a tensor's rows (a tensor-parallel split by columns), each asks the
        kernel for the whole tensor in large requests, starting at a different part, so
        that the disk reads it once, sequentially, instead of one small request per row.
        The bytes loaded are the same either way.
        """
        if into is not None and out is not None:
            raise _error("usage", "out and into: pass one of them")
        targets = None if into is None else _into_buffers(self.rank(rank), into)
        node = None if node_ranks is None else [int(r) for r in node_ranks]
        bad = [r for r in node or [] if not 0 <= r < self.world_size]
        if bad:
            raise _error(
                "usage",
                f"node_ranks: {bad[0]} is not a rank of this plan (0..{self.world_size - 1})",
            )
        cb, close = _progress(self, rank, progress)
        try:
            if targets is not None:
                native = self._native.load_scattered(
                    rank, targets, io=io, threads=threads, progress=cb, node_ranks=node
                )
            elif out is None:
                native = self._native.load(
                    rank, io=io, threads=threads, progress=cb, node_ranks=node
                )
            else:
                native = self._native.load_into(
                    rank, _exportable(out), io=io, threads=threads, progress=cb,
                    node_ranks=node,
                )
        finally:
            close()
        return Rank(native)

    def load_shared(
        self,
        *,
        share: str | None = None,
        process_group: Any = None,
        io: str = "auto",
        threads: int | None = None,
        per_node: bool = False,
        round_bytes: int = 1 << 30,
        progress: bool | None = None,
        timeout: float | None = 600.0,
    ) -> Rank:
        """Loads this process's rank of the job with reads shared between ranks, over
        ``torch.distributed`` (collective: every rank of ``process_group``, default the world
        group, calls it with an equal plan; its size must be the plan's world size).

        ``share``: ``"none"``, ``"broadcast"`` (a tensor several ranks hold is read by one
        and broadcast in a sub-group of exactly its holders) or ``"read-once"`` (every byte
        read once per job, or per node with ``per_node``, in rounds of ``round_bytes``, and
        exchanged with all-to-all); ``None`` (the default): chosen by the job's node count,
        ``"none"`` on one node and ``"broadcast"`` across several (nodes named by
        ``SAFESHARD_NODE``, else the host name), reported as ``stats["share"]`` and
        ``stats["share_default"]``. Sub-groups come from ``dist.new_group``, created by all
        ranks in the same order. A rank that fails makes every rank raise, naming it.

        ``timeout`` (seconds, ``None``: forever) bounds every collective, on every group: a
        rank still waiting after it raises ``SafeshardError`` (``kind == "comm"``) naming the
        phase and the ranks that did not arrive (also as ``.phase`` and ``.missing``).
        """
        if share is not None:
            _check_share(share)
        from ._dist import TorchComm

        comm = TorchComm(process_group, timeout=timeout)
        want = progress if progress is not None else (comm.rank() == 0 and sys.stderr.isatty())
        cb, close = _progress(self, comm.rank(), want)
        try:
            native = self._native.load_shared(
                comm,
                share=share,
                io=io,
                threads=threads,
                per_node=per_node,
                round_bytes=round_bytes,
                progress=cb,
                timeout=timeout,
            )
        finally:
            close()
        return Rank(native)

    def __repr__(self) -> str:
        return (
            f"Plan(world_size={self.world_size}, tp={self.tp}, pp={self.pp}, dp={self.dp}, "
            f"ep={self.ep}, spec={self.spec!r}, hash={self.hash[:12]}…)"
        )


def _into_buffers(info: RankInfo, into: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``(name, buffer)`` per entry of ``into``, torch tensors checked against the rank's
    tensor of that name (dtype and shape; the native side checks every buffer's memory: CPU,
    contiguous, writable, exactly the tensor's bytes)."""
    if not isinstance(into, Mapping):
        kind = type(into).__name__
        raise _error("usage", f"into: expected a mapping of tensor names to buffers, got {kind}")
    held = {t.name: t for t in info.tensors}
    out = []
    for name, buf in into.items():
        t = held.get(name)
        if t is None:
            raise _error(
                "usage", f"into: {name!r}: rank {info.rank} holds no tensor of that name"
            )
        if hasattr(buf, "data_ptr") and hasattr(buf, "untyped_storage"):
            want = _dtypes.torch_dtype(t.dtype)
            if want is not None and buf.dtype != want:
                raise _error(
                    "usage", f"into: {name!r}: a {buf.dtype} tensor; the checkpoint holds {t.dtype}"
                )
            if tuple(buf.shape) != t.shape:
                raise _error(
                    "usage",
                    f"into: {name!r}: shape {list(buf.shape)}; the tensor's is {list(t.shape)}",
                )
        out.append((name, _exportable(buf)))
    return out


def _exportable(buf: Any) -> Any:
    """``buf`` as an object that exports its memory through DLPack (what the native side
    takes): tensors and arrays as they are; other buffers (``bytearray``, ``mmap``,
    ``memoryview``) wrapped by numpy, keeping their writability."""
    if hasattr(buf, "__dlpack__"):
        return buf
    try:
        return np.frombuffer(buf, dtype=np.uint8)
    except (TypeError, ValueError):
        return buf  # the native side names what it is


def _progress(
    plan: Plan, rank: int, want: bool | None
) -> tuple[Callable[[int], None] | None, Callable[[], None]]:
    """A progress callback (arena bytes filled) driving a tqdm bar, and its closer."""
    if want is False or (want is None and (rank != 0 or not sys.stderr.isatty())):
        return None, lambda: None
    try:
        from tqdm.auto import tqdm  # type: ignore[import-untyped, unused-ignore]
    except ImportError:
        return None, lambda: None
    try:
        total = plan._native.rank_info(rank)["bytes"]
    except SafeshardError:
        return None, lambda: None
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"safeshard rank {rank}",
        leave=False,
    )

    def update(done: int) -> None:
        bar.update(min(done, total) - bar.n)

    return update, bar.close


def plan(
    path: PathLike,
    *,
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    ep: int = 1,
    spec: str | None = None,
    set: Sequence[str] | dict[str, Any] | None = None,
    pp_layers: Sequence[int] | None = None,
    names: str = "checkpoint",
) -> Plan:
    """Plans every rank of a job from the checkpoint's headers (no tensor data is read).

    ``path``: a ``.safetensors`` file, a ``model.safetensors.index.json``, a directory with
    either (a Hugging Face cache snapshot works), or a repo id found in the local Hugging
    Face cache. ``spec``: a shipped spec name or a ``.shard`` file (default: detected from
    ``config.json``). ``set``: config overrides, ``["key=value", ...]`` or a dict.
    ``pp_layers``: explicit layers per pipeline stage. ``names``: ``"checkpoint"`` (each
    rank's tensors under the checkpoint's names) or ``"vllm"`` (as vLLM's
    ``model.state_dict()`` names them: fused ``qkv_proj``/``gate_up_proj``, FusedMoE experts
    stacked in ``w13_*``/``w2_*``, ...; from the name maps next to the specs).
    """
    overrides: list[str]
    if set is None:
        overrides = []
    elif isinstance(set, dict):
        overrides = [f"{k}={_config_value(v)}" for k, v in set.items()]
    else:
        overrides = [str(s) for s in set]
    native = NativePlan(
        _resolve_path(path),
        tp,
        pp,
        dp,
        ep,
        spec=spec,
        overrides=overrides,
        pp_layers=None if pp_layers is None else [int(x) for x in pp_layers],
        names=names,
    )
    return Plan(native)


def _config_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


class Rank:
    """One loaded rank: an arena and its tensors, handed out as views of the arena.

    Iterating yields :class:`TensorInfo` in arena order; ``name in rank`` and ``len(rank)``
    work as for a dict. Views stay valid after the ``Rank`` is deleted.
    """

    def __init__(self, native: NativeRank) -> None:
        self._native = native
        self._arena = native.arena()
        self._table: dict[str, tuple[str, tuple[int, ...], int, int]] = {
            n: (dt, tuple(s), b, off) for n, dt, s, b, off in native.tensors()
        }
        self._torch_base: Any = None
        self._numpy_base: np.ndarray[Any, Any] | None = None

    @property
    def rank(self) -> int:
        """Global rank."""
        return self._native.rank

    @property
    def nbytes(self) -> int:
        """Bytes of the arena."""
        return self._arena.nbytes

    @property
    def stats(self) -> dict[str, Any]:
        """What the load did: ``bytes``, ``read_bytes``, ``sent_bytes``, ``seconds``, and what
        the engine chose: ``io_chosen`` (``pread``, ``mmap``, ``direct``; ``none`` when this rank
        read nothing itself), ``io_bytes`` (bytes per path; ``prefetched``: of ``pread``, the
        spans read from storage) and ``threads``."""
        return self._native.stats()

    def digest(self) -> str:
        """SHA-256 (hex) of the arena: equal to ``safeshard load --digest`` for this rank."""
        return self._native.digest()

    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, name: object) -> bool:
        return name in self._table

    def __iter__(self) -> Iterator[TensorInfo]:
        for n, (dt, s, b, _) in list(self._table.items()):
            yield TensorInfo(n, dt, s, b)

    def names(self) -> list[str]:
        """Tensor names, in arena order."""
        return list(self._table)

    @property
    def aliases(self) -> dict[str, str]:
        """``{name: holder}``: tensors of the plan this rank leaves out because its tensor
        ``holder`` holds their values (with ``names="vllm"``, an embedding vLLM re-ties to
        the stored head it equals: ``{"model.embed_tokens.weight": "lm_head.weight"}``)."""
        return dict(self._native.aliases)

    # torch

    def _torch_cpu_base(self) -> torch.Tensor:
        if self._torch_base is None:
            from torch.utils.dlpack import from_dlpack

            self._torch_base = from_dlpack(self._arena)
        base: torch.Tensor = self._torch_base
        return base

    def _torch_view(self, base: torch.Tensor, name: str) -> torch.Tensor:
        dt, shape, nbytes, off = self._table[name]
        raw = base[off : off + nbytes]
        tdt = _dtypes.torch_dtype(dt)
        if tdt is None:
            return raw.view(_dtypes.packed_shape(dt, shape, nbytes))
        return raw.view(tdt).view(shape)

    def torch(
        self, device: Any = None, non_blocking: bool = True
    ) -> dict[str, torch.Tensor]:
        """Every tensor as a ``torch.Tensor``, in arena order.

        On the CPU (``device`` ``None`` or ``"cpu"``) they are views of the arena (no copy).
        On a CUDA device the arena goes to one device allocation made by torch (so the
        caching allocator accounts for it) through pinned staging buffers, and the tensors
        are views of that; ``"cuda"`` means this process's ``LOCAL_RANK`` device (else
        ``torch.cuda.current_device()``). With ``non_blocking`` the copies are queued on
        the current stream and the function returns before they finish, as usual in torch.
        """
        base = self._torch_cpu_base()
        dev = _torch_device(device)
        if dev is not None and dev.type != "cpu":
            base = _to_device(base, dev, non_blocking)
        return {n: self._torch_view(base, n) for n in self._table}

    # numpy

    def _np_base(self) -> np.ndarray[Any, Any]:
        base = self._numpy_base
        if base is None:
            base = self._numpy_base = np.from_dlpack(self._arena)
        return base

    def _numpy_view(self, name: str) -> np.ndarray[Any, Any]:
        dt, shape, nbytes, off = self._table[name]
        raw = self._np_base()[off : off + nbytes]
        ndt = _dtypes.numpy_dtype(dt)
        if ndt is None:
            return raw.reshape(_dtypes.packed_shape(dt, shape, nbytes))
        return raw.view(ndt).reshape(shape)

    def numpy(self) -> dict[str, np.ndarray[Any, Any]]:
        """Every tensor as a numpy array viewing the arena (BF16/F8 through ``ml_dtypes``
        when installed, else packed ``uint8``; F4/F6 always packed ``uint8``)."""
        return {n: self._numpy_view(n) for n in self._table}

    def take(self, name: str, *, numpy: bool = False) -> Any:
        """Removes ``name`` from this rank and returns it (a CPU torch view, or a numpy
        array with ``numpy=True``); later ``torch()``/``numpy()`` calls leave it out."""
        if name not in self._table:
            raise _error("usage", f"tensor {name!r}: not held by rank {self.rank} (or taken)")
        out = self._numpy_view(name) if numpy else self._torch_view(self._torch_cpu_base(), name)
        del self._table[name]
        return out

    def __repr__(self) -> str:
        return f"Rank(rank={self.rank}, tensors={len(self)}, nbytes={self.nbytes})"


def _torch_device(device: Any) -> torch.device | None:
    if device is None:
        return None
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        local = os.environ.get("LOCAL_RANK")
        index = int(local) if local is not None and local.isdigit() else None
        if index is None:
            index = torch.cuda.current_device()
        dev = torch.device("cuda", index)
    return dev


# Pinned staging buffer size for host-to-device copies.
_STAGE_BYTES = 64 << 20


def _to_device(base: torch.Tensor, dev: torch.device, non_blocking: bool) -> torch.Tensor:
    """Copies the CPU arena to one allocation on ``dev`` through two pinned buffers, so the
    disk-backed arena is never pinned itself and copies overlap with staging."""
    import torch

    n = base.numel()
    out = torch.empty(n, dtype=torch.uint8, device=dev)
    if n == 0:
        return out
    if dev.type != "cuda":
        out.copy_(base, non_blocking=non_blocking)
        return out
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev)
        size = min(_STAGE_BYTES, n)
        stages = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        done = [torch.cuda.Event() for _ in range(2)]  # type: ignore[no-untyped-call, unused-ignore]
        used = [False, False]
        for i, start in enumerate(range(0, n, size)):
            k = i % 2
            if used[k]:
                done[k].synchronize()  # the stage's previous copy has left it
            end = min(start + size, n)
            stage = stages[k][: end - start]
            stage.copy_(base[start:end])
            out[start:end].copy_(stage, non_blocking=True)
            done[k].record(stream)
            used[k] = True
        if not non_blocking:
            stream.synchronize()
        # Otherwise the last copies may still be queued: torch's pinned-memory allocator
        # records them and keeps the staging buffers until they finish.
    return out


def _default_rank(world: int, group: Any) -> int:
    """``torch.distributed``'s rank when it is initialized, else ``RANK`` set alone, else the
    launcher's (``RANK`` under torchrun, ``OMPI_COMM_WORLD_RANK`` under Open MPI, ...: the
    library's launcher table); a job of one rank is rank 0; anything else needs an explicit
    rank."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank(group))
    except ImportError:
        pass
    env = os.environ.get("RANK")
    if env is not None and "WORLD_SIZE" not in os.environ:
        # RANK alone names this process's rank (documented as "set RANK"); a launcher sets
        # WORLD_SIZE beside it, and then its table below applies.
        if not env.isdigit():
            raise _error("usage", f"RANK={env!r} is not a rank number")
        return int(env)
    launched = _launch_env()
    if launched is not None:
        return launched[1]
    if world == 1:
        return 0
    sizes = [v[2] for v in _launcher_variables() if os.environ.get(v[2], "1") not in ("", "1")]
    where = (
        f" (launcher sets {sizes[0]} but neither its rank variable nor torch.distributed)"
        if sizes
        else ""
    )
    raise _error(
        "usage",
        f"rank: the job has {world} ranks; pass rank=, set RANK, or initialize "
        f"torch.distributed{where}",
    )


def load(
    path: PathLike,
    *,
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    ep: int = 1,
    rank: int | None = None,
    device: Any = "cpu",
    process_group: Any = None,
    share: str | None = None,
    spec: str | None = None,
    set: Sequence[str] | dict[str, Any] | None = None,
    pp_layers: Sequence[int] | None = None,
    names: str = "checkpoint",
    io: str = "auto",
    threads: int | None = None,
    progress: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Loads this process's rank of a TP/PP/DP/EP job as ``{name: torch.Tensor}``.

    ``rank=None`` takes the rank from ``torch.distributed`` when it is initialized (in
    ``process_group`` if given), else the launcher's (``RANK``, ``OMPI_COMM_WORLD_RANK``,
    ...). ``share``: ``"none"`` (read your own
    slices; with ``torch.distributed`` initialized on the job's ranks, after the ranks agree
    on the plan, and with the spans the ranks on one machine share read whole), ``"broadcast"`` (bytes several ranks hold are read by one and broadcast in the
    sub-group of exactly its holders) or ``"read-once"`` (every byte read once per job and
    exchanged with all-to-all); the last two need ``torch.distributed`` initialized (gloo
    for CPU, NCCL for CUDA) and ``process_group`` (default: the world group) must have
    exactly the job's ranks. ``share=None`` (the default) chooses by measurement: with
    ``torch.distributed`` initialized on the job's ranks, ``"none"`` on one node and
    ``"broadcast"`` across several (see :meth:`Plan.load_shared`); without it, this process
    reads its own rank. The choice is logged (logger ``safeshard``, INFO). ``device``: ``"cpu"`` (views of the arena), ``"cuda"`` (the
    ``LOCAL_RANK`` device) or any torch device. ``names``: as for :func:`plan`.
    """
    p = plan(
        path, tp=tp, pp=pp, dp=dp, ep=ep, spec=spec, set=set, pp_layers=pp_layers, names=names
    )
    if share is not None:
        _check_share(share)
    # With torch.distributed on the job's ranks, `share="none"` also goes through the job
    # path: the ranks agree on the plan before reading, and those on one machine read the
    # spans they share whole (node spans) instead of one small request per row each.
    on_job = _group_size(process_group) == p.world_size > 1
    chosen = share is None and on_job
    if (on_job and share in (None, "none")) or share in ("broadcast", "read-once"):
        loaded = p.load_shared(
            share=share, process_group=process_group, io=io, threads=threads, progress=progress
        )
        if rank is not None and rank != loaded.rank:
            raise _error(
                "usage", f"rank={rank} but this process is rank {loaded.rank} of its process group"
            )
        if chosen:
            stats = loaded.stats
            _log.info("rank %d: share %s (%s)", loaded.rank, stats["share"], stats["share_default"])
    else:
        r = _default_rank(p.world_size, process_group) if rank is None else rank
        loaded = p.load(r, io=io, threads=threads, progress=progress)
        if share is None:
            _log.info(
                "rank %d: share none (default: torch.distributed is not initialized on the "
                "job's ranks, so this process reads its own rank)",
                r,
            )
    return loaded.torch(device)


def _group_size(process_group: Any) -> int:
    """Size of ``process_group`` (default: the world), or 0 without torch.distributed."""
    try:
        import torch.distributed as dist
    except ImportError:
        return 0
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return int(dist.get_world_size(process_group))


def synth(
    path: PathLike,
    preset: str,
    *,
    sparse: bool = False,
    layers: int | None = None,
    seed: int = 0,
) -> int:
    """Writes a synthetic Hugging Face-layout checkpoint of a named preset (``llama-tiny``,
    ``deepseek-v3-tiny``, ...) into ``path``; returns the number of files. For tests and
    demos: values are deterministic, ``sparse`` leaves holes instead of data."""
    return _synth(os.fspath(path), preset, sparse=sparse, layers=layers, seed=seed)


# Last: it imports helpers defined above.
from ._state_dict import LoadReport, Reindex, load_state_dict  # noqa: E402
