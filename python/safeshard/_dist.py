"""A safeshard communicator over a ``torch.distributed`` process group.

The Rust share modes call these methods (with the GIL taken) for every collective. Buffers
arrive as memoryviews of Rust memory that are valid only during the call: nothing here may
keep a reference to them afterwards.

Sub-communicators: ``split`` all-gathers every member's colour and then *every member*
creates *every* new group, in sorted colour order, with ``dist.new_group`` (torch requires
all ranks of the parent to create groups in the same order; creating only one's own group is
the classic way to deadlock). Over the whole world that is plain ``new_group``; under a
smaller parent group it uses ``use_local_synchronization`` so ranks outside the parent are
not involved. Collectives never run on the world group unless the job is the world.

Deadlines: every collective runs asynchronously and is polled against the share options'
timeout (on every group, the caller's included, whatever its own torch timeout). A rank still
waiting at the deadline raises :class:`CollectiveTimeout` naming the phase and the members of
the group that did not come to a short meeting of the members that timed out (one-byte
messages on a gloo group of the job's ranks, made with the communicator): every live member
is stuck behind the same missing one and times out at about the same moment, the stopped one
never comes. A timeout is final: every later collective of the communicator and its
sub-communicators raises the same error at once (the missing ranks are named already, and a
gloo point-to-point wait that timed out closes its group's connections).
"""

from __future__ import annotations

import datetime
import json
import math
import sys
import time
import warnings
from typing import Any, Callable

import torch
import torch.distributed as dist

# Tag of the meeting's messages on the diagnosis group.
_MEETING_TAG = 0x5AFE


class CollectiveTimeout(TimeoutError):
    """A collective outlived the deadline: ``rank`` (global) gave up in ``phase`` after
    ``after`` seconds; ``missing``: the global ranks that did not come to the meeting after
    it."""

    def __init__(self, rank: int, phase: str, after: float, missing: list[int]) -> None:
        who = (
            f"rank {','.join(map(str, missing))} did not arrive"
            if missing
            else "every rank arrived, but the collective did not finish"
        )
        super().__init__(
            f"rank {rank}: timed out after {_seconds(after)} in phase {json.dumps(phase)}: {who}"
        )
        self.rank, self.phase, self.after, self.missing = rank, phase, after, missing


def _seconds(t: float) -> str:
    """``3s``, ``250ms``, ``10m``: a duration as the CLI's ``--timeout`` spells it."""
    ms = round(t * 1000)
    if ms % 1000:
        return f"{ms}ms"
    s = ms // 1000
    m, s = divmod(s, 60)
    return f"{s}s" if not m else f"{m}m" if not s else f"{m}m{s}s"


def _grace(timeout: float) -> float:
    """How long the meeting after a timeout waits for the others (as the Rust side)."""
    return min(max(timeout / 4, 1.0), 5.0)


