#!/usr/bin/env python3
"""Trainer loading benchmark: ``safeshard.load_state_dict`` against
``torch.distributed.checkpoint.load`` with ``HuggingFaceStorageReader`` on the same state
dicts (a ``transformers`` Llama built on the meta device, parallelized, materialized empty),
warm and cold page cache, interleaved A/B, medians.

    python bench/trainer.py --dir /tmp/l3-8b-2l --layers 2 --world 4 --layout fsdp --reps 5

Without torchrun in the environment it writes the checkpoint if missing (``safeshard
synth`` preset ``llama3-8b``, cut to ``--layers``), relaunches itself under ``torchrun``
with ``--world`` gloo processes, and prints a table (also written as JSON next to
``--out``). Cold runs drop the checkpoint's pages first (``posix_fadvise(DONTNEED)`` on
every file, checked with ``/proc/self/io``'s ``read_bytes``); warm runs read the files once
first (untimed). Every rank's wall time is the
barrier-to-barrier time of the load; the table has the median over ``--reps`` of the
slowest rank, and the CPU time of each rank's process (all threads) during the load, which
says more than wall time on a shared machine. Build the extension in release mode for
numbers (``pip install .``; ``tests/python.sh`` builds the dev profile). The first repetition checks that both loaders put the same bytes in every
local shard.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, default=Path("/tmp/safeshard-bench-llama3-8b"))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--layout", choices=("fsdp", "tp", "2d"), default="fsdp")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--share", default="none", help="safeshard's share mode")
    p.add_argument("--alone", action="store_true",
                   help="also time safeshard with every rank named its own node "
                        "(SAFESHARD_NODE): each asks for exactly its pages, no node spans")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--caches", default="warm,cold")
    p.add_argument("--out", type=Path, default=None, help="JSON results file")
    return p.parse_args()


def io_read_bytes() -> int:
    """Bytes this process caused to be fetched from storage (/proc/self/io)."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def evict(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def prewarm(files: list[Path]) -> None:
    """Reads every file once, so a warm run finds the checkpoint in the page cache (the
    previous cold run, or other processes, may have left only part of it there)."""
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.read(8 << 20):
                pass


def build(ckpt: Path, layout: str, dtype: str) -> Any:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(ckpt)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    world = dist.get_world_size()

    def tp(mesh: Any) -> None:
        plan: dict[str, Any] = {
            "model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
            "lm_head": ColwiseParallel(output_layouts=Replicate()),
        }
        for i in range(len(model.model.layers)):
            for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                      "mlp.gate_proj", "mlp.up_proj"):
                plan[f"model.layers.{i}.{m}"] = ColwiseParallel()
            for m in ("self_attn.o_proj", "mlp.down_proj"):
                plan[f"model.layers.{i}.{m}"] = RowwiseParallel()
        parallelize_module(model, mesh, plan)

    def fsdp(mesh: Any) -> None:
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)

    if layout == "fsdp":
        fsdp(init_device_mesh("cpu", (world,)))
    elif layout == "tp":
        tp(init_device_mesh("cpu", (world,)))
    else:
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        tp(mesh["tp"])
        fsdp(mesh["dp"])
    model.to_empty(device="cpu")
    return model


def local(t: Any) -> Any:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def worker(a: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    import safeshard

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    files = sorted(a.dir.glob("*.safetensors"))
    model = build(a.dir, a.layout, a.dtype)
    sd = model.state_dict()
    shard_bytes = 0
    seen = set()
    for v in sd.values():
        t = local(v)
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            # Bytes of the checkpoint's (bf16) values this rank holds.
            shard_bytes += t.numel() * 2
    def alone() -> int:
        os.environ["SAFESHARD_NODE"] = f"alone-{rank}"
        try:
            return safeshard.load_state_dict(sd, a.dir, share=a.share).bytes_read
        finally:
            del os.environ["SAFESHARD_NODE"]

    loaders = {
        "safeshard": lambda: safeshard.load_state_dict(sd, a.dir, share=a.share).bytes_read,
        **({"safeshard-alone": alone} if a.alone else {}),
        "dcp": lambda: dcp.load(sd, storage_reader=dcp.HuggingFaceStorageReader(str(a.dir))),
    }
    loaders["safeshard"]()  # warm-up: the first warm run finds the files cached
    rows: list[dict[str, Any]] = []
    snapshot: dict[str, Any] | None = None
    for rep in range(a.reps):
        for cache in a.caches.split(","):
            for name, load in loaders.items():
                if cache == "cold":
                    evict(files)
                elif rank == 0:
                    prewarm(files)
                dist.barrier()
                io0, t0, c0 = io_read_bytes(), time.perf_counter(), time.process_time()
                reported = load()
                cpu = time.process_time() - c0
                dist.barrier()
                dt, io = time.perf_counter() - t0, io_read_bytes() - io0
                rows.append({"rep": rep, "cache": cache, "loader": name, "rank": rank,
                             "seconds": dt, "cpu_seconds": cpu, "io_read_bytes": io,
                             "bytes_read": reported if isinstance(reported, int) else None})
                if rep == 0:
                    # Same bytes from both loaders, every local shard.
                    now = {k: local(v).clone().view(torch.uint8) for k, v in sd.items()}
                    if snapshot is None:
                        snapshot = now
                    else:
                        bad = [k for k in now if not torch.equal(now[k], snapshot[k])]
                        assert not bad, f"rank {rank}: loaders differ on {bad[:3]}"
                    for v in sd.values():  # scribble, so the next load must rewrite
                        local(v).view(torch.uint8).fill_(0x5A)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"rows": rows, "shard_bytes": shard_bytes})
    if rank == 0:
        out = {"rows": [r for g in gathered for r in g["rows"]],
               "shard_bytes": [g["shard_bytes"] for g in gathered]}
        Path(os.environ["SAFESHARD_BENCH_OUT"]).write_text(json.dumps(out))
    dist.destroy_process_group()


