"""``Plan.load(into={name: buffer})``: tensors written straight into caller memory (a model's
parameters) hold the checkpoint's bytes, read here through the ``safetensors`` package; the
returned rank holds only the others."""

from __future__ import annotations

import numpy as np
import pytest

import safeshard
from conftest import as_bytes, needs_torch, read_full


def test_into_arrays_hold_the_checkpoint_bytes_and_the_rank_the_rest(checkpoints):
    ckpt = checkpoints("llama-tiny")
    _, full = read_full(ckpt)
    plan = safeshard.plan(ckpt)  # tp 1: every tensor whole
    infos = plan.rank(0).tensors
    chosen = {t.name: t for i, t in enumerate(infos) if i % 2 == 0}
    # One backing array, each buffer at an odd offset, guard bytes between them.
    backing = np.full(sum(t.nbytes + 3 for t in chosen.values()) + 1, 0xAB, dtype=np.uint8)
    into, at = {}, 1
    for name, t in chosen.items():
        into[name] = backing[at : at + t.nbytes]
        at += t.nbytes + 3
    rank = plan.load(0, into=into)
    rest = rank.numpy()
    assert set(rest) == {t.name for t in infos} - set(chosen)
    for name, t in chosen.items():
        dtype, want = full[name]
        got = as_bytes(into[name], t.shape, dtype)
        real = tuple(slice(0, k) for k in want.shape[:-1])
        assert np.array_equal(got[real], want), name
    for name, got in rest.items():
        dtype, want = full[name]
        got = as_bytes(got, got.shape, dtype)
        real = tuple(slice(0, k) for k in want.shape[:-1])
        assert np.array_equal(got[real], want), name
    at = 1
    for t in chosen.values():
        at += t.nbytes
        assert (backing[at : at + 3] == 0xAB).all()
        at += 3
    assert backing[0] == 0xAB


def test_into_a_sharded_rank_matches_the_arena_load(checkpoints):
    plan = safeshard.plan(checkpoints("llama-tiny"), tp=2, pp=2)
    for r in range(plan.world_size):
        want = plan.load(r).numpy()
        into = {t.name: np.empty(t.nbytes, dtype=np.uint8) for t in plan.rank(r).tensors}
        rank = plan.load(r, into=into, io="pread")
        assert rank.numpy() == {}
        for name, buf in into.items():
            assert buf.tobytes() == want[name].tobytes(), (r, name)


def test_into_is_checked_before_anything_is_written(checkpoints):
    plan = safeshard.plan(checkpoints("llama-tiny"), tp=2)
    t = plan.rank(1).tensors[0]

    def refused(match: str, **kw) -> None:
        with pytest.raises(safeshard.SafeshardError, match=match) as e:
            plan.load(1, **kw)
        assert e.value.exit_code == 2

    refused("holds no tensor", into={"nope": np.empty(8, dtype=np.uint8)})
    refused(f"has {t.nbytes}", into={t.name: np.empty(t.nbytes - 1, dtype=np.uint8)})
    refused("read-only", into={t.name: bytes(t.nbytes)})
    refused("expected a mapping", into=[(t.name, np.empty(t.nbytes, dtype=np.uint8))])
    refused("out and into", into={}, out=np.empty(plan.rank(1).arena_bytes, dtype=np.uint8))
    two = [u for u in plan.rank(1).tensors[:2]]
    shared = np.zeros(max(u.nbytes for u in two), dtype=np.uint8)
    refused("overlap", into={u.name: shared[: u.nbytes] for u in two})


@needs_torch
def test_into_torch_parameters_of_the_right_dtype_and_shape(checkpoints):
    import torch

    plan = safeshard.plan(checkpoints("llama-tiny"), tp=2)
    want = plan.load(0).torch()
    params = {
        n: torch.nn.Parameter(torch.empty_like(x), requires_grad=False) for n, x in want.items()
    }
    rank = plan.load(0, into={n: p.data for n, p in params.items()})
    assert rank.torch() == {}
    for n, p in params.items():
        assert torch.equal(p.view(torch.uint8), want[n].view(torch.uint8)), n
    name, x = next((n, x) for n, x in want.items() if x.dim() == 2)
    with pytest.raises(safeshard.SafeshardError, match="shape"):
        plan.load(0, into={name: torch.empty(x.shape[1], x.shape[0], dtype=x.dtype)})
    other = torch.float32 if x.dtype != torch.float32 else torch.float16
    with pytest.raises(safeshard.SafeshardError, match="tensor; the checkpoint holds"):
        plan.load(0, into={name: torch.empty(x.shape, dtype=other)})
    with pytest.raises(safeshard.SafeshardError, match="not contiguous"):
        plan.load(0, into={name: torch.empty(x.shape[1], x.shape[0], dtype=x.dtype).t()})
