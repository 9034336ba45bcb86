"""GPU check for a machine with CUDA (not part of the CPU test suite).

    python python/tests/gpu_check.py            # needs torch with CUDA and the package

Checks: device="cuda" picks LOCAL_RANK's device; the device tensors equal the CPU views bit
for bit; they share one torch allocation (accounted by the caching allocator); the staging
loop handles arenas larger than a stage; non_blocking copies are complete after a sync; the
NCCL communicator works for a one-rank group. Prints one line per check, exits 1 on failure.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch

import safeshard


def check(name: str, ok: bool) -> bool:
    print(f"{'ok  ' if ok else 'FAIL'} {name}", flush=True)
    return ok


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    results = []
    with tempfile.TemporaryDirectory() as d:
        safeshard.synth(d, "llama-tiny")
        n = torch.cuda.device_count()
        os.environ["LOCAL_RANK"] = str(n - 1)
        rank = safeshard.plan(d, tp=2).load(1)
        cpu = rank.torch()
        before = torch.cuda.memory_allocated(n - 1)
        dev = rank.torch("cuda", non_blocking=True)
        torch.cuda.synchronize()
        results.append(check("device from LOCAL_RANK", all(t.device.index == n - 1 for t in dev.values())))
        results.append(check("bit-exact", all(
            torch.equal(dev[k].cpu().view(torch.uint8), cpu[k].view(torch.uint8)) for k in cpu)))
        ptrs = {t.untyped_storage().data_ptr() for t in dev.values()}
        results.append(check("one device allocation", len(ptrs) == 1))
        grown = torch.cuda.memory_allocated(n - 1) - before
        results.append(check("accounted by torch", grown >= rank.nbytes))
        # Arena larger than a staging buffer: several rounds through both pinned buffers.
        import safeshard as s

        old = s._STAGE_BYTES
        s._STAGE_BYTES = 4096
        try:
            dev2 = rank.torch("cuda", non_blocking=False)
            results.append(check("multi-stage copy", all(
                torch.equal(dev2[k].cpu().view(torch.uint8), cpu[k].view(torch.uint8)) for k in cpu)))
        finally:
            s._STAGE_BYTES = old
        os.environ.pop("LOCAL_RANK")
        torch.cuda.set_device(0)
        state = safeshard.load(d, tp=2, rank=0, device="cuda")
        results.append(check("load(device='cuda') without LOCAL_RANK uses the current device",
                             all(t.device.index == 0 for t in state.values())))
        # NCCL communicator on a one-rank group (broadcast and all-to-all through CUDA).
        import torch.distributed as dist

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl", rank=0, world_size=1)
        try:
            plan = safeshard.plan(d)
            got = {m: plan.load_shared(share=m).digest() for m in ("none", "broadcast", "read-once")}
            want = plan.load(0).digest()
            results.append(check("nccl share modes", set(got.values()) == {want}))
        finally:
            dist.destroy_process_group()
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
