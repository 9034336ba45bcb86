#!/usr/bin/env python3
"""Peer benchmark: one rank of a Llama checkpoint loaded by safeshard and by the peer loaders.

    python3 bench/peers.py CKPT [--tp 1,4,8] [--reps 5] [--modes warm,cold]
        [--loaders safeshard,safeshard-pread,safeshard-mmap,safeshard-direct,safeshard-py,
                   st-torch,st-numpy,runai,
                   fastsafetensors,instanttensor]
        [--safeshard target/release/safeshard] [--out results.json]

`safeshard` is the CLI (`load --rank R --json --digest`, default engine; `-pread`/`-mmap`/
`-direct` force one), `safeshard-py` the library through the Python binding (`safeshard.load`, when
importable). Every measurement is a fresh process (loaders interleaved; repetition outermost, then mode, tp and
loader; a 1 s pause before each). Ranks: tp 1 rank 0, tp 4 rank 1, tp 8 rank 3. Cold runs first
drop every checkpoint file from the page cache (`sync`, then `posix_fadvise(DONTNEED)` per
file) and check with `mincore` that at most 1% of the pages stayed resident (the run is
refused otherwise). Each child reports: in-process seconds (from the first open to the last
byte in memory; for the safeshard CLI its own `seconds`, and also the process wall time),
peak RSS (the child's own VmHWM; GNU time for the CLI), bytes read from storage (`/proc/self/io`
`read_bytes`, which includes waited-for children: the harness reads its own counter around
each child), and the SHA-256 of the rank's bytes laid out like safeshard's arena (tensors in
(file, offset) order, each at a 64-byte aligned offset, zero gaps), so every loader's output
is checked equal to safeshard's `--digest`.

Python loaders use vLLM's Llama rules: q/k/v/gate/up/embed_tokens/lm_head split on dim 0,
o/down on dim 1, everything else whole; each rank-local tensor is materialized contiguous
in memory (as a weight loader's `param.copy_` would need it).
"""
import argparse
import hashlib
import json
import os
import statistics
import struct
import subprocess
import sys
import time

DIM0 = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "embed_tokens", "lm_head")
DIM1 = ("o_proj", "down_proj")
RANK_OF_TP = {1: 0, 2: 1, 4: 1, 8: 3}
ALIGN = 64


def files_of(root):
    return sorted(f for f in os.listdir(root) if f.endswith(".safetensors"))


def header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return 8 + n, h


