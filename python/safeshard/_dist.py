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
"""

from __future__ import annotations

import datetime
import sys
from typing import Any

import torch
import torch.distributed as dist


class TorchComm:
    """Communicator over ``group`` (default: the world group). NCCL groups move bytes
    through CUDA tensors on the current device; other backends (gloo) use CPU tensors."""

    def __init__(self, group: Any = None, _members: list[int] | None = None) -> None:
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
        self.timeout: float | None = None
        self.phase = ""
        backend = str(dist.get_backend(self.group)).lower()
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if "nccl" in backend
            else torch.device("cpu")
        )

    def rank(self) -> int:
        return self._rank

    def set_timeout(self, seconds: float | None) -> None:
        """Timeout for the groups made by later splits (torch bounds each collective of a
        group by the group's timeout; the given group keeps its own)."""
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
        dist.barrier(group=self.group)

    def all_gather(self, mine: bytes) -> list[bytes]:
        got: list[Any] = [None] * len(self.members)
        dist.all_gather_object(got, bytes(mine), group=self.group)
        return [bytes(x) for x in self._in_comm_order(got)]

    def split(self, color: int | None, key: int) -> TorchComm | None:
        mine = (-1 if color is None else int(color), int(key), self._rank)
        everyone: list[Any] = [None] * len(self.members)
        dist.all_gather_object(everyone, mine, group=self.group)
        colors = sorted({c for c, _, _ in everyone if c >= 0})
        result: TorchComm | None = None
        for c in colors:
            order = sorted((k, r) for cc, k, r in everyone if cc == c)
            members = [self.members[r] for _, r in order]
            kwargs: dict[str, Any] = {}
            if self.timeout is not None:
                kwargs["timeout"] = datetime.timedelta(seconds=self.timeout)
            if not self.is_world:
                kwargs["use_local_synchronization"] = True
            g = dist.new_group(sorted(members), backend=dist.get_backend(self.group), **kwargs)
            if color is not None and c == color:
                result = TorchComm(g, _members=members)
                result.timeout, result.phase = self.timeout, self.phase
        return result

    def _host(self, mv: memoryview) -> torch.Tensor:
        if len(mv) == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(mv, dtype=torch.uint8)

    def broadcast(self, root: int, buf: memoryview) -> None:
        if len(buf) == 0:
            return  # every rank has the same length, so every rank skips
        host = self._host(buf)
        src = self.members[root]
        if self.device.type == "cpu":
            dist.broadcast(host, src=src, group=self.group)
        else:
            dev = host.to(self.device)
            dist.broadcast(dev, src=src, group=self.group)
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
            dist.all_to_all_single(out, inp, recv, send, group=self.group)
            return
        o = torch.empty(out.numel(), dtype=torch.uint8, device=self.device)
        dist.all_to_all_single(o, inp.to(self.device), recv, send, group=self.group)
        out.copy_(o.cpu())

    def all_to_all_v(self, send: list[bytes]) -> list[bytes]:
        counts = [len(s) for s in send]
        everyone: list[Any] = [None] * len(self.members)
        dist.all_gather_object(everyone, counts, group=self.group)
        sizes = self._in_comm_order(everyone)
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
