"""Physical floors of a load, measured on this machine in the same run as the loads.

    python3 bench/floors.py CKPT [--bytes N]      # prints the three floors as one JSON line

- `disk_floor(paths, nbytes)`: the disk's best read rate, `O_DIRECT` (no page cache) at the
  queue depth that maximizes it: 1 MiB requests issued by QD threads at once (each thread
  one request in flight; `os.preadv` releases the GIL), QD in 1..64 tried on a sample, then
  `nbytes` read at the best QD and timed. The cold floor of a job = the union of its bytes
  at that rate.
- `cache_copy_floor(paths, nbytes)`: the first `nbytes` of the (cached) files copied out of
  the page cache into fresh pages on all cores: what a warm one-copy load pays at least
  (it reads every byte from memory as well as writing it).
- `fresh_pages_floor(nbytes)`: `nbytes` written into fresh (never touched) anonymous pages by
  one thread per core, each filling its own fresh buffer from a small touched source
  (page faults, zeroing and the copy: what every loader that ends with the bytes in new
  memory pays). The warm floor of a job = its held bytes at that rate.

Each returns seconds for the given bytes plus what was measured (rates, best QD), so a
table can show the floor next to the loads it bounds.
"""

from __future__ import annotations

import json
import mmap
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

MiB = 1 << 20
PAGE = 4096
MADV_POPULATE_WRITE = 23  # Linux 5.14
REQUEST = 1 << 20
QUEUE_DEPTHS = (1, 4, 16, 32, 64)


