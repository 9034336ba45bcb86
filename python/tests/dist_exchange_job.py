"""Run under torchrun (gloo), 4 ranks: TorchComm.exchange with several messages per pair.
Rank s sends rank d (d != s) messages of the lengths LENGTHS[(s + d + k) % 5], k = 0..4
(one of them empty), each filled with bytes derived from (s, d, k); every receiver lists
buffers of the same lengths in the same order and checks each byte.
Writes OUT/exchange-R.txt: "ok N messages" or the first mismatch."""

import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist

from safeshard import _dist

LENGTHS = [0, 1, 1000, 70_000, 1 << 20]
out = Path(sys.argv[1])
dist.init_process_group("gloo")
comm = _dist.TorchComm(timeout=60.0)
me, n = comm.rank(), comm.size()


def pattern(src: int, dst: int, k: int, length: int) -> bytes:
    seed = (src * 31 + dst * 7 + k * 131) & 0xFF
    return ((np.arange(length, dtype=np.uint32) * 13 + seed) & 0xFF).astype(np.uint8).tobytes()


def messages(src: int, dst: int) -> list[tuple[int, int]]:
    return [(k, LENGTHS[(src + dst + k) % len(LENGTHS)]) for k in range(len(LENGTHS))]


peers = [p for p in range(n) if p != me]
# Interleaved over peers, as the share modes list them: order matters only per pair.
sent = [(d, memoryview(pattern(me, d, k, length))) for k in range(len(LENGTHS))
        for d in peers for kk, length in messages(me, d) if kk == k]
bufs = {(s, k): bytearray(length) for s in peers for k, length in messages(s, me)}
recvs = [(s, memoryview(bufs[(s, k)])) for k in range(len(LENGTHS)) for s in peers]
comm.exchange(sent, recvs)
bad = [f"from rank {s}, message {k}" for (s, k), b in bufs.items()
       if bytes(b) != pattern(s, me, k, len(b))]
got = len(sent) + len(recvs)
(out / f"exchange-{me}.txt").write_text(f"bad {bad[0]}" if bad else f"ok {got} messages")
dist.barrier()
dist.destroy_process_group()
