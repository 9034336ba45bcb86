"""Run under torchrun (gloo): rank 3 plans tp=4 instead of tp=2 x pp=2, so the plans differ;
every rank must raise SafeshardError (none may hang). Writes OUT/fail-R.txt.

SHARE (argv 3, default `broadcast`): `broadcast` calls `Plan.load_shared`; `none` calls
`safeshard.load(..., share="none")`, which on the job's ranks takes the same agreed path."""

import sys
from pathlib import Path

import torch.distributed as dist

import safeshard

ckpt, out = sys.argv[1], Path(sys.argv[2])
dist.init_process_group("gloo")
me = dist.get_rank()
share = sys.argv[3] if len(sys.argv) > 3 else "broadcast"
tp, pp = (4, 1) if me == 3 else (2, 2)
try:
    if share == "none":
        safeshard.load(ckpt, tp=tp, pp=pp, share="none")
    else:
        safeshard.plan(ckpt, tp=tp, pp=pp).load_shared(share=share)
    msg = "no error"
except safeshard.SafeshardError as e:
    msg = f"{e.kind}: {e}"
(out / f"fail-{me}.txt").write_text(msg)
dist.destroy_process_group()