def plan_order(root):
    """Tensor names in safeshard's arena order: files by name, tensors by data offset."""
    out = []
    for fname in files_of(root):
        _, h = header(os.path.join(root, fname))
        for name, e in sorted(h.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            out.append((fname, name, e))
    return out


def split(name, shape, tp, rank):
    """(dim, start, stop) of the rank's slice, or None for the whole tensor."""
    if tp == 1 or not shape:
        return None
    if any(p in name for p in DIM0):
        n = shape[0] // tp
        return (0, rank * n, (rank + 1) * n)
    if any(p in name for p in DIM1) and len(shape) > 1:
        n = shape[1] // tp
        return (1, rank * n, (rank + 1) * n)
    return None


def digest(order, tensors):
    """SHA-256 of the rank's bytes in safeshard's arena layout; `tensors` maps name -> buffer."""
    h = hashlib.sha256()
    cursor = 0
    total = 0
    for _, name, _ in order:
        buf = memoryview(tensors[name]).cast("B")
        pad = (-cursor) % ALIGN
        if pad:
            h.update(b"\0" * pad)
            cursor += pad
        h.update(buf)
        cursor += len(buf)
        total += len(buf)
    return h.hexdigest(), total


def io_read_bytes():
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


# ---------------------------------------------------------------------------- loaders (child)

def load_st(root, tp, rank, framework):
    from safetensors import safe_open

    out = {}
    for fname in files_of(root):
        with safe_open(os.path.join(root, fname), framework=framework) as f:
            for name in f.keys():
                s = f.get_slice(name)
                shape = s.get_shape()
                cut = split(name, shape, tp, rank)
                if cut is None:
                    t = s[:]
                elif cut[0] == 0:
                    t = s[cut[1]:cut[2]]
                else:
                    t = s[:, cut[1]:cut[2]]
                if framework == "pt":
                    # get_slice returns views of the file mapping for whole tensors and
                    # dim-0 slices (nothing read yet); a loader must end with the bytes in
                    # its own memory (vLLM's `param.copy_`), so materialize exactly once.
                    t = t.contiguous() if not t.is_contiguous() else t.clone()
                else:
                    import numpy as np

                    t = np.ascontiguousarray(t)
                out[name] = t
    return out


def torch_bytes(t):
    import torch

    return t.contiguous().view(torch.uint8).numpy()


def narrow(t, name, tp, rank):
    cut = split(name, list(t.shape), tp, rank)
    if cut is None:
        return t
    return t.narrow(cut[0], cut[1], cut[2] - cut[1]).contiguous()


def load_runai(root, tp, rank):
    from runai_model_streamer import SafetensorsStreamer

    out = {}
    paths = [os.path.join(root, f) for f in files_of(root)]
    with SafetensorsStreamer() as s:
        s.stream_files(paths)
        for name, t in s.get_tensors():
            # The streamer reuses its buffer: a rank keeps a copy of its part (as vLLM's
            # weight loader copies into the parameter).
            r = narrow(t, name, tp, rank)
            out[name] = r.clone() if r.data_ptr() == t.data_ptr() else r
    return out


def load_fastsafetensors(root, tp, rank):
    from fastsafetensors import SafeTensorsFileLoader, SingleGroup

    loader = SafeTensorsFileLoader(SingleGroup(), "cpu", nogds=True)
    loader.add_filenames({0: [os.path.join(root, f) for f in files_of(root)]})
    fb = loader.copy_files_to_device()
    out = {}
    try:
        for name in fb.key_to_rank_lidx.keys():
            t = fb.get_tensor(name)
            out[name] = narrow(t, name, tp, rank).clone()
    finally:
        fb.close()
        loader.close()
    return out


def load_instanttensor(root, tp, rank):
    import instanttensor  # noqa: F401  (raises without a GPU; reported as n/a)

    raise RuntimeError("instanttensor needs a CUDA device")


def load_safeshard_py(root, tp, rank):
    import safeshard

    return safeshard.load(root, tp=tp, rank=rank)


CHILD = {
    "safeshard-py": load_safeshard_py,
    "st-torch": lambda r, tp, k: load_st(r, tp, k, "pt"),
    "st-numpy": lambda r, tp, k: load_st(r, tp, k, "np"),
    "runai": load_runai,
    "fastsafetensors": load_fastsafetensors,
    "instanttensor": load_instanttensor,
}


PREIMPORT = {
    "safeshard-py": ["torch", "safeshard"],
    "st-torch": ["torch", "safetensors"],
    "st-numpy": ["numpy", "safetensors"],
    "runai": ["torch", "runai_model_streamer"],
    "fastsafetensors": ["torch", "fastsafetensors"],
    "instanttensor": ["torch"],
}


def vm_hwm():
    """Peak resident set of this process image (bytes), from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def child(loader, root, tp, rank):
    import importlib

    # Imports are not loading: torch alone takes seconds to import on a busy machine.
    for m in PREIMPORT.get(loader, []):
        importlib.import_module(m)
    order = plan_order(root)
    io0 = io_read_bytes()
    t0 = time.perf_counter()
    tensors = CHILD[loader](root, tp, rank)
    seconds = time.perf_counter() - t0
    io1 = io_read_bytes()
    peak = vm_hwm()
    bufs = {}
    for name, t in tensors.items():
        bufs[name] = torch_bytes(t) if hasattr(t, "data_ptr") else t.view("u1")
    sha, total = digest(order, bufs)
    print(json.dumps({
        "seconds": seconds,
        "sha256": sha,
        "bytes": total,
        "read_bytes": io1 - io0,
        "maxrss": peak,
    }))


# ---------------------------------------------------------------------------- harness

def resident_fraction(paths):
    """Fraction of the files' bytes in the page cache, by util-linux `fincore` (mincore)."""
    total = resident = 0
    for p in paths:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", p],
                             capture_output=True, text=True, check=True).stdout.split()
        resident += int(out[0])
        total += os.path.getsize(p)
    return resident / total if total else 0.0


def drop_cache(paths):
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_cache(paths):
    for p in paths:
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


# CLI loaders: the default engine and each forced one.
SAFESHARD_CLI_IO = {"safeshard": "auto", "safeshard-pread": "pread", "safeshard-mmap": "mmap",
                    "safeshard-direct": "direct"}


