"""torch specifics on the CPU: one-call load, views of one allocation, devices."""

from __future__ import annotations

import pytest

import safeshard
from conftest import needs_torch

pytestmark = needs_torch


def test_load_one_call_equals_numpy(checkpoints, monkeypatch):
    import torch

    ckpt = checkpoints("phi3-tiny")
    monkeypatch.setenv("RANK", "1")
    state = safeshard.load(ckpt, tp=2)
    arrays = safeshard.plan(ckpt, tp=2).load(1).numpy()
    assert list(state) == list(arrays)
    for name, t in state.items():
        assert t.device.type == "cpu"
        assert t.contiguous().view(torch.uint8).numpy().tobytes() == arrays[name].tobytes()


def test_tensors_share_one_base(checkpoints):
    rank = safeshard.plan(checkpoints("llama-tiny"), tp=2).load(0)
    state = rank.torch()
    base = rank._arena.address
    ptrs = {t.untyped_storage().data_ptr() for t in state.values()}
    assert ptrs == {base}
    for t, info in zip(state.values(), rank):
        off = t.data_ptr() - base
        assert 0 <= off and off + info.nbytes <= rank.nbytes and off % 64 == 0
    arrays = rank.numpy()
    assert all(a.base is not None for a in arrays.values())
    roots = set()
    for a in arrays.values():
        while isinstance(a.base, type(a)):
            a = a.base
        roots.add(id(a))
    assert len(roots) == 1


def test_cuda_device_picks_local_rank(monkeypatch):
    torch = pytest.importorskip("torch")
    from safeshard import _torch_device

    monkeypatch.setenv("LOCAL_RANK", "3")
    assert _torch_device("cuda") == torch.device("cuda", 3)
    assert _torch_device("cuda:1") == torch.device("cuda", 1)
    assert _torch_device("cpu") == torch.device("cpu")
    assert _torch_device(None) is None


def test_device_copy_through_staging_on_meta_free_path(checkpoints, monkeypatch):
    """The chunked staging loop, exercised on the CPU with tiny stages (CUDA calls are
    covered by gpu_check.py on a device machine)."""
    import torch

    import safeshard as s

    rank = s.plan(checkpoints("llama-tiny")).load(0)
    base = rank._torch_cpu_base()
    out = s._to_device(base, torch.device("cpu"), non_blocking=False)
    assert out.data_ptr() != base.data_ptr() and torch.equal(out, base)
