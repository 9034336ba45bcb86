"""Acceptance test of `safeshard reshard --format vllm` against vLLM's own `sharded_state` loader.

For one case (a differential.py variant, tp, pp) it
1. writes the checkpoint as differential.py does,
2. loads it with vLLM's default loader in a tp x pp gloo world (`vllm_world.py`): the truth,
3. runs `safeshard reshard CKPT --format vllm --tp --pp --out OUT`,
4. loads OUT with vLLM's real `ShardedStateLoader.load_weights` in a second world
   (`vllm_world.py OUT ... sharded_state`; it raises on any missing or unknown key),
5. compares every rank's `state_dict()`: the same keys (names sharing storage included) and,
   per key, the same dtype, shape and bytes, buffers included; and which names share storage
   (vLLM's re-tied heads), except where the default load re-tied some ranks and not others:
   vLLM's sharded_state builds every rank tied or none, as config.json says, so safeshard
   writes such a model untied (docs/vllm.md).

Driver: `python tests/vllm/sharded_state.py [--case GLOBS] [--list] [--keep DIR] [--json F]`;
outcomes and expected refusals as in differential.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
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


def sharing_problems(truth: Path, got: Path, world: int) -> list[str]:
    """Differences in which names share storage (see the module doc)."""
    t = [json.loads((truth / f"rank{r}.json").read_text())["aliases"] for r in range(world)]
    g = [json.loads((got / f"rank{r}.json").read_text())["aliases"] for r in range(world)]
    head = "lm_head.weight"
    retied = sum(head in a or head in a.values() for a in t)
    partial = 0 < retied < world
    problems = []
    for r in range(world):
        keep = lambda a: {k: v for k, v in a.items() if not (partial and head in (k, v))}  # noqa: E731
        if keep(t[r]) != keep(g[r]):
            problems.append(f"rank {r}: names sharing storage {keep(g[r])} != {keep(t[r])} (default load)")
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
    problems += sharing_problems(truth, got, tp * pp)
    if not os.environ.get("SAFESHARD_VLLM_KEEP"):
        shutil.rmtree(work, ignore_errors=True)
    return ("fail" if problems else "pass"), problems


def main() -> int:
    return d.drive(
        __doc__,
        d.cases(),
        run_case,
        "safeshard-sharded-",
        f"vLLM {d.VLLM_VERSION}'s sharded_state load of `reshard --format vllm` equals its default load",
    )


if __name__ == "__main__":
    sys.exit(main())
