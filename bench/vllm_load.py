#!/usr/bin/env python3
"""vLLM's weight load on CPU through each load format, every rank of a tp world, side by side.

    python bench/vllm_load.py CKPT [--tp 1,2] [--reps 3] [--modes warm,cold]
        [--formats safetensors,safeshard,runai_streamer,fastsafetensors] [--out LOG]

Needs vLLM 0.33 (CPU platform), and safeshard installed where `python` finds it (its
`vllm.general_plugins` entry point registers `--load-format safeshard`). For each tp the
parent builds vLLM's engine config once and forks one process per rank (gloo world, as
tests/vllm/plugin_world.py). Each rank then, per repetition, mode and format (interleaved):

1. cold: rank 0 drops the checkpoint from the page cache (`posix_fadvise(DONTNEED)`,
   checked with `fincore`); warm: rank 0 reads it once; barrier;
2. builds the model vLLM picks (its parameters are `torch.empty`: not yet resident);
3. resets its peak RSS (`/proc/self/clear_refs` 5), barrier, times `loader.load_weights`
   (vLLM's own method, the part a load format changes) and reads the peak RSS it added;
4. digests the `state_dict()` (SHA-256 of every tensor's bytes, sorted by name): every
   format must match the default loader's digest on that rank.

The time of a (format, mode) is the slowest rank's (`load_weights` ends with every rank's
weights in place). Floors, in the same run, after each repetition's loads: every rank at
once writes its model's bytes into fresh memory with one thread per core it has (cores /
tp), the slowest rank's time; and, warm, every rank at once copies that many bytes out of
the page cache into fresh memory (`floors.cache_copy_floor`): the least a one-copy load
pays, since it must also read every byte from memory; and, cold, the checkpoint read with
O_DIRECT at the disk's best queue depth by rank 0 (`floors.disk_floor`).

A format vLLM refuses on CPU (fastsafetensors: `Invalid device string: 'cuda:cpu'`) is
reported with its error instead of a time.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import socket
import statistics
import sys
import time

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "vllm"))
import floors  # noqa: E402
import peers  # noqa: E402

FORMATS = "safetensors,safeshard,runai_streamer,fastsafetensors"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _malloc_trim() -> None:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def state_digest(model) -> tuple[str, int]:
    import torch

    h = hashlib.sha256()
    total = 0
    for name, t in sorted(model.state_dict().items()):
        b = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        h.update(name.encode())
        h.update(memoryview(b))
        total += b.nbytes
    return h.hexdigest(), total


def loader_for(vllm_config, fmt: str):
    import dataclasses

    from vllm.model_executor.model_loader import DefaultModelLoader, get_model_loader

    if fmt == "safetensors":
        return DefaultModelLoader(dataclasses.replace(vllm_config.load_config,
                                                      load_format="safetensors"))
    return get_model_loader(dataclasses.replace(vllm_config.load_config, load_format=fmt))


def run_rank(args, vllm_config, tp: int, rank: int, port: int, out_path: str) -> None:
    import torch
    import torch.distributed as dist
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))
    model_config = vllm_config.model_config
    paths = [os.path.join(args.ckpt, f) for f in peers.files_of(args.ckpt)]
    rows = []
    my_bytes = 0  # this rank's model bytes, once a load has succeeded
    with set_current_vllm_config(vllm_config):
        init_distributed_environment(world_size=tp, rank=rank,
                                     distributed_init_method=f"tcp://127.0.0.1:{port}",
                                     local_rank=rank, backend="gloo")
        initialize_model_parallel(tp, 1)

        def build():
            vllm_config.compilation_config.static_forward_context.clear()
            with set_default_torch_dtype(model_config.dtype), torch.device("cpu"):
                return initialize_model(vllm_config=vllm_config, model_config=model_config)

        def gather(x):
            every = [None] * tp
            dist.all_gather_object(every, x)
            return every

        for rep in range(args.reps):
            for mode in args.modes.split(","):
                for fmt in args.formats.split(","):
                    if rank == 0:
                        if mode == "cold":
                            peers.drop_cache(paths)
                        else:
                            peers.warm_cache(paths)
                    dist.barrier()
                    cold_ok = peers.resident_fraction(paths) <= 0.01 if mode == "cold" else True
                    model = build()
                    row = {"rep": rep, "mode": mode, "tp": tp, "format": fmt, "rank": rank,
                           "cold_ok": cold_ok, "load": open("/proc/loadavg").read().split()[0]}
                    try:
                        loader = loader_for(vllm_config, fmt)
                        with open("/proc/self/clear_refs", "w") as f:
                            f.write("5")
                        rss0 = status("VmRSS")
                        dist.barrier()
                        t0 = time.perf_counter()
                        loader.load_weights(model, model_config)
                        row["seconds"] = time.perf_counter() - t0
                        row["extra_rss"] = status("VmHWM") - rss0
                        row["used"] = getattr(loader, "used", None)
                        row["sha256"], row["bytes"] = state_digest(model)
                        my_bytes = row["bytes"]
                    except Exception as e:  # noqa: BLE001 - a refused format is a result
                        row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
                    del model
                    # Free the model's memory before the next build (a leak would show as a
                    # growing `rss_after` and end in the OOM killer: see docs).
                    gc.collect()
                    _malloc_trim()
                    row["rss_after"] = status("VmRSS")
                    every = gather(row)
                    if rank == 0:
                        rows.extend(every)
                        for r in every:
                            print(json.dumps(r), flush=True)
                # The floor, per repetition: every rank's model bytes into fresh memory.
                nbytes = my_bytes
                if all(gather(nbytes)):
                    threads = max(1, (os.cpu_count() or 1) // tp)
                    fl = floors.fresh_pages_floor(nbytes, threads)
                    every = gather(fl["seconds"])
                    # Warm, the least a one-copy load pays: the bytes copied out of the page
                    # cache (cached by the loads just run) into fresh memory.
                    cache = (floors.cache_copy_floor(paths, nbytes, threads)["seconds"]
                             if mode == "warm" else None)
                    every_cache = gather(cache)
                    # Cold, the disk: the checkpoint (every rank's bytes together) read with
                    # O_DIRECT at the queue depth that maximizes it, by one rank.
                    disk = (floors.disk_floor(paths, floors.tensor_bytes(paths))["seconds"]
                            if mode == "cold" and rank == 0 else None)
                    every_disk = gather(disk)
                    if rank == 0:
                        r = {"rep": rep, "mode": mode, "tp": tp, "format": "floor",
                             "seconds_all": every, "cache_seconds_all": every_cache,
                             "disk_seconds": every_disk[0], "bytes": nbytes}
                        rows.append(r)
                        print(json.dumps(r), flush=True)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)


def summarize(rows: list[dict]) -> None:
    keys = sorted({(r["mode"], r["tp"]) for r in rows}, key=lambda k: (k[0] != "warm", k[1]))
    fmts = []
    for r in rows:
        if r["format"] not in fmts and r["format"] != "floor":
            fmts.append(r["format"])
    print("\nload_weights seconds, slowest rank: median (min-max); peak extra RSS of the "
          "largest rank; digest checked against the default loader's")
    print("\n| mode tp | " + " | ".join(fmts) + " | floor (fresh memory) | floor (page cache -> fresh memory) | floor (disk) |")
    print("|---|" + "---|" * (len(fmts) + 3))
    for mode, tp in keys:
        ref = {r["rank"]: r.get("sha256") for r in rows if r["mode"] == mode and r["tp"] == tp
               and r["format"] == "safetensors" and r.get("sha256")}
        cells = []
        for fmt in fmts:
            rs = [r for r in rows if r["mode"] == mode and r["tp"] == tp and r["format"] == fmt]
            per_rep: dict[int, list] = {}
            for r in rs:
                per_rep.setdefault(r["rep"], []).append(r)
            ok = [v for v in per_rep.values() if all("seconds" in r for r in v)]
            if not ok:
                err = next((r.get("error") for r in rs if r.get("error")), "not run")
                cells.append(f"n/a ({err[:70]})")
                continue
            s = sorted(max(r["seconds"] for r in v) for v in ok)
            rss = max(r["extra_rss"] for v in ok for r in v)
            same = all(r.get("sha256") == ref.get(r["rank"]) for v in ok for r in v)
            cold = "" if all(r.get("cold_ok", True) for v in ok for r in v) else " (not all cold)"
            if fmt == "safeshard" and any(r.get("used") != "safeshard" for v in ok for r in v):
                cold += " (FELL BACK to the default loader)"
            cells.append(f"{statistics.median(s):.2f} ({s[0]:.2f}-{s[-1]:.2f}) "
                         f"rss +{rss / 1e9:.2f} GB{'' if same else ' DIGEST MISMATCH'}{cold}")
        fl = [max(r["seconds_all"]) for r in rows if r["mode"] == mode and r["tp"] == tp
              and r["format"] == "floor"]
        cells.append(f"{statistics.median(fl):.2f}" if fl else "n/a")
        fc = [max(r["cache_seconds_all"]) for r in rows if r["mode"] == mode and r["tp"] == tp
              and r["format"] == "floor" and all(r.get("cache_seconds_all") or [None])]
        cells.append(f"{statistics.median(fc):.2f}" if fc else "n/a")
        fd = [r["disk_seconds"] for r in rows if r["mode"] == mode and r["tp"] == tp
              and r["format"] == "floor" and r.get("disk_seconds")]
        cells.append(f"{statistics.median(fd):.2f}" if fd else "n/a")
        print(f"| {mode} tp {tp} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt", nargs="?")
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--modes", default="warm,cold")
    ap.add_argument("--formats", default=FORMATS)
    ap.add_argument("--summarize", metavar="LOG")
    args = ap.parse_args()
    if args.summarize:
        summarize([json.loads(l) for l in open(args.summarize) if l.startswith("{")])
        return
    import torch  # noqa: F401
    import vllm.plugins
    from vllm.engine.arg_utils import EngineArgs
    from vllm_world import fork_ranks

    vllm.plugins.load_general_plugins()
    print(f"# load average at start: {open('/proc/loadavg').read().strip()}", flush=True)
    rows: list[dict] = []
    for tp in [int(x) for x in args.tp.split(",")]:
        vllm_config = EngineArgs(model=args.ckpt, load_format="safeshard", tensor_parallel_size=tp,
                                 skip_tokenizer_init=True, enforce_eager=True, max_model_len=32,
                                 distributed_executor_backend="mp").create_engine_config()
        port = free_port()
        out = f"/tmp/vllm_load-{os.getpid()}-tp{tp}.json"
        fork_ranks(tp, lambda rank: run_rank(args, vllm_config, tp, rank, port, out))
        with open(out) as f:
            rows += json.load(f)
        os.remove(out)
    print(f"# load average at end: {open('/proc/loadavg').read().strip()}", flush=True)
    summarize(rows)


if __name__ == "__main__":
    main()
