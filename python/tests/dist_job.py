"""Run under torchrun (gloo): loads this rank with every share mode and writes the digests
to OUT/rank-R.json. Usage: dist_job.py CKPT OUT TP PP DP"""

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

import safeshard
from safeshard import _dist

# Counts the bytes read-once sent through TorchComm.exchange (its point-to-point steps).
seen = {"exchange_sent": 0}
real_exchange = _dist.TorchComm.exchange


def counted(self, sends, recvs):  # type: ignore[no-untyped-def]
    seen["exchange_sent"] += sum(len(mv) for _, mv in sends)
    return real_exchange(self, sends, recvs)


_dist.TorchComm.exchange = counted  # type: ignore[method-assign]

ckpt, out, tp, pp, dp = sys.argv[1], Path(sys.argv[2]), *map(int, sys.argv[3:6])
dist.init_process_group("gloo")
plan = safeshard.plan(ckpt, tp=tp, pp=pp, dp=dp)
res = {"rank": dist.get_rank(), "hash": plan.hash}
for share in ("none", "broadcast", "read-once"):
    rank = plan.load_shared(share=share, round_bytes=256 << 10)
    assert rank.rank == dist.get_rank()
    res[share] = rank.digest()
    res[share + "_read"] = rank.stats["read_bytes"]
    res[share + "_sent"] = rank.stats["sent_bytes"]
res.update(seen)
# Without share=: the default for the node count (one node here: none), then with two
# simulated nodes (SAFESHARD_NODE): broadcast. Same bytes either way.
chosen = plan.load_shared()
res["default"] = [chosen.stats["share"], chosen.stats["share_default"], chosen.digest()]
os.environ["SAFESHARD_NODE"] = f"node{dist.get_rank() // 2}"
chosen = plan.load_shared()
res["default_2_nodes"] = [chosen.stats["share"], chosen.stats["share_default"], chosen.digest()]
del os.environ["SAFESHARD_NODE"]
# The one-call form on the same group.
state = safeshard.load(ckpt, tp=tp, pp=pp, dp=dp, share="broadcast")
res["load_names"] = sorted(state)
dist.barrier()
(out / f"rank-{dist.get_rank()}.json").write_text(json.dumps(res))
dist.destroy_process_group()
