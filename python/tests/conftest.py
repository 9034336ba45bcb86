"""Shared fixtures: tiny synthetic checkpoints (written once per session) and a reader of
full tensors through the ``safetensors`` package, independent of safeshard."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors

import safeshard

HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")

# Bytes per element of the byte-sized safetensors dtypes.
ESIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
    "C64": 8, "F64": 8, "I64": 8, "U64": 8,
}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("ckpt")
    made: dict[str, Path] = {}

    def get(preset: str) -> Path:
        if preset not in made:
            d = root / preset
            safeshard.synth(d, preset)
            made[preset] = d
        return made[preset]

    return get


def read_full(ckpt: Path) -> tuple[dict[str, Any], dict[str, tuple[str, np.ndarray]]]:
    """config.json and every tensor as (dtype, uint8 array of shape (*shape, itemsize)),
    parsed by the safetensors package (its Rust reader), not by safeshard."""
    cfg = json.loads((ckpt / "config.json").read_text())
    out: dict[str, tuple[str, np.ndarray]] = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        for name, v in safetensors.deserialize(f.read_bytes()):
            es = ESIZE[v["dtype"]]
            raw = np.frombuffer(bytes(v["data"]), dtype=np.uint8)
            out[name] = (v["dtype"], raw.reshape(*v["shape"], es))
    return cfg, out


def as_bytes(a: np.ndarray, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """A loaded array's bytes, shaped (*shape, itemsize) like :func:`read_full`."""
    return np.ascontiguousarray(a).view(np.uint8).reshape(*shape, ESIZE[dtype])


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The `safeshard` command line of the installed package."""
    return subprocess.run(
        [sys.executable, "-m", "safeshard", *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=300,
        env={**os.environ, "SAFESHARD_LOG": "warn"},
    )
