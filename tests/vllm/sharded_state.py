"""Acceptance test of `safeshard reshard --format vllm` against vLLM's own `sharded_state` loader.

For one case (a differential.py variant, tp, pp) it
1. writes the checkpoint as differential.py does,
2. loads it with vLLM's default loader in a tp x pp gloo world (`vllm_world.py`): the truth,
3. runs `safeshard reshard CKPT --format vllm --tp --pp --out OUT`,
4. loads OUT with vLLM's real `ShardedStateLoader.load_weights` in a second world
   (`vllm_world.py OUT ... sharded_state`; it raises on any missing or unknown key),
5. compares every rank's `state_dict()`: the same keys (names sharing storage included) and,
   per key, the same dtype, shape and bytes, buffers included.

Driver: `python tests/vllm/sharded_state.py [--case GLOBS] [--list] [--keep DIR] [--json F]`;
pytest: `pytest tests/vllm/test_sharded_state.py` (SAFESHARD_VLLM_CASES picks cases).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import differential as d  # noqa: E402


def reshard_vllm(ckpt: Path, out: Path, tp: int, pp: int) -> subprocess.CompletedProcess:
    cmd = [str(d.binary("safeshard")), "reshard", str(ckpt), "--format", "vllm"]
    cmd += ["--tp", str(tp), "--pp", str(pp), "--out", str(out)]
    return d.run(cmd, 600)


def world(src: Path, out: Path, tp: int, pp: int, loader: str) -> subprocess.CompletedProcess:
    cmd = [d.PYTHON, str(HERE / "vllm_world.py"), str(src), str(out), str(tp), str(pp)]
    return d.run(cmd + [str(d.free_port()), loader], 1200)


def rank_state(vdir: Path, rank: int) -> tuple[dict, dict]:
    """The rank's tensors by name, and every state_dict key -> the name holding its tensor."""
    from safetensors.torch import load_file

    meta = json.loads((vdir / f"rank{rank}.json").read_text())
    tensors = load_file(vdir / f"rank{rank}.safetensors")
    keys = {k: k for k in tensors}
    keys.update(meta["aliases"])
    return tensors, keys


def compare_rank(truth: Path, got: Path, rank: int) -> list[str]:
    import torch

    tt, tk = rank_state(truth, rank)
    gt, gk = rank_state(got, rank)
    problems = []
    for k in sorted(set(tk) - set(gk)):
        problems.append(f"rank {rank}: {k}: in vLLM's default load, not after sharded_state")
    for k in sorted(set(gk) - set(tk)):
        problems.append(f"rank {rank}: {k}: after sharded_state, not in vLLM's default load")
    for k in sorted(set(tk) & set(gk)):
        a, b = tt[tk[k]], gt[gk[k]]
        if a.dtype != b.dtype:
            problems.append(f"rank {rank}: {k}: dtype {b.dtype} != {a.dtype} (default load)")
        elif tuple(a.shape) != tuple(b.shape):
            problems.append(f"rank {rank}: {k}: shape {tuple(b.shape)} != {tuple(a.shape)} (default load)")
        elif not torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)):
            problems.append(f"rank {rank}: {k}: bytes differ")
    return problems


def run_case(case: str, root: Path) -> tuple[str, list[str]]:
    """("pass"|"fail"|"both-refuse"|"vllm-cpu-unsupported", details)."""
    variant, tp, pp = d.parse_case(case)
    ckpt = d.make_checkpoint(variant, root)
    work = root / "cases" / case
    shutil.rmtree(work, ignore_errors=True)
    truth, out, got = work / "default", work / "reshard", work / "sharded"
    v = world(ckpt, truth, tp, pp, "safetensors")
    s = reshard_vllm(ckpt, out, tp, pp)
    if v.returncode != 0 or s.returncode != 0:
        if v.returncode != 0 and any(p in v.stderr for p in d.CPU_CANNOT):
            # vLLM's CPU build cannot construct the model: nothing to compare with.
            return "vllm-cpu-unsupported", [f"vLLM (CPU): {d.last_error(v.stderr)}", f"safeshard: {s.stderr.strip() or 'ok'}"]
        if v.returncode != 0 and s.returncode != 0:
            return "both-refuse", [f"vLLM: {d.last_error(v.stderr)}", f"safeshard: {s.stderr.strip()}"]
        why = []
        if v.returncode != 0:
            why.append(f"vLLM's default load failed, safeshard did not: {d.last_error(v.stderr)}")
        if s.returncode != 0:
            why.append(f"safeshard reshard --format vllm failed: {s.stderr.strip()}")
        return "fail", why
    g = world(out, got, tp, pp, "sharded_state")
    if g.returncode != 0:
        return "fail", [f"vLLM's ShardedStateLoader refused the output: {d.last_error(g.stderr)}"]
    problems = []
    for rank in range(tp * pp):
        problems += compare_rank(truth, got, rank)
    if not os.environ.get("SAFESHARD_VLLM_KEEP"):
        shutil.rmtree(work, ignore_errors=True)
    return ("fail" if problems else "pass"), problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", default="*", help="case names or globs, comma-separated (see --list)")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--keep", type=Path, help="work directory to keep (default: a temporary one)")
    ap.add_argument("--json", type=Path, help="write the results as JSON here")
    a = ap.parse_args()
    names = [c for g in a.case.split(",") for c in d.cases() if fnmatch.fnmatch(c, g)]
    names = list(dict.fromkeys(names))
    if a.list:
        print("\n".join(names))
        return 0
    if not names:
        print(f"no case matches {a.case!r}", file=sys.stderr)
        return 2
    root = a.keep or Path(tempfile.mkdtemp(prefix="safeshard-sharded-"))
    results, failed = {}, 0
    t0 = time.monotonic()
    for c in names:
        t = time.monotonic()
        status, details = run_case(c, root)
        dt = time.monotonic() - t
        results[c] = {"status": status, "seconds": round(dt, 1), "details": details[:20], "count": len(details)}
        failed += status == "fail"
        print(f"{status:11} {c} ({dt:.0f} s)", flush=True)
        for line in details[:10]:
            print(f"    {line}", flush=True)
        if len(details) > 10:
            print(f"    ... and {len(details) - 10} more", flush=True)
    total = time.monotonic() - t0
    print(f"{len(names) - failed}/{len(names)} cases: vLLM {d.VLLM_VERSION}'s sharded_state load of "
          f"`reshard --format vllm` equals its default load, in {total:.0f} s")
    if a.json:
        a.json.write_text(json.dumps({"vllm": d.VLLM_VERSION, "seconds": round(total), "cases": results}, indent=1))
    if not a.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
