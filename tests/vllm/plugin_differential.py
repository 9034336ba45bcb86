"""`--load-format safeshard` (the vLLM plugin) against vLLM's own default loader, on CPU.

One case (checkpoint variant, tp, pp) writes the checkpoint (`safeshard.synth`, variants
edited as in differential.py), runs plugin_world.py in a tp x pp gloo world and requires, on
every rank, that
- the plugin loaded with safeshard (for a variant marked `fallback`: that it fell back to
  vLLM's default loader with the expected reason), and
- the model's `state_dict()` equals the default loader's: names, dtypes, shapes, bytes and
  which names share storage.

Driver: `python tests/vllm/plugin_differential.py [--case GLOB,...] [--list]` (needs the
safeshard package installed with its entry points, e.g. `pip install .`, and vLLM 0.33.0).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import differential

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Variant:
    name: str
    preset: str
    edit: str | None = None
    # A variant safeshard must not load: the plugin must fall back, its reason containing this.
    fallback: str | None = None
    # Rank 1 reads a copy whose files differ in length: every rank must raise, naming both.
    skew: bool = False
    # vLLM serves the model in this dtype (not the checkpoint's): copies convert.
    dtype: str | None = None


VARIANTS = [
    Variant("llama", "llama-tiny"),
    Variant("llama-tied", "llama-tiny-tied"),
    Variant("llama-tied-head-differs", "llama-tiny-tied", edit="head-differs"),
    # Stored heads vLLM re-ties (differential.py): on every rank, only on padding-only ranks,
    # and through the arena (a float32 model takes no bfloat16 tensor in place).
    Variant("llama-tied-head-copy", "llama-tiny-tied", edit="finite,head-equal"),
    Variant("llama-tied-v65-head-differs", "llama-tiny-tied", edit="vocab65,head-differs"),
    Variant("llama-tied-head-copy-as-f32", "llama-tiny-tied", edit="finite,head-equal", dtype="float32"),
    Variant("qwen2", "qwen2-tiny"),
    Variant("phi3", "phi3-tiny"),
    Variant("mixtral", "mixtral-tiny"),
    Variant("qwen2-moe", "qwen2-moe-tiny"),
    Variant("deepseek-v2", "deepseek-v3-tiny", edit="deepseek-v2"),
    Variant("gpt2", "gpt2-tiny"),
    Variant("llama-gptq", "llama-tiny-gptq"),
    Variant("llama-awq", "llama-tiny-awq"),
    # vLLM builds its LlamaForCausalLM for this architecture; safeshard ships no spec for it.
    Variant("unknown-arch", "llama-tiny", edit="internlm3", fallback="InternLM3ForCausalLM"),
    Variant("llama-skewed", "llama-tiny", skew=True),
    Variant("llama-as-f32", "llama-tiny", dtype="float32"),
]

CASES = [f"{v.name}-tp2-pp2" for v in VARIANTS] + [
    "llama-tp1-pp1",
    "mixtral-tp1-pp1",
    "gpt2-tp1-pp1",
    "llama-tp4-pp1",
    "qwen2-moe-tp4-pp1",
    "unknown-arch-tp1-pp1",
    # vLLM's expert parallelism: whole experts per rank (safeshard's ep = tp).
    "mixtral-tp2-pp1-ep",
    "qwen2-moe-tp2-pp2-ep",
    "llama-skewed-tp2-pp1",
    "llama-as-f32-tp2-pp1",
    "llama-tied-head-copy-tp2-pp1",
    "llama-tied-v65-head-differs-tp4-pp1",
    "llama-tied-head-copy-as-f32-tp2-pp1",
]


def parse_case(case: str) -> tuple[Variant, int, int, bool]:
    m = re.fullmatch(r"(.+)-tp(\d+)-pp(\d+)(-ep)?", case)
    if not m:
        raise ValueError(f"case {case!r} is not NAME-tpN-ppM or NAME-tpN-ppM-ep")
    by_name = {v.name: v for v in VARIANTS}
    if m.group(1) not in by_name:
        raise ValueError(f"unknown variant {m.group(1)!r}; known: {', '.join(by_name)}")
    return by_name[m.group(1)], int(m.group(2)), int(m.group(3)), m.group(4) is not None


def make_checkpoint(variant: Variant, root: Path) -> Path:
    import safeshard

    out = root / "ckpt" / variant.name
    if (out / "config.json").exists():
        return out
    tmp = root / "ckpt" / (variant.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    safeshard.synth(tmp, variant.preset)
    if variant.edit == "internlm3":
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["architectures"] = ["InternLM3ForCausalLM"]
        cfg_path.write_text(json.dumps(cfg, indent=2))
    elif variant.edit:
        differential.edit_checkpoint(tmp, variant.edit)
    tmp.rename(out)
    return out


def make_skewed_copy(ckpt: Path) -> Path:
    """A copy of `ckpt` whose first safetensors file carries extra header metadata: the same
    tensors, a different file length (which the plan hash covers)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = ckpt.parent / (ckpt.name + "-skewed")
    if out.exists():
        return out
    tmp = ckpt.parent / (ckpt.name + "-skewed.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ckpt, tmp)
    first = sorted(tmp.glob("*.safetensors"))[0]
    with safe_open(first, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = dict(f.metadata() or {})
    meta["skewed"] = "x" * 100
    save_file(tensors, first, metadata=meta)
    tmp.rename(out)
    return out


def run_case(case: str, root: Path) -> tuple[str, list[str]]:
    """Runs one case; returns ("pass"|"fail"|"vllm-cpu-unsupported", details)."""
    variant, tp, pp, ep = parse_case(case)
    ckpt = make_checkpoint(variant, root)
    out = root / f"{case}.json"
    flags = ["ep"] if ep else []
    if variant.skew:
        flags.append(f"skew={make_skewed_copy(ckpt)}")
    if variant.dtype:
        flags.append(f"dtype={variant.dtype}")
    r = differential.run(
        [differential.PYTHON, str(HERE / "plugin_world.py"), str(ckpt), str(out), str(tp), str(pp),
         str(differential.free_port())] + flags,
        1200,
    )
    if r.returncode != 0:
        if any(p in r.stderr for p in differential.CPU_CANNOT):
            return "vllm-cpu-unsupported", [f"vLLM (CPU): {differential.last_error(r.stderr)}"]
        return "fail", [f"plugin_world failed: {differential.last_error(r.stderr)}"]
    ranks = json.loads(out.read_text())
    problems: list[str] = []
    details: list[str] = []
    if variant.skew:
        for rk in ranks:
            err = rk.get("error") or ""
            # Rank 1's group is alone; rank 0 leads the other group ("0: h" or "0,2,3: h").
            named = re.search(r"differ, ranks: hash: 0[,:\d]*: [0-9a-f]{12}; 1: [0-9a-f]{12}\)", err)
            if named is None:
                problems.append(f"rank {rk['rank']}: expected a plan-hash error naming ranks 0 and 1, got {err or 'a load'}")
            details.append(f"rank {rk['rank']}: {err}")
        return ("fail" if problems else "pass"), problems or details
    for rk in ranks:
        if "error" in rk:
            problems.append(f"rank {rk['rank']}: the plugin raised {rk['error']}")
            continue
        if rk["loader"] != "SafeshardModelLoader":
            problems.append(f"rank {rk['rank']}: vLLM chose {rk['loader']}, not the plugin")
        problems += rk["problems"]
        if variant.fallback is None:
            if rk["used"] != "safeshard":
                problems.append(f"rank {rk['rank']}: fell back to the default loader: {rk['reason']}")
        elif rk["used"] != "default" or variant.fallback not in (rk["reason"] or ""):
            problems.append(
                f"rank {rk['rank']}: expected a fallback naming {variant.fallback}, got "
                f"{rk['used']} ({rk['reason']})"
            )
        s = rk["stats"]
        # On the CPU, tensors of the parameter's own dtype are read straight into it (a model
        # served in another dtype converts the others through the arena).
        if rk["used"] == "safeshard" and s and variant.dtype is None:
            if s.get("in_place_tensors", 0) == 0:
                problems.append(f"rank {rk['rank']}: no tensor was read into its parameter")
        details.append(
            f"rank {rk['rank']}: {rk['used']}, {rk['tensors']} tensors, {rk['bytes']} bytes"
            + (f", {s.get('in_place_tensors')} in place" if s else "")
            + (f", read {s.get('read_bytes')} B in {s.get('load_seconds', 0):.3f} s" if s else "")
            + (f" ({rk['reason']})" if rk["reason"] else "")
        )
    return ("fail" if problems else "pass"), problems or details


def judge(case: str, status: str, details: list[str]) -> tuple[str, list[str]]:
    """No plugin case expects vLLM to refuse: its variants are all built by vLLM's CPU build."""
    if status != "pass":
        return "fail", details
    return status, details


def main() -> int:
    every = CASES + [
        f"{v.name}-tp{tp}-pp{pp}{ep}"
        for v in VARIANTS
        for tp in (1, 2, 4)
        for pp in (1, 2)
        for ep in ("", "-ep")
    ]
    return differential.drive(
        __doc__,
        list(dict.fromkeys(every)),
        run_case,
        "safeshard-vplug-",
        f"the plugin's load equals vLLM {differential.VLLM_VERSION}'s default",
        default=CASES,
        judge=judge,
    )


if __name__ == "__main__":
    sys.exit(main())
