"""torchrun --nproc-per-node 4 with gloo: none, broadcast and read-once give the same bytes
as the CLI for tp=2 x pp=2 and tp=2 x dp=2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HAS_TORCH, run_cli

pytestmark = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")

JOB = Path(__file__).with_name("dist_job.py")


@pytest.mark.parametrize("tp,pp,dp", [(2, 2, 1), (2, 1, 2)])
def test_torchrun_share_modes_agree(checkpoints, tmp_path, tp, pp, dp):
    ckpt = checkpoints("qwen2-moe-tiny")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
         str(JOB), str(ckpt), str(tmp_path), str(tp), str(pp), str(dp)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    out = run_cli("load", str(ckpt), "--tp", str(tp), "--pp", str(pp), "--dp", str(dp),
                  "--all-ranks", "--digest", "--json").stdout
    cli = {d["rank"]: d["sha256"] for d in map(json.loads, out.splitlines())}
    plan = json.loads(run_cli("plan", str(ckpt), "--tp", str(tp), "--pp", str(pp), "--dp", str(dp), "--json").stdout)
    results = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(4)]
    for r, res in enumerate(results):
        assert res["rank"] == r and res["hash"] == plan["hash"]
        assert res["none"] == res["broadcast"] == res["read-once"] == cli[r], r
        assert res["load_names"] == sorted(t["name"] for t in plan["ranks"][r]["tensors"])
        # Without share=: none on one node, broadcast across (simulated) nodes, said why.
        mode, why, digest = res["default"]
        assert (mode, digest) == ("none", cli[r]) and "1 node" in why, res["default"]
        mode, why, digest = res["default_2_nodes"]
        assert (mode, digest) == ("broadcast", cli[r]) and "2 nodes" in why, res["default_2_nodes"]
    # The shared modes moved bytes through torch.distributed, and read-once read less in
    # total than every rank reading its own slices (broadcast too once DP replicas exist;
    # with tp x pp only small replicated tensors are shared, within the same pages).
    total = {m: sum(r[m + "_read"] for r in results) for m in ("none", "broadcast", "read-once")}
    assert sum(r["broadcast_sent"] for r in results) > 0
    assert sum(r["read-once_sent"] for r in results) > 0
    assert total["read-once"] < total["none"]
    if dp > 1:
        assert total["broadcast"] < total["none"]


def test_torchrun_plan_mismatch_fails_every_rank(checkpoints, tmp_path):
    ckpt = checkpoints("qwen2-moe-tiny")
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
         str(JOB.with_name("dist_fail_job.py")), str(ckpt), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert p.returncode == 0, p.stderr[-3000:]
    for r in range(4):
        msg = (tmp_path / f"fail-{r}.txt").read_text()
        # Every rank names the disagreement and the odd rank out (options agreed first).
        assert msg.startswith("usage: ") and "disagree on plan" in msg and "rank 3 " in msg, msg