def _spans(paths: list[str]) -> list[tuple[str, int]]:
    """(path, size rounded down to whole requests) of every file, in order."""
    return [(p, os.path.getsize(p) // REQUEST * REQUEST) for p in paths]


def _direct_read(paths: list[str], nbytes: int, qd: int) -> tuple[int, float]:
    """Reads the first `nbytes` of the files (in order) with O_DIRECT at queue depth `qd`;
    returns (bytes read, seconds)."""
    jobs: list[tuple[int, int]] = []  # (file index, offset)
    fds = []
    left = nbytes
    for i, (p, size) in enumerate(_spans(paths)):
        fds.append(os.open(p, os.O_RDONLY | getattr(os, "O_DIRECT", 0)))
        off = 0
        while off < size and left > 0:
            jobs.append((i, off))
            off += REQUEST
            left -= REQUEST
    lock = threading.Lock()
    cursor = [0]
    done = [0]

    def worker() -> None:
        buf = mmap.mmap(-1, REQUEST)  # page-aligned, as O_DIRECT needs
        got = 0
        while True:
            with lock:
                k = cursor[0]
                cursor[0] += 1
            if k >= len(jobs):
                break
            i, off = jobs[k]
            got += os.preadv(fds[i], [buf], off)
        with lock:
            done[0] += got

    t0 = time.perf_counter()
    with ThreadPoolExecutor(qd) as ex:
        for f in [ex.submit(worker) for _ in range(qd)]:
            f.result()
    secs = time.perf_counter() - t0
    for fd in fds:
        os.close(fd)
    return done[0], secs


def disk_floor(paths: list[str], nbytes: int, sample: int = 512 * MiB) -> dict[str, object]:
    """Seconds to read `nbytes` from the disk at its best queue depth (O_DIRECT)."""
    rates = {}
    for qd in QUEUE_DEPTHS:
        got, secs = _direct_read(paths, min(sample, nbytes), qd)
        rates[qd] = got / secs if secs > 0 else 0.0
    best = max(rates, key=lambda q: rates[q])
    got, secs = _direct_read(paths, nbytes, best)
    # A job's union can exceed what whole requests cover (file tails): scale to nbytes.
    seconds = secs * nbytes / got if got else float("nan")
    return {"seconds": seconds, "bytes": nbytes, "best_qd": best,
            "rate_Bps": nbytes / seconds if seconds else None,
            "sample_rates_Bps": {str(q): r for q, r in rates.items()}}


def fresh_pages_floor(nbytes: int, threads: int | None = None) -> dict[str, object]:
    """Seconds to write `nbytes` into fresh pages with one thread per core."""
    import numpy as np

    n = threads or os.cpu_count() or 1
    src = np.ones(64 * MiB, dtype=np.uint8)
    share = -(-nbytes // n)

    def fill(_: int) -> int:
        dst = np.empty(share, dtype=np.uint8)  # fresh: no page touched yet
        off = 0
        while off < share:
            k = min(len(src), share - off)
            np.copyto(dst[off:off + k], src[:k])
            off += k
        return int(dst[-1])

    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(n) as ex:
            list(ex.map(fill, range(n)))
        best = min(best, time.perf_counter() - t0)
    return {"seconds": best, "bytes": nbytes, "threads": n, "rate_Bps": nbytes / best}


def cache_copy_floor(paths: list[str], nbytes: int, threads: int | None = None,
                     chunk: int = 16 * MiB) -> dict[str, object]:
    """Seconds to copy the first `nbytes` of the files (in order; the caller has them in
    the page cache) into fresh anonymous pages, `threads` threads taking `chunk`-byte pieces
    in turn, each faulting its piece in with one `MADV_POPULATE_WRITE` and filling it with
    `preadv` (the kernel's copy out of the page cache). A warm load that ends with the bytes
    in new memory reads every byte from the page cache once and writes it once: this is the
    least it pays, where `fresh_pages_floor` (a small source that stays in the CPU's caches)
    counts only the writes. Best of 3."""
    import ctypes

    n = threads or os.cpu_count() or 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    jobs: list[tuple[int, int, int, int]] = []  # (file index, file offset, dst offset, bytes)
    dst_off = 0
    for i, p in enumerate(paths):
        size = os.path.getsize(p)
        off = 0
        while off < size and dst_off < nbytes:
            k = min(chunk, size - off, nbytes - dst_off)
            jobs.append((i, off, dst_off, k))
            off += k
            dst_off += k
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    best = float("inf")
    try:
        for _ in range(3):
            dst = mmap.mmap(-1, max(dst_off, 1))
            view = memoryview(dst)
            base = ctypes.addressof((ctypes.c_char * len(dst)).from_buffer(dst))
            todo = iter(jobs)

            def worker() -> None:
                for i, off, d, m in todo:  # next() on a shared iterator is atomic under the GIL
                    a = (base + d) // PAGE * PAGE
                    libc.madvise(a, base + d + m - a, MADV_POPULATE_WRITE)
                    os.preadv(fds[i], [view[d:d + m]], off)

            t0 = time.perf_counter()
            with ThreadPoolExecutor(n) as ex:
                for f in [ex.submit(worker) for _ in range(n)]:
                    f.result()
            best = min(best, time.perf_counter() - t0)
            view.release()
            try:
                dst.close()
            except BufferError:
                pass  # an export outlives the loop; the mapping goes with the process
    finally:
        for fd in fds:
            os.close(fd)
    return {"seconds": best, "bytes": dst_off, "threads": n, "rate_Bps": dst_off / best}


def tensor_bytes(paths: list[str]) -> int:
    """Bytes of tensor data in safetensors files (file sizes less headers)."""
    import struct

    total = 0
    for p in paths:
        with open(p, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
        total += os.path.getsize(p) - 8 - n
    return total


def main() -> None:
    ckpt = sys.argv[1]
    paths = sorted(os.path.join(ckpt, f) for f in os.listdir(ckpt) if f.endswith(".safetensors"))
    nbytes = int(sys.argv[sys.argv.index("--bytes") + 1]) if "--bytes" in sys.argv else tensor_bytes(paths)
    disk = disk_floor(paths, nbytes)
    fresh = fresh_pages_floor(nbytes)
    for p in paths:  # cache the bytes the page-cache floor copies
        with open(p, "rb") as f:
            while f.read(64 * MiB):
                pass
    print(json.dumps({"disk": disk, "fresh_pages": fresh,
                      "cache_copy": cache_copy_floor(paths, nbytes)}))


if __name__ == "__main__":
    main()
