#!/usr/bin/env python3
"""The reference loop vLLM-style loaders use, for one TP rank of a Llama checkpoint.

    python3 bench/python_ref.py CHECKPOINT_DIR TP RANK [REPS]

For every tensor: safe_open(f, framework="np").get_slice(name)[rows or :, cols], with vLLM's
Llama rules (q/k/v/gate/up/embed/lm_head split on dim 0, o/down on dim 1, norms whole).
Prints `median_s SECONDS` and `bytes N` (bytes held by the rank).
"""
import json
import os
import statistics
import sys
import time

from safetensors import safe_open

DIM0 = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "embed_tokens", "lm_head")
DIM1 = ("o_proj", "down_proj")


def load_rank(root, files, tp, rank):
    held = 0
    out = {}
    for fname, names in files.items():
        with safe_open(os.path.join(root, fname), framework="np") as f:
            for name in names:
                s = f.get_slice(name)
                shape = s.get_shape()
                if any(p in name for p in DIM0):
                    n = shape[0] // tp
                    t = s[rank * n:(rank + 1) * n]
                elif any(p in name for p in DIM1):
                    n = shape[1] // tp
                    t = s[:, rank * n:(rank + 1) * n]
                else:
                    t = s[:]
                out[name] = t
                held += t.nbytes
    return held, out


def main():
    root, tp, rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    reps = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    with open(os.path.join(root, "model.safetensors.index.json")) as fh:
        wm = json.load(fh)["weight_map"]
    files = {}
    for name, fname in wm.items():
        files.setdefault(fname, []).append(name)
    times = []
    held = 0
    for _ in range(reps):
        t = time.perf_counter()
        held, out = load_rank(root, files, tp, rank)
        times.append(time.perf_counter() - t)
        del out
    print(f"median_s {statistics.median(times):.6f}")
    print(f"bytes {held}")


if __name__ == "__main__":
    main()
