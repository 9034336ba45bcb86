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
    "runai-buffered": load_runai,
    "runai-direct": load_runai,
    "fastsafetensors": load_fastsafetensors,
    "fastsafetensors-buffered": load_fastsafetensors,
    "fastsafetensors-direct": load_fastsafetensors,
    "instanttensor": load_instanttensor,
}

# Peers' own I/O modes, chosen by their environment variables (the plain names keep each
# peer's default: Run:ai's io_uring_direct, fastsafetensors' O_DIRECT on local disks).
CHILD_ENV = {
    "runai-buffered": {"RUNAI_STREAMER_FS_STRATEGY": "io_uring_buffered"},
    "runai-direct": {"RUNAI_STREAMER_FS_STRATEGY": "io_uring_direct"},
    "fastsafetensors-buffered": {"FASTSAFETENSORS_ODIRECT": "0"},
    "fastsafetensors-direct": {"FASTSAFETENSORS_ODIRECT": "1"},
}


PREIMPORT = {
    "safeshard-py": ["torch", "safeshard"],
    "st-torch": ["torch", "safetensors"],
    "st-numpy": ["numpy", "safetensors"],
    "runai": ["torch", "runai_model_streamer"],
    "runai-buffered": ["torch", "runai_model_streamer"],
    "runai-direct": ["torch", "runai_model_streamer"],
    "fastsafetensors": ["torch", "fastsafetensors"],
    "fastsafetensors-buffered": ["torch", "fastsafetensors"],
    "fastsafetensors-direct": ["torch", "fastsafetensors"],
    "instanttensor": ["torch"],
}


def vm_hwm():
    """Peak resident set of this process image (bytes), from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------------------- floors (child)
#
# The physical floors run as loaders: each repetition measures them in a fresh process, in
# the same interleaved loop and after the same cache drop (cold) or warm-up (warm) as the
# loads, so a floor and the loads it bounds share the machine's state (this VM's disk rate
# moves by 2x within a session). The configuration each repeats (queue depth and request
# size; fill threads) is the best of the `--limits` sweep at the start, passed in
# `SS_FLOOR_*`/`SS_FILL_*`.
# - cold: `floor-seq`, the rank's page-union bytes read sequentially at the disk's best
#   queue depth; `floor-union`, the page union itself read page-exact (one O_DIRECT request
#   per page run, 64 in flight).
# - warm: `floor-fresh`, the rank's bytes written into fresh pages from a small touched
#   source;
#   `floor-cache`, that many bytes copied out of the page cache into fresh pages (what a
#   one-copy load pays at least: it also reads every byte from memory).

FLOORS = {"cold": ("floor-seq", "floor-union"), "warm": ("floor-fresh", "floor-cache")}


def held_bytes(root, tp, rank):
    """Bytes of the rank's tensors (what a load must hold in fresh memory)."""
    total = 0
    for _, name, e in plan_order(root):
        n = e["data_offsets"][1] - e["data_offsets"][0]
        cut = split(name, e["shape"], tp, rank)
        total += n if cut is None else n // e["shape"][cut[0]] * (cut[2] - cut[1])
    return total