def run_one(args, loader, tp, rank):
    io0 = io_read_bytes()
    t0 = time.perf_counter()
    if loader in SAFESHARD_CLI_IO:
        io = SAFESHARD_CLI_IO[loader]
        # GNU time reports its child's peak RSS; a child forked straight from this harness
        # would inherit the harness's own peak in ru_maxrss.
        cmd = ["/usr/bin/time", "-f", "maxrss_kib %M", args.safeshard, "load", args.ckpt, "--tp", str(tp), "--rank", str(rank),
               "--json", "--digest", "--io", io]
    else:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", loader, args.ckpt,
               str(tp), str(rank)]
    # Outputs are a few lines (far below a pipe's buffer), so waiting before reading them
    # cannot block.
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, _ = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    io1 = io_read_bytes()
    out, err = p.stdout.read(), p.stderr.read()
    p.stdout.close()
    p.stderr.close()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        return {"error": err.decode(errors="replace").strip().splitlines()[-1:]}
    line = json.loads(out.decode().strip().splitlines()[-1])
    return {
        "plan_read_bytes": line.get("read_bytes") if loader == "safeshard" else None,
        "seconds": line["seconds"],
        "wall": wall,
        "sha256": line["sha256"],
        "bytes": line.get("bytes"),
        # Storage reads of the whole child process (the harness's counter includes waited-for
        # children).
        "read_bytes": io1 - io0,
        "maxrss": line.get("maxrss") or maxrss_of(err),
    }


def limits(paths):
    """Physical limits measured in the same run, in bytes per second: single-thread memcpy
    into touched memory (numpy copyto, 1 GiB, best of 3) and into fresh memory (a new 1 GiB
    array each time: page faults included, which every fresh-process loader pays; best of
    3), and a cold sequential read of the first 2 GiB of the largest file with 16 MiB reads,
    buffered (through the page cache) and with O_DIRECT, each after dropping the cache."""
    import mmap

    import numpy as np

    n = 1 << 30
    src = np.ones(n, dtype=np.uint8)
    dst = np.zeros(n, dtype=np.uint8)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(3))
    del dst
    fresh = min(_timed(lambda: np.copyto(np.empty(n, dtype=np.uint8), src)) for _ in range(3))
    del src
    big = max(paths, key=os.path.getsize)
    want = min(2 << 30, os.path.getsize(big)) // (16 << 20) * (16 << 20)
    seq = {}
    for kind, flags in (("buffered", 0), ("direct", getattr(os, "O_DIRECT", 0))):
        drop_cache([big])
        try:
            fd = os.open(big, os.O_RDONLY | flags)
        except OSError:
            continue
        buf = mmap.mmap(-1, 16 << 20)  # page-aligned, as O_DIRECT needs
        t0 = time.perf_counter()
        got = 0
        try:
            while got < want:
                k = os.preadv(fd, [buf], got)
                if not k:
                    break
                got += k
        finally:
            os.close(fd)
        seq[kind] = got / (time.perf_counter() - t0)
    drop_cache([big])
    return {"memcpy_Bps": n / best, "fresh_memcpy_Bps": n / fresh,
            "seq_read_Bps": seq.get("buffered"), "seq_read_direct_Bps": seq.get("direct")}


