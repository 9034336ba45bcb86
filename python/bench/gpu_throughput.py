"""Rank -> device throughput against a plain host-to-device copy of the same bytes (issue 13,
"GPU path"). Needs torch with CUDA and the safeshard package; nothing here runs on CPU only.

    python python/bench/gpu_throughput.py CKPT [--tp 1] [--rank 0] [--runs 3]
    python python/bench/gpu_throughput.py --synth DIR [--layers 8]   # writes llama3-8b shapes first

Per run, interleaved, on LOCAL_RANK's device (else 0), page cache warm (the files are read
once first), medians printed with the range, GB/s over the rank's arena bytes:

- `h2d pinned`: `dst.copy_(src)` from a pinned host buffer already holding the bytes (the
  device's H2D bandwidth: the ceiling of any loader that goes through host memory);
- `h2d pageable`: the same from ordinary (pageable) host memory;
- `safeshard cpu+cuda`: `plan.load(rank).torch("cuda")` (fresh arena, then the two-stage
  pinned copy of `Rank.torch`), synchronized, end to end;
- `safeshard out=pinned`: `plan.load(rank, out=pinned)` into a pinned buffer allocated once
  (reused across runs, as an engine that reloads would), then one `copy_` to the device;
- `st-torch`: the `safetensors` loop vLLM runs (`safe_open(framework="pt", device="cpu")`,
  `get_slice` with vLLM's Llama split rules, `.to(device)` per tensor).

Ratios printed: each path's time over `h2d pinned` (1.0 is the H2D bound). InstantTensor
publishes 35 GB/s for Qwen3-30B on one H200 as the bar to beat (docs/performance.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

import safeshard

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
from peers import files_of, split  # noqa: E402  (vLLM's Llama split rules, shared)


def timed(f):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    f()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def st_torch(root, tp, rank, dev):
    from safetensors import safe_open

    out = {}
    for fname in files_of(root):
        with safe_open(os.path.join(root, fname), framework="pt", device="cpu") as f:
            for name in f.keys():
                s = f.get_slice(name)
                cut = split(name, s.get_shape(), tp, rank)
                t = s[:] if cut is None else (s[cut[1]:cut[2]] if cut[0] == 0 else s[:, cut[1]:cut[2]])
                out[name] = t.to(dev, non_blocking=False)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt", nargs="?")
    ap.add_argument("--synth", metavar="DIR", help="write llama3-8b shapes into DIR first")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    root = args.ckpt
    if args.synth:
        if not os.path.exists(os.path.join(args.synth, "config.json")):
            safeshard.synth(args.synth, "llama3-8b", layers=args.layers)
        root = args.synth
    if not root:
        ap.error("CKPT or --synth DIR")
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(dev)
    for f in files_of(root):
        with open(os.path.join(root, f), "rb") as fh:
            while fh.read(64 << 20):
                pass
    plan = safeshard.plan(root, tp=args.tp)
    n = plan.rank(args.rank).arena_bytes
    print(f"# {torch.cuda.get_device_name(dev)}, rank {args.rank} of tp {args.tp}: "
          f"{n / 1e9:.2f} GB arena", flush=True)
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(n, dtype=torch.uint8)
    pageable.fill_(1)
    pinned.copy_(pageable)
    dst = torch.empty(n, dtype=torch.uint8, device=dev)
    out_pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)

    def via_out():
        plan.load(args.rank, out=out_pinned, progress=False)
        dst.copy_(out_pinned, non_blocking=True)

    paths = {
        "h2d pinned": lambda: dst.copy_(pinned, non_blocking=True),
        "h2d pageable": lambda: dst.copy_(pageable),
        "safeshard cpu+cuda": lambda: plan.load(args.rank, progress=False).torch(dev),
        "safeshard out=pinned": via_out,
        "st-torch": lambda: st_torch(root, args.tp, args.rank, dev),
    }
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(args.runs):
        for k, f in paths.items():
            times[k].append(timed(f))
    # The device bytes equal the CPU load's (a bit-exact check of the measured path).
    via_out()
    torch.cuda.synchronize()
    ok = torch.equal(dst.cpu(), torch.from_dlpack(plan.load(args.rank)._arena))
    base = statistics.median(times["h2d pinned"])
    print("| path | median s | min–max s | GB/s | time / h2d pinned |")
    print("|---|---|---|---|---|")
    for k, ts in times.items():
        m = statistics.median(ts)
        print(f"| {k} | {m:.3f} | {min(ts):.3f}–{max(ts):.3f} | {n / m / 1e9:.1f} | {m / base:.2f} |")
    print(f"# device bytes equal the CPU load: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
