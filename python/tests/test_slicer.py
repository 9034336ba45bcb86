"""Every tensor of every rank equals an independent numpy slicer (vLLM's rules, written in
Python in vllm_slicer.py) applied to the full tensors read with the safetensors package."""

from __future__ import annotations

import pytest

import safeshard
import vllm_slicer as ref
from conftest import as_bytes, read_full

PRESETS = [
    "llama-tiny", "mistral-tiny", "qwen2-tiny", "phi3-tiny", "mixtral-tiny",
    "qwen2-moe-tiny", "deepseek-v3-tiny", "gpt2-tiny",
]
TOPOS = [(tp, pp, 1, 1) for tp in (1, 2, 4) for pp in (1, 2)] + [(2, 1, 2, 1)]


def expected_by_rank(cfg, full, tp, pp, dp, ep):
    want: dict[int, dict[str, tuple]] = {r: {} for r in range(tp * pp * dp)}
    for name, (dtype, arr) in full.items():
        for rank, s in ref.expected(cfg, tp, pp, dp, ep, name, list(arr.shape[:-1])):
            want[rank][name] = (dtype, ref.materialize(arr, s))
    return want


def check_topology(ckpt, tp, pp, dp, ep):
    cfg, full = read_full(ckpt)
    try:
        want = expected_by_rank(cfg, full, tp, pp, dp, ep)
    except ref.NoRule:
        # vLLM refuses this topology; so must safeshard, with its one error type.
        with pytest.raises(safeshard.SafeshardError):
            safeshard.plan(ckpt, tp=tp, pp=pp, dp=dp, ep=ep)
        return 0
    plan = safeshard.plan(ckpt, tp=tp, pp=pp, dp=dp, ep=ep)
    assert plan.world_size == tp * pp * dp
    checked = 0
    for r in range(plan.world_size):
        rank = plan.load(r)
        got = rank.numpy()
        info = {t.name: t for t in rank}
        assert sorted(got) == sorted(want[r]), f"rank {r}: tensor names differ"
        for name, (dtype, exp) in want[r].items():
            t = info[name]
            assert t.dtype == dtype, name
            assert t.shape == exp.shape[:-1], (name, t.shape, exp.shape)
            assert t.nbytes == exp.size, name
            assert (as_bytes(got[name], t.shape, dtype) == exp).all(), f"rank {r}: {name}"
            checked += 1
        assert rank.stats["bytes"] == sum(e.size for _, e in want[r].values())
    return checked


@pytest.mark.parametrize("preset", PRESETS)
def test_every_tensor_of_every_rank(checkpoints, preset):
    ckpt = checkpoints(preset)
    total = sum(check_topology(ckpt, *topo) for topo in TOPOS)
    assert total > 0, f"{preset}: no topology could be checked"


def test_expert_parallel_mixtral(checkpoints):
    assert check_topology(checkpoints("mixtral-tiny"), 2, 1, 2, 4) > 0