def table(a: argparse.Namespace, res: dict[str, Any], load: tuple[float, ...]) -> str:
    rows = res["rows"]
    shard = res["shard_bytes"]
    lines = [
        f"layout {a.layout}, world {a.world}, {a.layers} layers of Llama-3-8B, model {a.dtype}, "
        f"safeshard share={a.share}, {a.reps} reps; load average before "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        "",
        "| cache | loader | median s (slowest rank) | min | max | CPU s/rank (median, all "
        "threads) | read/rank (MiB, median) | /proc read_bytes/rank (MiB) "
        "| local shard/rank (MiB) | read / shard |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    med: dict[tuple[str, str], float] = {}
    for cache in a.caches.split(","):
        for loader in ("safeshard", "safeshard-alone", "dcp"):
            sel = [r for r in rows if r["cache"] == cache and r["loader"] == loader]
            if not sel:
                continue
            per_rep = [max(r["seconds"] for r in sel if r["rep"] == k) for k in range(a.reps)]
            med[(cache, loader)] = statistics.median(per_rep)
            rb = [r["bytes_read"] for r in sel if r["bytes_read"] is not None]
            io = [r["io_read_bytes"] for r in sel]
            cpu = statistics.median(r.get("cpu_seconds", float("nan")) for r in sel)
            mib = 1 << 20
            read = statistics.median(rb) / mib if rb else float("nan")
            ratio = (statistics.median(rb) / statistics.median(shard)) if rb else float("nan")
            lines.append(
                f"| {cache} | {loader} | {med[(cache, loader)]:.3f} | {min(per_rep):.3f} | "
                f"{max(per_rep):.3f} | {cpu:.3f} | {read:.1f} | {statistics.median(io) / mib:.1f} | "
                f"{statistics.median(shard) / mib:.1f} | {ratio:.3f} |"
            )
    lines.append("")
    for cache in a.caches.split(","):
        if (cache, "dcp") in med and (cache, "safeshard") in med:
            r = med[(cache, "safeshard")] / med[(cache, "dcp")]
            lines.append(f"{cache}: safeshard / dcp = {r:.3f} (goal <= 0.3)")
        if (cache, "safeshard-alone") in med and (cache, "safeshard") in med:
            r = med[(cache, "safeshard")] / med[(cache, "safeshard-alone")]
            lines.append(f"{cache}: safeshard / safeshard-alone = {r:.3f}")
    return "\n".join(lines)


def main() -> None:
    a = args()
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ:
        worker(a)
        return
    if not any(a.dir.glob("*.safetensors")):
        import safeshard

        t = time.perf_counter()
        safeshard.synth(a.dir, "llama3-8b", layers=a.layers)
        print(f"wrote {a.dir} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    out = a.out or Path(__file__).parent / "results" / f"trainer-{time.strftime('%Y%m%d-%H%M%S')}.json"
    load = os.getloadavg()
    env = {**os.environ, "SAFESHARD_BENCH_OUT": str(out), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(a.world), __file__, *sys.argv[1:]]
    subprocess.run(cmd, check=True, env=env)
    res = json.loads(out.read_text())
    res["args"] = {k: str(v) for k, v in vars(a).items()}
    res["loadavg_before"] = load
    res["loadavg_after"] = os.getloadavg()
    out.write_text(json.dumps(res, indent=1))
    print(table(a, res, load))
    after = res["loadavg_after"]
    print(f"load average after {after[0]:.2f} {after[1]:.2f} {after[2]:.2f}; results in {out}")


if __name__ == "__main__":
    main()
