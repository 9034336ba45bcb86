"""``Plan.load(out=...)``: a rank loaded into the caller's memory (pinned host memory for a
device copy, or a buffer reused across loads) holds the same bytes as the checkpoint, read
here through the ``safetensors`` package."""

from __future__ import annotations

import json

import numpy as np
import pytest

import safeshard
from conftest import as_bytes, needs_torch, read_full, run_cli


def test_out_array_holds_the_tensors_and_nothing_past_the_arena(checkpoints):
    ckpt = checkpoints("llama-tiny")
    _, full = read_full(ckpt)
    plan = safeshard.plan(ckpt)  # tp 1: every tensor whole
    need = plan.rank(0).arena_bytes
    out = np.full(need + 4096, 0xAB, dtype=np.uint8)
    for _ in range(2):  # and again into the now-used buffer
        rank = plan.load(0, out=out)
        arrays = rank.numpy()
        # Every tensor but the rotary tables the spec drops.
        assert set(arrays) == {n for n in full if not n.endswith("inv_freq")}
        for name, got in arrays.items():
            dtype, want = full[name]
            assert np.shares_memory(got, out), name
            # Vocab-padded tensors hold the checkpoint's rows, then zero rows.
            got = as_bytes(got, got.shape, dtype).copy()
            real = tuple(slice(0, k) for k in want.shape[:-1])
            assert np.array_equal(got[real], want), name
            got[real] = 0
            assert not got.any(), name
        assert (out[need:] == 0xAB).all()
    # The gaps between tensors are zeroed, as in a fresh arena: the CLI's digest matches.
    cli = json.loads(run_cli("load", str(ckpt), "--rank", "0", "--json", "--digest").stdout)
    assert rank.digest() == cli["sha256"]


def test_out_must_be_large_writable_and_contiguous(checkpoints):
    plan = safeshard.plan(checkpoints("llama-tiny"), tp=2)
    need = plan.rank(1).arena_bytes
    with pytest.raises(safeshard.SafeshardError, match=f"rank 1 needs {need}") as e:
        plan.load(1, out=np.zeros(need - 1, dtype=np.uint8))
    assert e.value.exit_code == 2
    with pytest.raises(safeshard.SafeshardError, match="read-only"):
        plan.load(1, out=bytes(need))
    with pytest.raises(safeshard.SafeshardError, match="not contiguous"):
        plan.load(1, out=np.zeros(2 * need, dtype=np.uint8)[::2])
    rank = plan.load(1, out=bytearray(need))
    assert rank.digest() == plan.load(1).digest()


@needs_torch
def test_out_tensor_is_shared_with_the_views(checkpoints):
    import torch

    ckpt = checkpoints("llama-tiny")
    _, full = read_full(ckpt)
    plan = safeshard.plan(ckpt, tp=2)
    out = torch.empty(plan.rank(0).arena_bytes // 2 + 1, dtype=torch.int16)
    tensors = plan.load(0, out=out).torch()
    lo, hi = out.data_ptr(), out.data_ptr() + out.numel() * 2
    assert all(lo <= t.data_ptr() < hi for t in tensors.values() if t.numel())
    # The embedding is split on dim 0: rank 0 holds its first rows.
    name = "model.embed_tokens.weight"
    dtype, want = full[name]
    half = tensors[name].shape[0]
    assert np.array_equal(as_bytes(tensors[name].view(torch.uint8).numpy(), want[:half].shape[:-1], dtype), want[:half])
    with pytest.raises(safeshard.SafeshardError, match="not contiguous"):
        plan.load(0, out=torch.empty(4 * out.numel(), dtype=torch.int16)[::2])