class TorchComm:
    """Communicator over ``group`` (default: the world group). NCCL groups move bytes
    through CUDA tensors on the current device; other backends (gloo) use CPU tensors."""

    def __init__(
        self,
        group: Any = None,
        _members: list[int] | None = None,
        _meeting: Any = None,
        timeout: float | None = None,
        _timeouts: list[CollectiveTimeout] | None = None,
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            from . import _error

            raise _error(
                "usage",
                "share modes need torch.distributed initialized "
                "(torchrun + dist.init_process_group, gloo for CPU or nccl for CUDA)",
            )
        self.group = group if group is not None else dist.group.WORLD
        # Global ranks of the members, in this communicator's rank order.
        if _members is None:
            _members = list(dist.get_process_group_ranks(self.group))
        self.members = _members
        # Position of each member in the torch group (torch orders a group by global rank).
        by_global = sorted(self.members)
        self.group_index = [by_global.index(g) for g in self.members]
        me = dist.get_rank()
        if me not in self.members:
            raise RuntimeError(f"rank {me} is not a member of the given process group")
        self._rank = self.members.index(me)
        self.is_world = len(self.members) == dist.get_world_size()
        self.timeout: float | None = timeout
        self.phase = "start"
        backend = str(dist.get_backend(self.group)).lower()
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if "nccl" in backend
            else torch.device("cpu")
        )
        # The gloo group of the job's ranks where ranks that timed out meet (made once, by
        # every rank, here; sub-communicators share their parent's).
        if _meeting is None:
            kwargs: dict[str, Any] = {"backend": "gloo"}
            if timeout is not None:
                kwargs["timeout"] = datetime.timedelta(seconds=timeout)
            if self.is_world:
                _meeting = dist.new_group(**kwargs)
            else:
                _meeting = dist.new_group(
                    sorted(self.members), use_local_synchronization=True, **kwargs
                )
        self._meeting = _meeting
        self._sends: list[Any] = []
        # The first timeout, shared with the sub-communicators (see the module's docstring).
        self._timeouts: list[CollectiveTimeout] = [] if _timeouts is None else _timeouts

    def _check_not_timed_out(self) -> None:
        if self._timeouts:
            first = self._timeouts[0]
            raise CollectiveTimeout(first.rank, first.phase, first.after, first.missing)

    def _run(self, start: Callable[[], Any]) -> None:
        """Starts one asynchronous collective (``start`` returns its work) and polls it
        against the deadline; past it, raises :class:`CollectiveTimeout`."""
        self._check_not_timed_out()
        work = start()
        if self.timeout is None or work is None:
            if work is not None:
                work.wait()
            return
        begin = time.monotonic()
        pause = 0.0001
        while not work.is_completed():
            if time.monotonic() - begin >= self.timeout:
                raise self._timed_out()
            time.sleep(pause)
            pause = min(pause * 2, 0.005)
        try:
            work.wait()  # raises the collective's own error, if it failed
        except RuntimeError as e:
            # torch's own timeout of the group, at or after ours: name who is missing.
            if time.monotonic() - begin >= self.timeout:
                raise self._timed_out() from e
            raise

    def _timed_out(self) -> CollectiveTimeout:
        """The members of this communicator that timed out meet (one byte from each to
        each, on the gloo group); those that do not come within the grace period are the
        missing ones. (Members only: ranks of other groups may have finished and gone.)"""
        assert self.timeout is not None
        me = dist.get_rank()
        others = [g for g in sorted(self.members) if g != me]
        token = torch.ones(1, dtype=torch.uint8)
        got = {g: torch.zeros(1, dtype=torch.uint8) for g in others}
        recvs: dict[int, Any] = {}
        for g in others:
            try:
                # Kept: gloo drops a send whose work object is collected before it completes.
                self._sends.append(dist.isend(token, g, group=self._meeting, tag=_MEETING_TAG))
                recvs[g] = dist.irecv(got[g], g, group=self._meeting, tag=_MEETING_TAG)
            except RuntimeError:  # its connection is gone: it will not come
                recvs[g] = None
        # gloo's point-to-point works complete only in wait(), which takes a timeout.
        end = time.monotonic() + _grace(self.timeout)
        missing = []
        for g, w in recvs.items():
            left = datetime.timedelta(seconds=max(end - time.monotonic(), 0.001))
            try:
                came = w is not None and w.wait(timeout=left) is not False
            except RuntimeError:  # gloo raises on a timeout or a closed connection
                came = False
            if not came:
                missing.append(g)
        # Requests to a stopped rank stay pending: the job ends with this error.
        err = CollectiveTimeout(me, self.phase, self.timeout, missing)
        self._timeouts.append(err)
        return err

    def rank(self) -> int:
        return self._rank

    def set_timeout(self, seconds: float | None) -> None:
        """Deadline of every later collective (polled here, on every group), also passed
        to the groups made by later splits as their torch timeout."""
        self.timeout = seconds

    def set_phase(self, phase: str) -> None:
        self.phase = phase

    def size(self) -> int:
        return len(self.members)

    def _in_group_order(self, per_member: list[Any]) -> list[Any]:
        out: list[Any] = [None] * len(per_member)
        for i, v in enumerate(per_member):
            out[self.group_index[i]] = v
        return out

    def _in_comm_order(self, per_group_rank: list[Any]) -> list[Any]:
        return [per_group_rank[self.group_index[i]] for i in range(len(self.members))]

    def barrier(self) -> None:
        self._run(lambda: dist.barrier(group=self.group, async_op=True))

    def all_gather(self, mine: bytes) -> list[bytes]:
        """Lengths first, then the bytes padded to the longest (tensors, so the collective
        can be polled against the deadline; in group order, reordered to this
        communicator's)."""
        n = len(self.members)
        length = torch.tensor([len(mine)], dtype=torch.int64, device=self.device)
        lengths = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(n)]
        self._run(lambda: dist.all_gather(lengths, length, group=self.group, async_op=True))
        sizes = [int(x.item()) for x in lengths]
        longest = max(sizes) if sizes else 0
        data = torch.zeros(max(longest, 1), dtype=torch.uint8)
        if mine:
            data[: len(mine)] = torch.frombuffer(bytearray(mine), dtype=torch.uint8)
        data = data.to(self.device)
        parts = [torch.zeros_like(data) for _ in range(n)]
        self._run(lambda: dist.all_gather(parts, data, group=self.group, async_op=True))
        got = [bytes(p.cpu()[:k].numpy().tobytes()) for p, k in zip(parts, sizes)]
        return self._in_comm_order(got)

    def split(self, color: int | None, key: int) -> TorchComm | None:
        mine = (-1 if color is None else int(color), int(key), self._rank)
        everyone = [
            tuple(int(x) for x in bytes(b).decode().split(","))
            for b in self.all_gather(",".join(map(str, mine)).encode())
        ]
        colors = sorted({c for c, _, _ in everyone if c >= 0})
        result: TorchComm | None = None
        for c in colors:
            order = sorted((k, r) for cc, k, r in everyone if cc == c)
            members = [self.members[r] for _, r in order]
            kwargs: dict[str, Any] = {}
            if self.timeout is not None:
                # torch's own deadline, after ours (and the meeting after it) has passed.
                after = self.timeout + _grace(self.timeout) + 5
                kwargs["timeout"] = datetime.timedelta(seconds=after)
            if not self.is_world:
                kwargs["use_local_synchronization"] = True
            g = dist.new_group(sorted(members), backend=dist.get_backend(self.group), **kwargs)
            if color is not None and c == color:
                result = TorchComm(
                    g, _members=members, _meeting=self._meeting, _timeouts=self._timeouts
                )
                result.timeout, result.phase = self.timeout, self.phase
        return result

    def _host(self, mv: memoryview) -> torch.Tensor:
        if len(mv) == 0:
            return torch.empty(0, dtype=torch.uint8)
        if not mv.readonly:
            return torch.frombuffer(mv, dtype=torch.uint8)
        # Send buffers: torch only reads them, so its warning about a read-only buffer (printed
        # once by every rank) is noise.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(mv, dtype=torch.uint8)

    def broadcast(self, root: int, buf: memoryview) -> None:
        if len(buf) == 0:
            return  # every rank has the same length, so every rank skips
        host = self._host(buf)
        src = self.members[root]
        if self.device.type == "cpu":
            self._run(lambda: dist.broadcast(host, src=src, group=self.group, async_op=True))
        else:
            dev = host.to(self.device)
            self._run(lambda: dist.broadcast(dev, src=src, group=self.group, async_op=True))
            host.copy_(dev.cpu())
            del dev
        del host

    def all_to_all_packed(
        self,
        send: memoryview,
        send_counts: list[int],
        recv: memoryview,
        recv_counts: list[int],
    ) -> None:
        inp = self._host(send)
        out = self._host(recv)
        if self.group_index != sorted(self.group_index):
            # Buffers are in this communicator's order; torch wants group order.
            inp = torch.cat(self._in_group_order(list(torch.split(inp, send_counts))))
            send_counts = self._in_group_order(send_counts)
            recv_group = self._in_group_order(recv_counts)
            tmp = torch.empty(len(recv), dtype=torch.uint8)
            self._exchange(tmp, inp, recv_group, send_counts)
            parts = self._in_comm_order(list(torch.split(tmp, recv_group)))
            if parts:
                out.copy_(torch.cat(parts))
            return
        self._exchange(out, inp, recv_counts, send_counts)
        del inp, out

    def _exchange(
        self, out: torch.Tensor, inp: torch.Tensor, recv: list[int], send: list[int]
    ) -> None:
        if self.device.type == "cpu":
            self._run(
                lambda: dist.all_to_all_single(
                    out, inp, recv, send, group=self.group, async_op=True
                )
            )
            return
        o = torch.empty(out.numel(), dtype=torch.uint8, device=self.device)
        i = inp.to(self.device)
        self._run(
            lambda: dist.all_to_all_single(o, i, recv, send, group=self.group, async_op=True)
        )
        out.copy_(o.cpu())

    @property
    def direct_exchange(self) -> bool:
        """Whether :meth:`exchange` moves messages itself (gloo's point-to-point on CPU);
        on NCCL the Rust side packs them through :meth:`all_to_all_packed` instead."""
        return self.device.type == "cpu"

    def exchange(
        self, sends: list[tuple[int, memoryview]], recvs: list[tuple[int, memoryview]]
    ) -> None:
        """Point-to-point messages straight from and into the Rust buffers (gloo): between
        two ranks the k-th message lands in the k-th buffer listed for that sender (one tag,
        delivered in order). Every rank calls it, with or without messages; the works are
        waited on against the deadline."""
        self._check_not_timed_out()
        ops = [
            dist.P2POp(dist.irecv, self._host(mv), self.members[peer], self.group)
            for peer, mv in recvs
            if len(mv)
        ]
        ops += [
            dist.P2POp(dist.isend, self._host(mv), self.members[peer], self.group)
            for peer, mv in sends
            if len(mv)
        ]
        if not ops:
            return
        works = dist.batch_isend_irecv(ops)
        if self.timeout is None:
            for w in works:
                w.wait()
            return
        # gloo's point-to-point works complete only in wait(), which takes a timeout (whole
        # milliseconds: rounded up, so that gloo never gives up before the deadline).
        end = time.monotonic() + self.timeout
        for w in works:
            left = math.ceil((end - time.monotonic()) * 1000) + 1
            try:
                wait = datetime.timedelta(milliseconds=left)
                done = left > 1 and w.wait(timeout=wait) is not False
            except RuntimeError as e:
                if time.monotonic() < end:
                    raise  # the transfer's own error (a peer that closed its connection)
                raise self._timed_out() from e
            if not done:
                raise self._timed_out()

    def all_to_all_v(self, send: list[bytes]) -> list[bytes]:
        counts = [len(s) for s in send]
        sizes = [
            [int(x) for x in b.decode().split(",")] if b else []
            for b in self.all_gather(",".join(map(str, counts)).encode())
        ]
        recv_counts = [sizes[i][self._rank] for i in range(len(self.members))]
        inp = bytearray(b"".join(send))
        out = bytearray(sum(recv_counts))
        self.all_to_all_packed(memoryview(inp), counts, memoryview(out), recv_counts)
        res, off = [], 0
        for c in recv_counts:
            res.append(bytes(out[off : off + c]))
            off += c
        return res

    def abort(self, code: int, msg: str) -> None:
        where = f" ({self.phase})" if self.phase else ""
        print(f"error: rank {dist.get_rank()}{where}: {msg}", file=sys.stderr, flush=True)
