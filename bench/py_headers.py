#!/usr/bin/env python3
"""Baseline for `safeshard inspect`: read every header of an indexed checkpoint with plain
json.loads (no validation) and sum tensor bytes. usage: python3 bench/py_headers.py DIR"""
import json
import os
import struct
import sys

d = sys.argv[1]
index = json.load(open(os.path.join(d, "model.safetensors.index.json")))
n = total = 0
for f in sorted(set(index["weight_map"].values())):
    with open(os.path.join(d, f), "rb") as fh:
        (hl,) = struct.unpack("<Q", fh.read(8))
        h = json.loads(fh.read(hl))
    for k, v in h.items():
        if k != "__metadata__":
            b, e = v["data_offsets"]
            n += 1
            total += e - b
print(n, total)
