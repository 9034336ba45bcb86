"""Run under torchrun (gloo), 4 ranks, tp=2 x pp=2, timeout 3 s: rank 2 stops itself with
SIGSTOP (as a debugger or `kill -STOP` would) when it reaches the given collective of the
shared load (``all_gather``: the first agreement; ``broadcast``: inside the broadcast mode;
``exchange``: inside read-once's first exchange, which is then the share mode).
Every other rank must raise SafeshardError (kind "comm", with .phase and .missing) naming
rank 2, by the deadline.
Writes OUT/pid-2.txt (so the test can end the stopped rank) and OUT/stop-R.txt."""

import os
import signal
import sys
import time
from pathlib import Path

import torch.distributed as dist

import safeshard
from safeshard import _dist

ckpt, out, where = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo")
me = dist.get_rank()
if me == 2:
    (out / "pid-2.txt").write_text(str(os.getpid()))
    real = getattr(_dist.TorchComm, where)

    def stop(self, *args):  # type: ignore[no-untyped-def]
        os.kill(os.getpid(), signal.SIGSTOP)
        return real(self, *args)

    setattr(_dist.TorchComm, where, stop)
plan = safeshard.plan(ckpt, tp=2, pp=2)
start = time.monotonic()
try:
    share = "read-once" if where == "exchange" else "broadcast"
    loaded = plan.load_shared(share=share, timeout=3.0)
    msg = f"no error, received {loaded.stats['received_bytes']} bytes"
except safeshard.SafeshardError as e:
    msg = f"{e.kind}: {getattr(e, 'phase', '')}: {getattr(e, 'missing', '')}: {e}"
(out / f"stop-{me}.txt").write_text(f"{time.monotonic() - start:.3f} {msg}")
