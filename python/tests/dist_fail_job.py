"""Run under torchrun (gloo): rank 3 plans tp=4 instead of tp=2 x pp=2, so the plans differ;
every rank must raise SafeshardError (none may hang). Writes OUT/fail-R.txt."""

import sys
from pathlib import Path

import torch.distributed as dist

import safeshard

ckpt, out = sys.argv[1], Path(sys.argv[2])
dist.init_process_group("gloo")
me = dist.get_rank()
plan = safeshard.plan(ckpt, tp=4, pp=1) if me == 3 else safeshard.plan(ckpt, tp=2, pp=2)
try:
    plan.load_shared(share="broadcast")
    msg = "no error"
except safeshard.SafeshardError as e:
    msg = f"{e.kind}: {e}"
(out / f"fail-{me}.txt").write_text(msg)
dist.destroy_process_group()