def seq_read(paths, nbytes, depth, req):
    """Reads `nbytes` from the start of the files in order with O_DIRECT, `depth` requests of
    `req` bytes in flight; returns (bytes, seconds): the union's bytes at the disk's best
    sequential rate."""
    import mmap

    jobs = []
    for p in paths:
        size = os.path.getsize(p) // PAGE * PAGE
        for off in range(0, size, req):
            if nbytes <= 0:
                break
            k = min(req, size - off, -(-nbytes // PAGE) * PAGE)
            jobs.append((p, off, k))
            nbytes -= k
    fds = {p: os.open(p, os.O_RDONLY | os.O_DIRECT) for p in paths}
    it = iter(jobs)
    got = [0] * depth

    def work(i):
        buf = mmap.mmap(-1, req)
        for p, off, k in it:  # next() on a shared iterator is atomic under the GIL
            got[i] += os.preadv(fds[p], [memoryview(buf)[:k]], off)
        buf.close()

    try:
        t = _parallel(depth, work)
    finally:
        for fd in fds.values():
            os.close(fd)
    return sum(got), t


def floor_child(loader, root, tp, rank):
    """One floor measurement (see FLOORS), printed like a load's line."""
    paths = [os.path.join(root, f) for f in files_of(root)]
    if loader == "floor-seq":
        depth, req = int(os.environ["SS_FLOOR_QD"]), int(os.environ["SS_FLOOR_REQ"])
        got, secs = seq_read(paths, union_bytes(root, tp, rank), depth, req)
    elif loader == "floor-union":
        got, secs, _ = union_read(root, tp, rank, depth=int(os.environ.get("SS_FLOOR_UNION_QD", "64")))
    elif loader == "floor-cache":
        import floors

        r = floors.cache_copy_floor(paths, held_bytes(root, tp, rank), int(os.environ["SS_FILL_THREADS"]))
        got, secs = r["bytes"], r["seconds"]
    else:
        got = held_bytes(root, tp, rank)
        secs = fresh_fill_from_small(got, int(os.environ["SS_FILL_THREADS"]),
                                     os.environ["SS_FILL_POPULATE"] == "1")
    print(json.dumps({"seconds": secs, "sha256": None, "bytes": got, "floor": True}))


def child(loader, root, tp, rank):
    import importlib

    if loader.startswith("floor-"):
        floor_child(loader, root, tp, rank)
        return

    # Imports are not loading: torch alone takes seconds to import on a busy machine.
    for m in PREIMPORT.get(loader, []):
        importlib.import_module(m)
    order = plan_order(root)
    io0 = io_read_bytes()
    c0 = time.process_time()
    t0 = time.perf_counter()
    tensors = CHILD[loader](root, tp, rank)
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0
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
        "cpu": cpu,
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
    env = dict(os.environ, **CHILD_ENV.get(loader, {}), **getattr(args, "floor_env", {}))
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(p.pid, 0)
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
        # CPU seconds (user + system) of the load: in-process for the Python loaders (imports
        # excluded), the whole process for the CLI. A loaded machine stretches wall time far
        # more than the work done.
        "cpu": line.get("cpu", usage.ru_utime + usage.ru_stime),
    }


PAGE = 4096
MADV_POPULATE_WRITE = 23  # Linux 5.14


def _address(buf):
    """Address of a writable buffer (an mmap), for ctypes; the export is dropped at once."""
    import ctypes

    view = (ctypes.c_char * len(buf)).from_buffer(buf)
    addr = ctypes.addressof(view)
    del view
    return addr


def _parallel(n, work):
    """Runs work(i) for i in range(n) on n threads started together; returns the seconds from
    the common start to the last one's end. The work must release the GIL (ctypes calls and
    os.preadv do)."""
    import threading

    go = threading.Barrier(n + 1)

    def body(i):
        go.wait()
        work(i)

    ts = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    go.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    return time.perf_counter() - t0


def fresh_fill_seconds(src, threads, populate, n=None):
    """Seconds to copy the touched buffer `src` into `n` (default: its length) bytes of fresh
    anonymous pages on `threads` threads, each its own page-aligned share, the source read
    over and over when shorter: the page faults of first touch (`populate` False) or one
    MADV_POPULATE_WRITE of the share before its copy (True). This is what a loader that
    starts in a fresh process pays for a warm load at best."""
    import ctypes
    import mmap

    size = len(src)
    n = size if n is None else n
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    dst = mmap.mmap(-1, max(n, 1))
    s, d = _address(src), _address(dst)
    share = -(-n // threads) // PAGE * PAGE + PAGE

    def work(i):
        a, b = i * share, min(n, (i + 1) * share)
        if b <= a:
            return
        if populate:
            libc.madvise(d + a, b - a, MADV_POPULATE_WRITE)
        off = a
        while off < b:
            k = min(size - off % size, b - off)
            ctypes.memmove(d + off, s + off % size, k)
            off += k

    t = _parallel(threads, work)
    dst.close()
    return t


def fresh_fill_from_small(n, threads, populate, piece=64 << 20):
    """`fresh_fill_seconds` of `n` bytes from one touched `piece`-byte source (which stays
    in the CPU's caches): the cost of the fresh pages alone (faults, zeroing, the writes),
    for any size without a source as large."""
    import mmap

    src = mmap.mmap(-1, piece)
    src.write(b"\1" * piece)
    t = fresh_fill_seconds(src, threads, populate, n)
    src.close()
    return t


def direct_read_Bps(path, depth, req, start, want):
    """Bytes per second of `want` bytes of `path` from byte `start`, read with O_DIRECT by
    `depth` threads, each with one request of `req` bytes in flight at a time (offsets handed
    out in order, so the file is read forwards `depth` requests at a time)."""
    import itertools
    import mmap

    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    claim = itertools.count()  # next() is atomic under the GIL
    got = [0] * depth

    def work(i):
        buf = mmap.mmap(-1, req)
        while True:
            off = next(claim) * req
            if off >= want:
                break
            got[i] += os.preadv(fd, [buf], start + off)
        buf.close()

    try:
        t = _parallel(depth, work)
    finally:
        os.close(fd)
    return sum(got) / t


def limits(paths):
    """Physical limits measured in the same run, in bytes per second.

    Warm: a copy of 1 GiB from touched memory into fresh anonymous pages on all cores (1,
    cores and 2 x cores threads, first-touch faults or MADV_POPULATE_WRITE first; the best,
    of 3 runs each), which is what a fresh process that loads from the page cache pays at
    best; for reference a single-thread memcpy into touched and into fresh memory (numpy).
    Cold: the largest file read with O_DIRECT at queue depths 1-64 (threads with one request
    each, 1 and 4 MiB requests; every configuration reads its own 1 GiB of the file, and the
    sweep runs twice, so that a storage cache below the VM would show as the second pass
    being faster); the best is the disk's floor. For reference a single-stream buffered and
    O_DIRECT read of the first 2 GiB with 16 MiB reads, each after dropping the cache."""
    import mmap

    import numpy as np

    n = 1 << 30
    src = np.ones(n, dtype=np.uint8)
    dst = np.zeros(n, dtype=np.uint8)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(3))
    del dst
    fresh = min(_timed(lambda: np.copyto(np.empty(n, dtype=np.uint8), src)) for _ in range(3))
    del src
    cores = os.cpu_count() or 1
    touched = mmap.mmap(-1, n)
    touched.write(b"\1" * n)
    fills = {}
    fill_cfg = {}
    for threads in sorted({1, cores, 2 * cores}):
        for populate in (False, True):
            key = f"{threads} threads {'populate' if populate else 'first-touch'}"
            fills[key] = n / min(fresh_fill_seconds(touched, threads, populate) for _ in range(3))
            fill_cfg[key] = (threads, populate)
    touched.close()
    big = max(paths, key=os.path.getsize)
    size = os.path.getsize(big)
    want = min(2 << 30, size) // (16 << 20) * (16 << 20)
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
    depths = {}
    depth_cfg = {}
    window = min(1 << 30, size // (4 << 20) * (4 << 20))
    configs = [(d, r) for r in (1 << 20, 4 << 20) for d in (1, 2, 4, 8, 16, 32, 64)]
    for sweep in range(2):
        for k, (d, r) in enumerate(configs):
            start = (k * window) % max(1, size - window) // (4 << 20) * (4 << 20)
            drop_cache([big])
            try:
                rate = direct_read_Bps(big, d, r, start, window)
            except OSError:
                continue
            key = f"qd {d} x {r >> 20} MiB"
            depth_cfg[key] = (d, r)
            depths[key] = max(depths.get(key, 0), rate)
            depths[f"{key} pass {sweep + 1}"] = rate
    drop_cache([big])
    best_fill = max(fills.items(), key=lambda kv: kv[1])
    best_depth = max(((k, v) for k, v in depths.items() if "pass" not in k),
                     key=lambda kv: kv[1], default=(None, None))
    return {"memcpy_Bps": n / best, "fresh_memcpy_Bps": n / fresh,
            "fresh_fill_Bps": best_fill[1], "fresh_fill_how": best_fill[0],
            "fresh_fill": fills,
            "seq_read_Bps": seq.get("buffered"), "seq_read_direct_Bps": seq.get("direct"),
            "direct_read_Bps": best_depth[1], "direct_read_how": best_depth[0],
            "direct_read_cfg": depth_cfg.get(best_depth[0]),
            "fresh_fill_cfg": fill_cfg[best_fill[0]],
            "direct_read": depths}


def union_intervals(root, tp, rank):
    """The file pages that rank `rank` of `tp` reads (the page union of its slices under the
    rules of `split`), as merged (file, start, end) intervals: the least a cold load must
    read from storage."""
    out = []
    for fname in files_of(root):
        base, h = header(os.path.join(root, fname))
        spans = []
        for name, e in h.items():
            s0, s1 = (base + x for x in e["data_offsets"])
            shape = e["shape"]
            cut = split(name, shape, tp, rank)
            if cut is None:
                spans.append((s0, s1))
                continue
            row = (s1 - s0) // shape[0] if shape[0] else 0
            if cut[0] == 0:
                spans.append((s0 + cut[1] * row, s0 + cut[2] * row))
            else:
                esz = row // shape[1]
                a, b = cut[1] * esz, cut[2] * esz
                spans.extend((s0 + r * row + a, s0 + r * row + b) for r in range(shape[0]))
        pages = sorted((s // PAGE * PAGE, -(-e // PAGE) * PAGE) for s, e in spans if e > s)
        merged = []
        for s, e in pages:
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        out.extend((fname, s, e) for s, e in merged)
    return out


def union_bytes(root, tp, rank):
    return sum(e - s for _, s, e in union_intervals(root, tp, rank))


def union_read_Bps(root, tp, rank, depth=32, req=4 << 20):
    """Bytes per second of `union_read` and its request count."""
    got, secs, n = union_read(root, tp, rank, depth, req)
    return got / secs, n


def union_read(root, tp, rank, depth=32, req=4 << 20):
    """Reads exactly the rank's page union with O_DIRECT: one request per merged page run
    (runs over `req` split), `depth` in flight, after dropping the cache; returns (bytes,
    seconds, requests). On a device with few IOPS, a union of small runs (inner-dim splits) reads far
    slower than its bytes at the sequential rate: the floor of a union-only cold load."""
    import mmap

    reqs = []
    for fname, s, e in union_intervals(root, tp, rank):
        for a in range(s, e, req):
            reqs.append((fname, a, min(e, a + req)))
    fds = {f: os.open(os.path.join(root, f), os.O_RDONLY | os.O_DIRECT) for f in files_of(root)}
    drop_cache([os.path.join(root, f) for f in fds])
    it = iter(reqs)
    got = [0] * depth

    def work(i):
        buf = mmap.mmap(-1, req)
        for fname, a, b in it:  # next() on a shared iterator is atomic under the GIL
            got[i] += os.preadv(fds[fname], [memoryview(buf)[:b - a]], a)
        buf.close()

    try:
        t = _parallel(depth, work)
    finally:
        for fd in fds.values():
            os.close(fd)
    return sum(got), t, len(reqs)



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
                    help="also measure the floors: fresh pages filled on all cores, the disk "
                         "at its best queue depth, the page union of each rank")
    ap.add_argument("--limits-only", action="store_true",
                    help="measure the floors (as --limits) and stop")
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
    lim = limits(paths) if args.limits or args.limits_only else None
    if lim:
        tps = [int(x) for x in args.tp.split(",")]
        lim["union_bytes"] = {f"{tp}/{RANK_OF_TP[tp]}": union_bytes(args.ckpt, tp, RANK_OF_TP[tp])
                              for tp in tps}
        lim["union_read"] = {}
        for tp in tps:
            rate, n = union_read_Bps(args.ckpt, tp, RANK_OF_TP[tp])
            lim["union_read"][f"{tp}/{RANK_OF_TP[tp]}"] = {"Bps": rate, "requests": n}
        gb = lambda k: f"{lim[k] / 1e9:.2f}" if lim.get(k) else "n/a"  # noqa: E731
        print(f"# limits: fresh pages filled {gb('fresh_fill_Bps')} GB/s ({lim['fresh_fill_how']}; "
              f"1 thread numpy {gb('fresh_memcpy_Bps')}, touched memory {gb('memcpy_Bps')}); "
              f"disk O_DIRECT {gb('direct_read_Bps')} GB/s ({lim['direct_read_how']}; one 16 MiB "
              f"stream {gb('seq_read_direct_Bps')} direct, {gb('seq_read_Bps')} buffered); "
              "page unions " + ", ".join(
                  f"tp/rank {k} {v / 1e9:.2f} GB (read page-exact at QD 32: "
                  f"{lim['union_read'][k]['Bps'] / 1e9:.2f} GB/s, "
                  f"{lim['union_read'][k]['requests']} requests)"
                  for k, v in lim["union_bytes"].items()), flush=True)
        print(f"# limits json {json.dumps(lim)}", flush=True)
        (qd, req), (threads, populate) = lim["direct_read_cfg"], lim["fresh_fill_cfg"]
        args.floor_env = {"SS_FLOOR_QD": str(qd), "SS_FLOOR_REQ": str(req),
                          "SS_FILL_THREADS": str(threads), "SS_FILL_POPULATE": str(int(populate))}
    if args.limits_only:
        return
    # Repetitions outermost: a run cut short still covers every (mode, tp) equally.
    for rep in range(args.reps):
        for mode in args.modes.split(","):
            for tp in [int(x) for x in args.tp.split(",")]:
                rank = RANK_OF_TP[tp]
                for loader in loaders + (list(FLOORS[mode]) if lim else []):
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
    summarize(results, loaders + [f for m in ("warm", "cold") for f in FLOORS[m]
                                  if any(r["loader"] == f for r in results)], lim)


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
            same = l.startswith("floor-") or all(r["sha256"] == ref.get((tp, r["rank"])) for r in ok)
            rss = statistics.median(r["maxrss"] for r in ok if r.get("maxrss")) if any(r.get("maxrss") for r in ok) else 0
            rb = statistics.median(r["read_bytes"] for r in ok)
            cells.append(f"{statistics.median(s):.2f} ({s[0]:.2f}–{s[-1]:.2f}) "
                         f"rss {rss / 1e9:.2f} GB read {rb / 1e9:.2f} GB{'' if same else ' DIGEST MISMATCH'}")
        print(f"| {mode} tp {tp} | " + " | ".join(cells) + " |")
    # Goal ratios: safeshard (auto) against the best peer and the physical limits.
    peers = [l for l in loaders if not l.startswith(("safeshard", "floor-"))]
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
        # The floors, measured in the same interleaved loop as the loads (see FLOORS): the
        # rank's bytes written into fresh pages on all cores (warm); the rank's page union's
        # bytes read sequentially at the disk's best queue depth, and the page union itself
        # read page-exact, one request per page run (cold: what reading no byte outside the
        # union costs on this device). Logs from before the interleaved floors fall back to
        # the rates of the sweep at the start.
        floor = second = None
        if mode == "warm" and med("floor-fresh"):
            floor = (med("floor-fresh"), "fresh pages, all cores")
            second = (med("floor-cache"), "page cache -> fresh pages") if med("floor-cache") else None
        elif mode == "cold" and med("floor-seq"):
            floor = (med("floor-seq"), "union bytes, sequential, best QD")
            second = (med("floor-union"), "page union read page-exact") if med("floor-union") else None
        elif lim and me:
            def fl(b, key, label):
                return (b / lim[key], label) if b and lim.get(key) else None
            if mode == "warm":
                b = med("safeshard", "bytes")
                floor = fl(b, "fresh_fill_Bps", "fresh pages, all cores")
                second = fl(b, "memcpy_Bps", "memcpy touched")
            else:
                rank = RANK_OF_TP[tp]
                b = ((lim.get("union_bytes") or {}).get(f"{tp}/{rank}")
                     or med("safeshard", "plan_read_bytes"))
                floor = fl(b, "direct_read_Bps", "page union, best queue depth")
                ur = (lim.get("union_read") or {}).get(f"{tp}/{rank}")
                second = (b / ur["Bps"], "page union read page-exact") if b and ur else None
        cells = [f"{me:.2f}" if me else "n/a",
                 f"{best[0]:.2f} ({best[1]})" if best[0] else "n/a",
                 f"{me / best[0]:.2f}" if me and best[0] else "n/a"]
        for f in (floor, second):
            cells += [f"{f[0]:.2f} ({f[1]})" if f else "n/a", f"{f[0] / me:.2f}" if f and me else "n/a"]
        print(f"| {mode} tp {tp} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
