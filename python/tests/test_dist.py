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
    # On gloo read-once's rounds moved as point-to-point messages (TorchComm.exchange, not
    # the packed all-to-all): every byte it counted as sent.
    assert [r["exchange_sent"] for r in results] == [r["read-once_sent"] for r in results]
    assert total["read-once"] < total["none"]
    if dp > 1:
        assert total["broadcast"] < total["none"]


def test_torchrun_exchange_delivers_messages_in_order(tmp_path):
    """TorchComm.exchange on gloo, 4 ranks: several messages per pair (empty ones, 1 byte to
    1 MiB), each landing in the buffer of the same position for its sender; the receivers
    check every byte against the pattern the sender wrote."""
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
         str(JOB.with_name("dist_exchange_job.py")), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert p.returncode == 0, p.stderr[-3000:]
    for r in range(4):
        assert (tmp_path / f"exchange-{r}.txt").read_text() == "ok 30 messages", r


@pytest.mark.parametrize("share", ["broadcast", "none"])
def test_torchrun_plan_mismatch_fails_every_rank(checkpoints, tmp_path, share):
    """`share="none"` on the job's ranks agrees on the plan too (and so reads node spans)."""
    ckpt = checkpoints("qwen2-moe-tiny")
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
         str(JOB.with_name("dist_fail_job.py")), str(ckpt), str(tmp_path), share],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert p.returncode == 0, p.stderr[-3000:]
    for r in range(4):
        msg = (tmp_path / f"fail-{r}.txt").read_text()
        # Every rank names the disagreement and the odd rank out (options agreed first).
        assert msg.startswith("usage: ") and "disagree on plan" in msg and "rank 3 " in msg, msg


# The first agreement of a shared load counts the nodes (the share default), then compares
# the job fingerprint. Inside read-once's exchange the ranks that wait for rank 2's messages
# time out in the round, the others in the agreement that ends the load.
@pytest.mark.parametrize(
    "where,phase",
    [
        ("all_gather", "share default: node names"),
        ("broadcast", "broadcast"),
        ("exchange", "read-once( round 1 of 1|: done)"),
    ],
)
def test_torchrun_stopped_rank_ends_the_load_by_its_deadline(checkpoints, tmp_path, where, phase):
    """Rank 2 stops (SIGSTOP) at a collective: every other rank raises a timeout naming the
    phase and rank 2 within the 3 s deadline plus the meeting's grace (1 s) and slack."""
    import re
    import signal
    import time

    ckpt = checkpoints("llama-tiny")
    p = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
         str(JOB.with_name("dist_stop_job.py")), str(ckpt), str(tmp_path), where],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    # Pipeline stages never wait on each other: with a stop inside the broadcasts of stage 1
    # (ranks 2, 3), stage 0 loads; every rank waits for rank 2 at the first agreement and in
    # read-once (its rounds and its last agreement span the job).
    live = [3] if where == "broadcast" else [0, 1, 3]
    try:
        end = time.monotonic() + 120
        while time.monotonic() < end and not all(
            (tmp_path / f"stop-{r}.txt").exists() for r in (0, 1, 3)
        ):
            time.sleep(0.2)
    finally:
        # The stopped rank never ends by itself: end it, then torchrun.
        pid = tmp_path / "pid-2.txt"
        if pid.exists():
            os.kill(int(pid.read_text()), signal.SIGKILL)
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
    log = p.stdout.read() if p.stdout else ""
    for r in live:
        took, msg = (tmp_path / f"stop-{r}.txt").read_text().split(" ", 1)
        if where == "broadcast" and msg == "no error, received 0 bytes":
            # Rank 3 roots every broadcast of its stage and gloo's sends of these small
            # batches may complete before rank 2 reads them: a rank that needs no byte of
            # the stopped one may finish (it holds all its tensors); one that needs any
            # must time out, below.
            continue
        said = re.match(
            f'comm: (?P<phase>{phase}): \\[2\\]: rank {r}: timed out after 3s in phase '
            '"(?P=phase)": rank 2 did not arrive',
            msg,
        )
        assert said, (msg, log[-2000:])
        assert float(took) < 3 + 15, (took, msg)
    for r in set((0, 1, 3)) - set(live):
        assert " no error, received " in (tmp_path / f"stop-{r}.txt").read_text()