def _timed(f):
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def maxrss_of(stderr):
    for l in stderr.decode(errors="replace").splitlines():
        if l.startswith("maxrss_kib "):
            return int(l.split()[1]) * 1024
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=4, metavar=("LOADER", "CKPT", "TP", "RANK"))
    ap.add_argument("ckpt", nargs="?")
    ap.add_argument("--tp", default="1,4,8")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--modes", default="warm,cold")
    ap.add_argument("--loaders", default="safeshard,safeshard-pread,safeshard-mmap,st-torch,"
                    "st-numpy,runai,fastsafetensors,instanttensor")
    ap.add_argument("--safeshard", default="target/release/safeshard")
    ap.add_argument("--pause", type=float, default=1.0)
    ap.add_argument("--out")
    ap.add_argument("--summarize", metavar="LOG",
                    help="print the tables from the JSON lines of an earlier (maybe cut) run")
    ap.add_argument("--limits", action="store_true",
                    help="also measure memcpy and cold sequential read bandwidth")
    args = ap.parse_args()
    if args.child:
        loader, root, tp, rank = args.child
        child(loader, root, int(tp), int(rank))
        return
    if args.summarize:
        runs, lim = [], None
        for l in open(args.summarize):
            if l.startswith("{"):
                runs.append(json.loads(l))
            elif l.startswith("# limits json "):
                lim = json.loads(l[len("# limits json "):])
        seen = []
        for r in runs:
            if r["loader"] not in seen:
                seen.append(r["loader"])
        summarize(runs, seen, lim)
        return
    paths = [os.path.join(args.ckpt, f) for f in files_of(args.ckpt)]
    loaders = args.loaders.split(",")
    results = []
    print(f"# load average at start: {open('/proc/loadavg').read().strip()}", flush=True)
    lim = limits(paths) if args.limits else None
    if lim:
        gb = lambda k: f"{lim[k] / 1e9:.2f}" if lim.get(k) else "n/a"  # noqa: E731
        print(f"# limits: memcpy {gb('memcpy_Bps')} GB/s (1 thread, touched), "
              f"{gb('fresh_memcpy_Bps')} GB/s (1 thread, fresh memory); cold sequential read "
              f"{gb('seq_read_Bps')} GB/s buffered, {gb('seq_read_direct_Bps')} GB/s O_DIRECT",
              flush=True)
        print(f"# limits json {json.dumps(lim)}", flush=True)
    # Repetitions outermost: a run cut short still covers every (mode, tp) equally.
    for rep in range(args.reps):
        for mode in args.modes.split(","):
            for tp in [int(x) for x in args.tp.split(",")]:
                rank = RANK_OF_TP[tp]
                for loader in loaders:
                    if mode == "cold":
                        drop_cache(paths)
                        frac = resident_fraction(paths)
                        if frac > 0.01:
                            print(f"# cold check failed: {frac:.1%} resident", flush=True)
                            continue
                    else:
                        warm_cache(paths)
                    time.sleep(args.pause)
                    load = open("/proc/loadavg").read().split()[0]
                    r = run_one(args, loader, tp, rank)
                    r.update(mode=mode, tp=tp, rank=rank, rep=rep, loader=loader, load=load)
                    results.append(r)
                    print(json.dumps(r), flush=True)
    print(f"# load average at end: {open('/proc/loadavg').read().strip()}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"limits": lim, "runs": results}, f, indent=1)
    summarize(results, loaders, lim)


def summarize(results, loaders, lim=None):
    ref = {}
    for r in results:
        if r.get("loader") == "safeshard" and "sha256" in r:
            ref[(r["tp"], r["rank"])] = r["sha256"]
    print("\n| mode tp | " + " | ".join(loaders) + " |")
    print("|---|" + "---|" * len(loaders))
    keys = sorted({(r["mode"], r["tp"]) for r in results}, key=lambda k: (k[0] != "warm", k[1]))
    for mode, tp in keys:
        cells = []
        for l in loaders:
            rs = [r for r in results if r["mode"] == mode and r["tp"] == tp and r["loader"] == l]
            ok = [r for r in rs if "seconds" in r]
            if not ok:
                err = next((r.get("error") for r in rs), None)
                cells.append(f"n/a ({err[0][:40] if err else 'not run'})")
                continue
            s = sorted(r["seconds"] for r in ok)
            same = all(r["sha256"] == ref.get((tp, r["rank"])) for r in ok)
            rss = statistics.median(r["maxrss"] for r in ok if r.get("maxrss")) if any(r.get("maxrss") for r in ok) else 0
            rb = statistics.median(r["read_bytes"] for r in ok)
            cells.append(f"{statistics.median(s):.2f} ({s[0]:.2f}–{s[-1]:.2f}) "
                         f"rss {rss / 1e9:.2f} GB read {rb / 1e9:.2f} GB{'' if same else ' DIGEST MISMATCH'}")
        print(f"| {mode} tp {tp} | " + " | ".join(cells) + " |")
    # Goal ratios: safeshard (auto) against the best peer and the physical limits.
    peers = [l for l in loaders if not l.startswith("safeshard")]
    print("\n| mode tp | safeshard s | best peer (s) | ratio | floor s (limit) | ratio to floor "
          "| second floor s (limit) | ratio to it |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, tp in keys:
        def med(l, key="seconds"):
            v = [r[key] for r in results if r["mode"] == mode and r["tp"] == tp
                 and r["loader"] == l and key in r and r[key] is not None]
            return statistics.median(v) if v else None
        me = med("safeshard")
        best = min(((med(l), l) for l in peers if med(l) is not None), default=(None, None))
        # The floors (memcpy into touched memory warm, buffered sequential read
        # cold) and a second one each: memcpy into fresh memory (the page faults a fresh
        # process pays) and an O_DIRECT sequential read.
        floor = second = None
        if lim and me:
            def fl(b, key, label):
                return (b / lim[key], label) if b and lim.get(key) else None
            if mode == "warm":
                b = med("safeshard", "bytes")
                floor = fl(b, "memcpy_Bps", "memcpy")
                second = fl(b, "fresh_memcpy_Bps", "fresh memcpy")
            else:
                b = med("safeshard", "plan_read_bytes")
                floor = fl(b, "seq_read_Bps", "seq read")
                second = fl(b, "seq_read_direct_Bps", "O_DIRECT seq read")
        cells = [f"{me:.2f}" if me else "n/a",
                 f"{best[0]:.2f} ({best[1]})" if best[0] else "n/a",
                 f"{me / best[0]:.2f}" if me and best[0] else "n/a"]
        for f in (floor, second):
            cells += [f"{f[0]:.2f} ({f[1]})" if f else "n/a", f"{f[0] / me:.2f}" if f and me else "n/a"]
        print(f"| {mode} tp {tp} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
