#!/usr/bin/env python3
"""Whole-node benchmark: W ranks of a tp = W job launched together, every loader side by side.

    python3 bench/job.py CKPT [--world 2,4,8] [--reps 3] [--modes cold,warm]
        [--loaders mpirun:cli-none,mpirun:cli-broadcast,mpirun:cli-read-once,mpirun:cli-default,
                   torchrun:ss-none,torchrun:ss-broadcast,torchrun:ss-read-once,torchrun:ss-default,
                   torchrun:st,torchrun:fst-dist,torchrun:runai,torchrun:runai-dist]
        [--python /work/venvs/bench/bin/python] [--safeshard target/release/safeshard]
        [--dp 1] [--nodes 2 --node-dirs DIR_A,DIR_B] [--cgroup /sys/fs/cgroup/blkio/NAME]
        [--out results.json] [--summarize LOG]

The job is tp = W (or tp = W/dp with `--dp` replicas). A loader is LAUNCHER:NAME. `cli-*` is the safeshard CLI under mpirun (`safeshard load CKPT
--tp W --share MODE --json --digest`; `cli-default` without `--share`, `cli-read-once-per-node`
adds `--per-node`), each rank wrapped by bench/job_rank.py --wrap to read its /proc/self/io;
every other name is a Python rank of bench/job_rank.py (see its docstring: safeshard.load with
each share mode, per-rank `safetensors` get_slice, fastsafetensors' distributed loader, Run:ai
per rank and distributed), under torchrun or mpirun (gloo world group either way).

Per run (repetition outermost, then mode, W and loader, loaders interleaved):
- cold: `sync` + `posix_fadvise(DONTNEED)` on every file, refused unless `fincore` shows < 1 %
  resident; warm: every file read once first;
- time: Python ranks, from a barrier after imports and gloo set-up to the moment the last
  rank holds its tensors (max end - min start, one clock); CLI ranks, the largest `seconds`
  over ranks (the load starts with a collective agreement, after MPI start and planning);
  and the launcher's wall time;
- storage bytes: the block device's sectors read (`/sys/dev/block/M:m/stat`) around the run
  (cold rows; other processes on the machine add to it) and the sum of the ranks'
  `/proc/self/io` read_bytes;
- correctness: every rank's SHA-256 (safeshard's arena layout) equals the one
  `safeshard load CKPT --tp W --all-ranks --json --digest` prints for that rank.

Floors, measured in the same run (bench/floors.py): cold = the union of the job's bytes (for
a tp-only job every tensor is held, so the checkpoint's tensor bytes) read with O_DIRECT at
the queue depth that maximizes it; warm = the job's held bytes (sum over ranks, from
`safeshard plan --json`) written into fresh pages by one thread per core. The queue depth is
chosen once at the start; then every repetition measures the floors again in the same
interleaved loop as the loads (rows `floor:disk`, `floor:fresh` and, warm, `floor:cache`:
the job's bytes copied out of the page cache into fresh pages on all cores, what a one-copy
load pays at least; after the same cache drop or warm-up), so a floor shares the machine's state with the loads it bounds: this VM's
disk rate moves by 2x within a session.

Multi-node simulation (bench/multinode-setup.sh): `--nodes N --node-dirs A,B,...` gives each
"node" W/N consecutive ranks reading its own copy of the checkpoint (a separate page cache)
with `SAFESHARD_NODE=nodeK`, and `--cgroup` puts the launcher in a blkio cgroup that throttles
the disk (the shared storage's rate).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import floors  # noqa: E402
import peers  # noqa: E402

DEFAULT_LOADERS = ("mpirun:cli-none,mpirun:cli-broadcast,mpirun:cli-read-once,mpirun:cli-default,"
                   "torchrun:ss-none,torchrun:ss-broadcast,torchrun:ss-read-once,"
                   "torchrun:ss-default,torchrun:st,torchrun:fst-dist,torchrun:runai,"
                   "torchrun:runai-dist")
CLI_SHARE = {"cli-none": ["--share", "none"], "cli-broadcast": ["--share", "broadcast"],
             "cli-read-once": ["--share", "read-once"],
             "cli-read-once-per-node": ["--share", "read-once", "--per-node"],
             "cli-default": [],
             # cli-none with every rank named its own node: exact pages, no node spans (the
             # engine's behaviour before NodeSpans, for a side-by-side comparison).
             "cli-none-alone": ["--share", "none"]}
MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def block_stat_path(path: str) -> str:
    st = os.stat(path)
    return f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat"


def sectors_read(stat_path: str) -> int:
    with open(stat_path) as f:
        return int(f.read().split()[2]) * 512


def node_dirs(args, world: int) -> list[str]:
    """The checkpoint directory of every rank (its node's copy in a multi-node simulation)."""
    if args.nodes <= 1:
        return [args.ckpt] * world
    dirs = args.node_dirs.split(",")
    per = world // args.nodes
    return [dirs[min(r // per, len(dirs) - 1)] for r in range(world)]


def topo(args, world: int) -> list[str]:
    """The job's topology flags: tp = W / dp."""
    return ["--tp", str(world // args.dp), "--dp", str(args.dp)]


def command(args, launcher: str, name: str, world: int) -> tuple[list[str], dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               JOB_TP=str(world // args.dp))
    rank_py = os.path.join(HERE, "job_rank.py")
    dirs = node_dirs(args, world)
    if launcher == "torchrun":
        if args.nodes > 1:
            env["JOB_NODE_DIRS"] = ",".join(dirs)
        return ([args.python, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc-per-node={world}", rank_py, name, args.ckpt], env)
    # mpirun: one app context per node (its own SAFESHARD_NODE and checkpoint copy).
    env.update(OMPI_MCA_rmaps_base_oversubscribe="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    cmd = list(MPIRUN)
    nodes = max(args.nodes, 1)
    per = world // nodes
    for k in range(nodes):
        ckpt = dirs[k * per]
        if name in CLI_SHARE:
            argv = [args.python, "-S", rank_py, "--wrap", args.safeshard, "load", ckpt,
                    *topo(args, world), "--json", "--digest", *CLI_SHARE[name]]
        else:
            argv = [args.python, rank_py, name, ckpt]
        if k:
            cmd.append(":")
        node = [f"SAFESHARD_NODE=node{k}"] if nodes > 1 else []
        if name.endswith("-alone"):
            node.append("JOB_ALONE=1")
        cmd += ["-n", str(per), "env", *node, *argv]
    if args.nodes > 1:
        env["JOB_NODE_DIRS"] = ",".join(dirs)
    return cmd, env


def into_cgroup(path: str | None):
    if not path:
        return None

    def enter() -> None:
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    return enter


def json_objects(text):
    """Every top-level JSON object in `text`: mpirun forwards the ranks' stdout and can put
    two ranks' lines on one line."""
    dec, out, i = json.JSONDecoder(), [], 0
    while (j := text.find("{", i)) >= 0:
        try:
            obj, i = dec.raw_decode(text, j)
        except json.JSONDecodeError:
            i = j + 1
            continue
        if isinstance(obj, dict) and "rank" in obj:
            out.append(obj)
    return out


def run_job(args, launcher: str, name: str, world: int, stat_path: str) -> dict:
    cmd, env = command(args, launcher, name, world)
    sec0, io0 = sectors_read(stat_path), peers.io_read_bytes()
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout,
                           preexec_fn=into_cgroup(args.cgroup))
    except subprocess.TimeoutExpired:
        return {"error": [f"timed out after {args.timeout} s"]}
    wall = time.perf_counter() - t0
    sec1, io1 = sectors_read(stat_path), peers.io_read_bytes()
    out = {"wall": wall, "device_read_bytes": sec1 - sec0, "job_read_bytes": io1 - io0}
    if p.returncode != 0:
        tail = [l for l in p.stderr.splitlines() if l.strip()][-3:]
        out["error"] = tail or [f"exit {p.returncode}"]
        return out
    if name in CLI_SHARE:
        ranks = sorted(json_objects(p.stdout), key=lambda d: d["rank"])
        out.update(seconds=max(d["seconds"] for d in ranks),
                   rank_read_bytes=sum(d["proc_read_bytes"] for d in ranks),
                   plan_read_bytes=sum(d["read_bytes"] for d in ranks),
                   share=ranks[0].get("share"), share_default=ranks[0].get("share_default"),
                   maxrss=max(d["maxrss"] for d in ranks),
                   sha256=[d["sha256"] for d in ranks])
    else:
        job = next(json.loads(l[4:]) for l in p.stdout.splitlines() if l.startswith("JOB "))
        ranks = sorted(job["ranks"], key=lambda d: d["rank"])
        out.update(seconds=max(d["end"] for d in ranks) - min(d["start"] for d in ranks),
                   rank_read_bytes=sum(d["read_bytes"] for d in ranks),
                   maxrss=max(d["maxrss"] for d in ranks),
                   said=ranks[0].get("said"), sha256=[d["sha256"] for d in ranks])
    return out


def reference(args, world: int) -> list[str]:
    """Every rank's digest by `safeshard load --all-ranks --digest` (threads, no launcher)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "PMIX"))}
    p = subprocess.run([args.safeshard, "load", args.ckpt, *topo(args, world), "--all-ranks",
                        "--json", "--digest"], capture_output=True, text=True, check=True, env=env)
    lines = sorted((json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")),
                   key=lambda d: d["rank"])
    return [d["sha256"] for d in lines]


def job_bytes(args, world: int) -> int:
    p = subprocess.run([args.safeshard, "plan", args.ckpt, *topo(args, world), "--json"],
                       capture_output=True, text=True, check=True)
    return sum(r["bytes"] for r in json.loads(p.stdout)["ranks"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt", nargs="?")
    ap.add_argument("--world", default="2,4,8")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--modes", default="cold,warm")
    ap.add_argument("--loaders", default=DEFAULT_LOADERS)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--safeshard", default="target/release/safeshard")
    ap.add_argument("--dp", type=int, default=1, help="DP replicas: the job is tp = W/dp x dp")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--node-dirs")
    ap.add_argument("--cgroup")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--pause", type=float, default=1.0)
    ap.add_argument("--no-floors", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--summarize", metavar="LOG")
    args = ap.parse_args()
    if args.summarize:
        runs, fl = [], None
        for l in open(args.summarize):
            if l.startswith("{"):
                runs.append(json.loads(l))
            elif l.startswith("# floors json "):
                fl = json.loads(l[len("# floors json "):])
        summarize(runs, fl)
        return
    args.safeshard = os.path.abspath(args.safeshard)
    loaders = [tuple(x.split(":", 1)) for x in args.loaders.split(",")]
    worlds = [int(w) for w in args.world.split(",")]
    dirs = sorted(set(node_dirs(args, max(worlds))) | {args.ckpt})
    paths = [os.path.join(d, f) for d in dirs for f in peers.files_of(d)]
    stat_path = block_stat_path(paths[0])
    print(f"# load average at start: {open('/proc/loadavg').read().strip()}", flush=True)
    print(f"# block device counters: {stat_path}", flush=True)
    ckpt_paths = [os.path.join(args.ckpt, f) for f in peers.files_of(args.ckpt)]
    union = floors.tensor_bytes(ckpt_paths)
    fl = {"union_bytes": union, "job_bytes": {w: job_bytes(args, w) for w in worlds}}
    if not args.no_floors:
        peers.drop_cache(ckpt_paths)
        fl["disk"] = floors.disk_floor(ckpt_paths, union)
        fl["fresh_pages"] = floors.fresh_pages_floor(union)
    print(f"# floors json {json.dumps(fl)}", flush=True)
    refs = {w: reference(args, w) for w in worlds}
    results = []
    for rep in range(args.reps):
        for mode in args.modes.split(","):
            for w in worlds:
                for launcher, name in loaders + ([("floor", f) for f in FLOOR[mode]] if "disk" in fl else []):
                    if mode == "cold":
                        peers.drop_cache(paths)
                        frac = peers.resident_fraction(paths)
                        if frac > 0.01:
                            print(f"# cold check failed: {frac:.1%} resident", flush=True)
                            continue
                    else:
                        peers.warm_cache(paths)
                    time.sleep(args.pause)
                    load = open("/proc/loadavg").read().split()[0]
                    r = (run_floor(fl, name, w, ckpt_paths) if launcher == "floor"
                         else run_job(args, launcher, name, w, stat_path))
                    if "sha256" in r:
                        r["digest_ok"] = r.pop("sha256") == refs[w]
                    r.update(mode=mode, world=w, rep=rep, launcher=launcher, loader=name,
                             load=load)
                    results.append(r)
                    print(json.dumps(r), flush=True)
    print(f"# load average at end: {open('/proc/loadavg').read().strip()}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"floors": fl, "runs": results}, f, indent=1)
    summarize(results, fl)


FLOOR = {"cold": ("disk",), "warm": ("fresh", "cache")}


def run_floor(fl: dict, name: str, w: int, ckpt_paths: list[str]) -> dict:
    """One repetition of a floor, in this process: `disk`, the union read with O_DIRECT at
    the best queue depth of the start's sweep (cold); `fresh`, the job's held bytes written
    into fresh pages on all cores; `cache`, that many bytes copied out of the page cache
    into fresh pages on all cores (warm: what a one-copy load pays at least)."""
    if name == "disk":
        union = fl["union_bytes"]
        got, secs = floors._direct_read(ckpt_paths, union, fl["disk"]["best_qd"])
        return {"seconds": secs * union / got if got else float("nan"), "digest_ok": True}
    jb = fl["job_bytes"].get(str(w), fl["job_bytes"].get(w))
    if name == "fresh":
        return {"seconds": floors.fresh_pages_floor(jb)["seconds"], "digest_ok": True}
    return {"seconds": floors.cache_copy_floor(ckpt_paths, jb)["seconds"], "digest_ok": True}


def is_safeshard(name: str) -> bool:
    return name.startswith(("cli-", "ss-"))


def summarize(results: list[dict], fl: dict | None) -> None:
    cols = []
    for r in results:
        c = f"{r['launcher']}:{r['loader']}"
        if c not in cols:
            cols.append(c)
    keys = sorted({(r["mode"], r["world"]) for r in results}, key=lambda k: (k[0] != "cold", k[1]))

    def runs(mode, w, col):
        return [r for r in results if r["mode"] == mode and r["world"] == w
                and f"{r['launcher']}:{r['loader']}" == col]

    def med(rs, key):
        v = [r[key] for r in rs if r.get(key) is not None]
        return statistics.median(v) if v else None

    print("\nseconds: median (min-max) from the start barrier to the last rank's tensors; "
          "GB: storage bytes read (block device, cold rows) / sum of the ranks' read_bytes")
    print("\n| mode W | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for mode, w in keys:
        cells = []
        for c in cols:
            rs = runs(mode, w, c)
            ok = [r for r in rs if "seconds" in r]
            if not ok:
                err = next((r.get("error") for r in rs), None)
                cells.append(f"n/a ({err[-1][:60] if err else 'not run'})")
                continue
            s = sorted(r["seconds"] for r in ok)
            bad = "" if all(r.get("digest_ok") for r in ok) else " DIGEST MISMATCH"
            dev = med(ok, "device_read_bytes") if mode == "cold" else None
            rb = med(ok, "rank_read_bytes")
            gb = f"{dev / 1e9:.2f}/" if dev is not None else ""
            rgb = f"{gb}{rb / 1e9:.2f} GB" if rb is not None else ""
            cells.append(f"{statistics.median(s):.2f} ({s[0]:.2f}-{s[-1]:.2f}) {rgb}{bad}")
        print(f"| {mode} {w} | " + " | ".join(cells) + " |")
    print("\n| mode W | best safeshard s | best peer s | ratio | floor s | floor / safeshard "
          "| page cache -> fresh s | it / safeshard | storage / union |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, w in keys:
        best = {}
        for side in (True, False):
            cand = [(med(runs(mode, w, c), "seconds"), c) for c in cols
                    if not c.startswith("floor:") and is_safeshard(c.split(":", 1)[1]) == side]
            cand = [x for x in cand if x[0] is not None]
            best[side] = min(cand) if cand else (None, None)
        me, peer = best[True], best[False]
        floor = med(runs(mode, w, f"floor:{FLOOR[mode][0]}"), "seconds")
        cache = med(runs(mode, w, "floor:cache"), "seconds")
        if floor is None and fl and mode == "cold" and fl.get("disk"):
            floor = fl["disk"]["seconds"]
        elif floor is None and fl and mode == "warm" and fl.get("fresh_pages"):
            jb = fl["job_bytes"].get(str(w), fl["job_bytes"].get(w))
            floor = jb / fl["fresh_pages"]["rate_Bps"]
        storage = "n/a"
        if mode == "cold" and me[1] and fl:
            dev = med(runs(mode, w, me[1]), "device_read_bytes")
            storage = f"{dev / fl['union_bytes']:.2f}" if dev is not None else "n/a"
        cells = [f"{me[0]:.2f} ({me[1]})" if me[0] else "n/a",
                 f"{peer[0]:.2f} ({peer[1]})" if peer[0] else "n/a",
                 f"{me[0] / peer[0]:.2f}" if me[0] and peer[0] else "n/a",
                 f"{floor:.2f}" if floor else "n/a",
                 f"{floor / me[0]:.2f}" if floor and me[0] else "n/a",
                 f"{cache:.2f}" if cache else "n/a",
                 f"{cache / me[0]:.2f}" if cache and me[0] else "n/a", storage]
        print(f"| {mode} {w} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
