"""Benchmark: one rank to CPU torch tensors, three ways (warm page cache, median of N runs).

1. ``safeshard load --rank R --json`` (the Rust CLI; its ``seconds`` is the load itself).
2. ``safeshard.plan(...).load(R).torch()`` from Python (wall time of load + views; the
   plan is made once outside the timing, as the CLI's ``seconds`` excludes planning too).
3. ``safetensors.safe_open(framework="pt")`` + ``get_slice`` for exactly the same slices
   (vLLM's rules from python/tests/vllm_slicer.py), concatenating fused parts and padding.

    python python/bench/load_bench.py [--preset llama3-8b --layers 4 --tp 4 --rank 1 --runs 5]

Prints one JSON line with medians; ``binding_overhead_pct`` is the Python call's wall time
over the Rust load inside it (``Rank.stats["seconds"]``, the same timer as the CLI's), and
``python_vs_cli_pct`` compares with the CLI in a fresh process (which also pays fresh-process
page faults).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

import safeshard

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import vllm_slicer as ref  # noqa: E402


def safetensors_load(ckpt: Path, cfg: dict, tp: int, rank: int) -> dict[str, torch.Tensor]:
    by_file: dict[str, list[str]] = {}
    idx = ckpt / "model.safetensors.index.json"
    if idx.exists():
        for name, f in json.loads(idx.read_text())["weight_map"].items():
            by_file.setdefault(f, []).append(name)
    else:
        for f in sorted(ckpt.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                by_file[f.name] = list(h.keys())
    out: dict[str, torch.Tensor] = {}
    for f, names in sorted(by_file.items()):
        with safe_open(str(ckpt / f), framework="pt") as h:
            for name in names:
                sl = h.get_slice(name)
                shape = list(sl.get_shape())
                held = [s for r, s in ref.expected(cfg, tp, 1, 1, 1, name, shape) if r == rank]
                if not held:
                    continue
                s = held[0]
                if s is None:
                    # safe_open hands out views of its file mapping; clone so the bytes are
                    # really read and held, as in the other two paths.
                    out[name] = sl[:].clone()
                    continue
                dim, parts = s
                pieces = []
                for p in parts:
                    if p[0] == "take":
                        idx = [slice(None)] * len(shape)
                        idx[dim] = slice(p[1], p[1] + p[2])
                        pieces.append(sl[tuple(idx)])
                    else:
                        z = list(shape)
                        z[dim] = p[1]
                        pieces.append(torch.zeros(z, dtype=pieces[0].dtype if pieces else torch.bfloat16))
                out[name] = pieces[0].clone() if len(pieces) == 1 else torch.cat(pieces, dim)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tp", type=int, default=4)
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default=None, help="reuse/keep the checkpoint here")
    a = ap.parse_args()

    tmp = None
    if a.dir:
        ckpt = Path(a.dir)
    else:
        tmp = tempfile.TemporaryDirectory()
        ckpt = Path(tmp.name) / a.preset
    if not (ckpt / "config.json").exists():
        safeshard.synth(ckpt, a.preset, layers=a.layers)
    cfg = json.loads((ckpt / "config.json").read_text())
    plan = safeshard.plan(ckpt, tp=a.tp)
    held = plan.rank(a.rank).bytes

    def cli() -> float:
        out = subprocess.run(
            [sys.executable, "-m", "safeshard", "load", str(ckpt), "--tp", str(a.tp),
             "--rank", str(a.rank), "--json"],
            capture_output=True, text=True, check=True,
        ).stdout
        return float(json.loads(out)["seconds"])

    inner: list[float] = []

    def py() -> float:
        t = time.perf_counter()
        rank = plan.load(a.rank, progress=False)
        state = rank.torch()
        dt = time.perf_counter() - t
        inner.append(rank.stats["seconds"])  # the Rust load inside that call
        assert len(state) == len(plan.rank(a.rank).tensors)
        return dt

    def st() -> float:
        t = time.perf_counter()
        state = safetensors_load(ckpt, cfg, a.tp, a.rank)
        dt = time.perf_counter() - t
        assert len(state) == len(plan.rank(a.rank).tensors)
        return dt

    # Same bytes from both Python paths (and warms the page cache).
    ours = plan.load(a.rank).torch()
    theirs = safetensors_load(ckpt, cfg, a.tp, a.rank)
    assert all(torch.equal(ours[k].view(torch.uint8), theirs[k].contiguous().view(torch.uint8)) for k in ours)
    del ours, theirs

    res: dict[str, list[float]] = {"cli": [], "python": [], "safetensors": []}
    for _ in range(a.runs):  # interleaved, so drift hits all three alike
        res["cli"].append(cli())
        res["python"].append(py())
        res["safetensors"].append(st())
    res["python_rust_part"] = inner[-a.runs :]
    med = {k: statistics.median(v) for k, v in res.items()}
    print(json.dumps({
        "preset": a.preset, "layers": a.layers, "tp": a.tp, "rank": a.rank, "runs": a.runs,
        "bytes": held,
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "gb_per_s": {k: round(held / v / 1e9, 2) for k, v in med.items()},
        # Python wall time (load + torch views) over the Rust load inside the same call.
        "binding_overhead_pct": round((med["python"] / med["python_rust_part"] - 1) * 100, 1),
        "python_vs_cli_pct": round((med["python"] / med["cli"] - 1) * 100, 1),
        "safetensors_vs_python": round(med["safetensors"] / med["python"], 2),
    }))
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
