"""One rank of a whole-node load job, started by bench/job.py under torchrun or mpirun.

    torchrun --standalone --nproc-per-node W bench/job_rank.py LOADER CKPT
    mpirun -n W -x MASTER_ADDR=127.0.0.1 -x MASTER_PORT=P python bench/job_rank.py LOADER CKPT
    mpirun -n W python bench/job_rank.py --wrap safeshard load CKPT --tp W --share M --json --digest

Python loaders (the job is tp = W, or tp = JOB_TP with dp = W / tp; vLLM's Llama rules, every rank's bytes digested in
safeshard's arena layout by bench/peers.py's `digest`):

- `ss-none`, `ss-broadcast`, `ss-read-once`: `safeshard.load(CKPT, tp=W, share=...)` over the
  gloo world group; `ss-default`: the same without `share=` (the front's own choice);
- `st`: every rank runs `safetensors` `get_slice` on its own (vLLM's default path), peers.py's
  loop;
- `fst-dist`: fastsafetensors' distributed loader: `SafeTensorsFileLoader` on the gloo group
  (CPU, no GDS), files dealt to ranks round-robin, `get_sharded` for split tensors (a
  scatter) and `get_tensor` for replicated ones (a broadcast);
- `runai`: Run:ai's streamer in every rank on its own (whole files, slice kept);
- `runai-dist`: the same with `RUNAI_STREAMER_DIST=1` (the streamer splits the reading between
  the ranks of the initialized torch.distributed group and shares it over gloo).

Every rank initializes gloo and imports its loader first, then waits at a barrier; the time
is from the barrier to the moment the rank holds all its tensors (wall clock; one node, one
clock). Rank 0 gathers every rank's (start, end, /proc/self/io read_bytes, peak RSS, digest)
and prints them as one JSON line.

`--wrap CMD...` runs CMD (the safeshard CLI under mpirun) as a child and prints its stdout
with this process's `/proc/self/io` read_bytes delta (which includes the waited-for child)
and the child's peak RSS added to every JSON line.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402  (loaders, slicing rules and digest are shared with peers.py)

SS_MODES = {"ss-none": "none", "ss-broadcast": "broadcast", "ss-read-once": "read-once",
            "ss-default": None}

PREIMPORT = {
    "st": ["safetensors"],
    "fst-dist": ["fastsafetensors"],
    "runai": ["runai_model_streamer"],
    "runai-dist": ["runai_model_streamer"],
}


SAID: list[str] = []  # what safeshard logged about the share mode it chose


def load_safeshard(root: str, tp: int, world: int, share: str | None) -> dict:
    import logging

    import safeshard

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            SAID.append(record.getMessage())

    log = logging.getLogger("safeshard")
    log.setLevel(logging.INFO)
    log.addHandler(Keep())
    kw = {} if share is None else {"share": share}
    return safeshard.load(root, tp=tp, dp=world // tp, progress=False, **kw)


def load_fst_dist(root: str, tp: int, tp_rank: int) -> dict:
    """fastsafetensors' distributed loader: files dealt to the world's ranks; with tp = world
    `get_sharded` scatters each split tensor, with DP replicas (tp < world) every rank gets
    whole tensors by broadcast and keeps its slice."""
    import torch.distributed as dist
    from fastsafetensors import SafeTensorsFileLoader

    world = dist.get_world_size()

    loader = SafeTensorsFileLoader(dist.group.WORLD, "cpu", nogds=True)
    files = [os.path.join(root, f) for f in peers.files_of(root)]
    loader.add_filenames({r: files[r::world] for r in range(world)})
    fb = loader.copy_files_to_device()
    out = {}
    try:
        for _, name, e in peers.plan_order(root):
            cut = peers.split(name, e["shape"], tp, tp_rank)
            if cut is None:
                t = fb.get_tensor(name)
            elif tp == world:
                t = fb.get_sharded(name, cut[0])
            else:
                t = peers.narrow(fb.get_tensor(name), name, tp, tp_rank)
            out[name] = t.contiguous() if not t.is_contiguous() else t.clone()
    finally:
        fb.close()
        loader.close()
    return out


def load_runai_dist(root: str, tp: int, tp_rank: int) -> dict:
    """Run:ai's streamer in distributed mode (the ranks of the gloo world split the reading),
    each rank keeping its slice as peers.load_runai does."""
    from runai_model_streamer import SafetensorsStreamer

    out = {}
    paths = [os.path.join(root, f) for f in peers.files_of(root)]
    with SafetensorsStreamer() as s:
        s.stream_files(paths, None, "cpu", True)
        for name, t in s.get_tensors():
            r = peers.narrow(t, name, tp, tp_rank)
            out[name] = r.clone() if r.data_ptr() == t.data_ptr() else r
    return out


LOADERS = {
    "st": lambda r, w, k: peers.load_st(r, w, k, "pt"),
    "fst-dist": load_fst_dist,
    "runai": peers.load_runai,
    "runai-dist": load_runai_dist,
}


def rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def init_world() -> tuple[int, int]:
    """gloo world from torchrun's variables, or Open MPI's (MASTER_ADDR/PORT passed with -x)."""
    import torch.distributed as dist

    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" in os.environ:
        os.environ["RANK"] = os.environ["OMPI_COMM_WORLD_RANK"]
        os.environ["WORLD_SIZE"] = os.environ["OMPI_COMM_WORLD_SIZE"]
        os.environ["LOCAL_RANK"] = os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def rank_main(loader: str, root: str) -> None:
    import importlib

    import torch  # noqa: F401  (imports are not loading)
    import torch.distributed as dist

    if loader == "runai-dist":
        os.environ["RUNAI_STREAMER_DIST"] = "1"
    rank, world = init_world()
    tp = int(os.environ.get("JOB_TP", world))  # the job is tp x dp, dp = world / tp
    dirs = os.environ.get("JOB_NODE_DIRS")
    if dirs:  # multi-node simulation: this rank's node reads its own copy
        d = dirs.split(",")
        root = d[rank]
        os.environ.setdefault("SAFESHARD_NODE", f"node{sorted(set(d), key=d.index).index(root)}")
    for m in PREIMPORT.get(loader, ["safeshard"]):
        importlib.import_module(m)
    order = peers.plan_order(root)
    rss0 = rss_now()
    dist.barrier()
    io0 = peers.io_read_bytes()
    t0 = time.time()
    if loader in SS_MODES:
        tensors = load_safeshard(root, tp, world, SS_MODES[loader])
    else:
        tensors = LOADERS[loader](root, tp, rank % tp)
    t1 = time.time()
    io1 = peers.io_read_bytes()
    hwm = peers.vm_hwm()
    bufs = {name: peers.torch_bytes(t) for name, t in tensors.items()}
    sha, total = peers.digest(order, bufs)
    mine = {"rank": rank, "start": t0, "end": t1, "read_bytes": io1 - io0, "maxrss": hwm,
            "rss_before": rss0, "sha256": sha, "bytes": total, "said": SAID}
    every: list = [None] * world
    dist.all_gather_object(every, mine)
    if rank == 0:
        print("JOB " + json.dumps({"loader": loader, "world": world, "ranks": every}), flush=True)
    dist.destroy_process_group()


def wrap(cmd: list[str]) -> int:
    """Runs `cmd`, then prints its JSON lines with the I/O and peak RSS of the child."""
    env = dict(os.environ)
    if env.get("JOB_ALONE"):
        env["SAFESHARD_NODE"] = f"alone-{env.get('OMPI_COMM_WORLD_RANK', os.getpid())}"
    io0 = peers.io_read_bytes()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    io1 = peers.io_read_bytes()
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    sys.stderr.write(p.stderr)
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            d = json.loads(line)
            d.update(proc_read_bytes=io1 - io0, maxrss=peak)
            line = json.dumps(d)
        print(line, flush=True)
    return p.returncode


def main() -> None:
    if sys.argv[1] == "--wrap":
        sys.exit(wrap(sys.argv[2:]))
    rank_main(sys.argv[1], sys.argv[2])


if __name__ == "__main__":
    main()
