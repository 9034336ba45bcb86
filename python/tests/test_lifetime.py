"""Zero-copy lifetime: views outlive the Rank, the arena is freed with the last view, and
load/drop cycles keep memory bounded. Each case runs in a subprocess, so a use-after-free
crash fails the test instead of the test runner."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from conftest import HAS_TORCH


def run_child(code: str, ckpt) -> str:
    src = textwrap.dedent(code).replace("CKPT", repr(str(ckpt)))
    p = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"child died (rc {p.returncode}): {p.stderr[-2000:]}"
    return p.stdout


def test_numpy_views_survive_the_rank(checkpoints):
    out = run_child(
        """
        import gc, hashlib, numpy as np, safeshard
        from safeshard import _safeshard as n
        rank = safeshard.plan(CKPT, tp=2).load(1)
        arrays = rank.numpy()
        want = {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in arrays.items()}
        del rank; gc.collect()
        assert n.live_arenas() == 1
        junk = [np.full(1 << 20, 0xAB, dtype=np.uint8) for _ in range(64)]  # reuse freed memory
        got = {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in arrays.items()}
        assert got == want
        one = arrays.popitem()[1]
        del arrays; gc.collect()
        assert n.live_arenas() == 1          # one view still holds the arena
        del one; gc.collect()
        assert n.live_arenas() == 0
        print("ok")
        """,
        checkpoints("llama-tiny"),
    )
    assert out.strip() == "ok"


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_torch_views_survive_the_rank(checkpoints):
    out = run_child(
        """
        import gc, safeshard, torch
        from safeshard import _safeshard as n
        rank = safeshard.plan(CKPT, tp=2).load(0)
        state = rank.torch()
        want = {k: v.clone() for k, v in state.items()}
        del rank; gc.collect()
        junk = [torch.full((1 << 20,), 7, dtype=torch.uint8) for _ in range(64)]
        assert all(torch.equal(state[k].view(torch.uint8), want[k].view(torch.uint8)) for k in want)
        state["model.norm.weight"].add_(1)   # views are writable, like any loaded tensor
        kept = state["model.embed_tokens.weight"]
        del state; gc.collect()
        assert n.live_arenas() == 1
        del kept; gc.collect()
        assert n.live_arenas() == 0
        # A capsule that is never consumed frees its reference too.
        r = safeshard.plan(CKPT).load(0)
        cap = r._arena.__dlpack__()
        del r, cap; gc.collect()
        assert n.live_arenas() == 0
        print("ok")
        """,
        checkpoints("llama-tiny"),
    )
    assert out.strip() == "ok"


def test_thousand_load_drop_cycles_keep_rss_bounded(checkpoints):
    out = run_child(
        """
        import gc, os, safeshard
        from safeshard import _safeshard as n
        def rss():
            with open(f"/proc/{os.getpid()}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        plan = safeshard.plan(CKPT, tp=2)
        for _ in range(50):
            plan.load(0).numpy()
        gc.collect()
        before = rss()
        for _ in range(1000):
            a = plan.load(0).numpy()
            del a
        gc.collect()
        print(rss() - before, n.live_arenas(), plan.rank(0).arena_bytes)
        """,
        checkpoints("mixtral-tiny"),
    )
    growth, live, arena = map(int, out.split())
    assert live == 0
    # 1,000 leaked arenas would be 1,000 × arena bytes; allow a few arenas of allocator slack.
    assert growth < 8 * arena + (8 << 20), (growth, arena)
