"""Differential test of safeshard against vLLM's own weight loading, on CPU.

For one case (checkpoint variant, tp, pp) it
1. writes the checkpoint (`cargo run --example synth`, plus variants made here with the
   `safetensors` package: a tied checkpoint that stores `lm_head.weight`, DeepSeek-V2),
2. runs vLLM's default load in a tp x pp gloo world (`vllm_world.py`, one process per rank),
3. runs `safeshard reshard CKPT --tp --pp --out DIR`,
4. compares every rank: each tensor of vLLM's `state_dict()` (that vLLM's `load_weights`
   filled) must equal, in dtype, shape and bytes, safeshard's tensor of the same name or the
   checkpoint parts vLLM fused into it (`packed_modules_mapping`: qkv_proj, gate_up_proj,
   fused_qkv_a_proj; FusedMoE `w13_*`/`w2_*` stacked over the rank's experts; GPT-2's
   transposed Conv1D weights), and safeshard must hold nothing else.

Driver: `python tests/vllm/differential.py [--case NAME|all] [--list] [--keep DIR]`.
Outcomes are reported apart: `pass`, `both-refuse` (vLLM and safeshard refuse a topology the
variant says vLLM refuses), `vllm-cpu-unsupported` (a variant vLLM's CPU build cannot build)
and `fail`, which includes a refusal the variant does not expect.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PYTHON = os.environ.get("SAFESHARD_VLLM_PYTHON", sys.executable)
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))

# vLLM 0.33.0's model classes that this test has been run against.
VLLM_VERSION = "0.33.0"


@dataclass(frozen=True)
class Variant:
    """A checkpoint to test: a synth preset, optionally changed by `edit`."""

    name: str
    preset: str
    edit: str | None = None
    # Largest tp in the matrix (gpt2-tiny's 4 heads: vLLM refuses tp 8 before loading).
    max_tp: int = 8
    # "tpN-ppM" globs where vLLM refuses the model (a split it does not accept): there both
    # must refuse, and a refusal anywhere else is a failure.
    refuses: tuple[str, ...] = ()
    # vLLM's CPU build cannot construct the model (FP8 block quantization): not comparable.
    cpu_unsupported: bool = False


VARIANTS = [
    Variant("llama", "llama-tiny"),
    Variant("llama-tied", "llama-tiny-tied"),
    # Tied config, but the checkpoint stores lm_head.weight equal to the embedding
    # (vLLM re-ties) or different from it (vLLM loads it as the head).
    Variant("llama-tied-head-equal", "llama-tiny-tied", edit="head-equal"),
    Variant("llama-tied-head-differs", "llama-tiny-tied", edit="head-differs"),
    # vLLM re-ties a stored head per rank where it equals the embedding (torch.equal over the
    # rank's rows, padding included): an exact copy of a NaN-free embedding re-ties on every
    # rank; with vocab 65 (padded to 128) ranks holding only padding re-tie even though the
    # head differs (tp 4: rank 3, tp 8: ranks 5-7). The head-equal copy above holds NaNs, so
    # vLLM never re-ties it.
    Variant("llama-tied-head-copy", "llama-tiny-tied", edit="finite,head-equal"),
    Variant("llama-tied-v65-head-differs", "llama-tiny-tied", edit="vocab65,head-differs"),
    Variant("mistral", "mistral-tiny"),
    Variant("qwen2", "qwen2-tiny"),
    Variant("qwen2-untied", "qwen2-tiny-untied"),
    Variant("qwen2-tied-head-differs", "qwen2-tiny", edit="head-differs"),
    Variant("phi3", "phi3-tiny"),
    Variant("mixtral", "mixtral-tiny"),
    Variant("mixtral-tied", "mixtral-tiny-tied"),
    Variant("qwen2-moe", "qwen2-moe-tiny"),
    # Issue 18: 3 layers, decoder_sparse_step 1, mlp_only_layers [1] (layer 1 dense).
    Variant("qwen2-moe-dense", "qwen2-moe-dense-tiny"),
    Variant("deepseek-v2", "deepseek-v3-tiny", edit="deepseek-v2"),
    # DeepSeek-V2 without q_lora_rank, first_k_dense_replace 1, moe_layer_freq 2: layers 0,
    # 1 and 3 dense, 2 MoE.
    Variant("deepseek-v2-dense", "deepseek-v2-tiny"),
    Variant("deepseek-v3", "deepseek-v3-tiny", cpu_unsupported=True),
    Variant("gpt2", "gpt2-tiny", max_tp=4),
    Variant("gpt2-head-differs", "gpt2-tiny", edit="head-differs", max_tp=4),
    # tp 8: o_proj's and down_proj's input partitions are not whole 32-groups.
    Variant("llama-gptq", "llama-tiny-gptq", refuses=("tp8-*",)),
    Variant("llama-awq", "llama-tiny-awq", refuses=("tp8-*",)),
    Variant("qwen3", "qwen3-tiny"),
    # 6 layers, decoder_sparse_step 2, mlp_only_layers [3]: layers 1 and 5 MoE. vLLM refuses
    # a pipeline stage without an MoE layer (pp 2 keeps one in each).
    Variant("qwen3-moe", "qwen3-moe-tiny"),
]

# vLLM errors that mean its CPU build cannot construct the model's layers (e.g. FP8 block
# quantization has no CPU ScaledMM kernel): such cases are reported, not failed.
CPU_CANNOT = ("Failed to find a kernel that can implement",)

TPS = (1, 2, 4, 8)
PPS = (1, 2)


def cases() -> list[str]:
    return [f"{v.name}-tp{tp}-pp{pp}" for v in VARIANTS for pp in PPS for tp in TPS if tp <= v.max_tp]


def parse_case(case: str) -> tuple[Variant, int, int]:
    m = re.fullmatch(r"(.+)-tp(\d+)-pp(\d+)", case)
    if not m:
        raise ValueError(f"case {case!r} is not NAME-tpN-ppM")
    by_name = {v.name: v for v in VARIANTS}
    if m.group(1) not in by_name:
        raise ValueError(f"unknown variant {m.group(1)!r}; known: {', '.join(by_name)}")
    return by_name[m.group(1)], int(m.group(2)), int(m.group(3))


def run(cmd: list[str], timeout: int, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def binary(name: str, example: bool = False) -> Path:
    # A copy of the binary (SAFESHARD_BIN) keeps a long run independent of rebuilds.
    if not example and os.environ.get("SAFESHARD_BIN"):
        return Path(os.environ["SAFESHARD_BIN"])
    sub = TARGET / "debug" / ("examples" if example else "")
    path = sub / name
    if not path.exists():
        args = ["cargo", "build", "-q"] + (["--example", name] if example else ["--bin", name])
        subprocess.run(args, cwd=REPO, check=True)
    return path


def make_checkpoint(variant: Variant, root: Path) -> Path:
    """Writes the variant's checkpoint under root (once per run) and returns its dir."""
    out = root / "ckpt" / variant.name
    if (out / "config.json").exists():
        return out
    tmp = root / "ckpt" / (variant.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    r = run([str(binary("synth", example=True)), variant.preset, str(tmp)], 600)
    if r.returncode != 0:
        raise RuntimeError(f"synth {variant.preset}: {r.stderr.strip()}")
    if variant.edit:
        edit_checkpoint(tmp, variant.edit)
    tmp.rename(out)
    return out


def edit_checkpoint(ckpt: Path, edits: str) -> None:
    """Applies the comma-separated `edits` in order."""
    for edit in edits.split(","):
        edit_once(ckpt, edit)


def edit_embedding(ckpt: Path, change) -> None:
    """Rewrites the file holding `model.embed_tokens.weight` with `change(tensor)` in its place."""
    from safetensors.torch import load_file, save_file

    name = "model.embed_tokens.weight"
    index_path = ckpt / "model.safetensors.index.json"
    if index_path.exists():
        files = [json.loads(index_path.read_text())["weight_map"][name]]
    else:
        files = sorted(p.name for p in ckpt.glob("*.safetensors"))
    for f in files:
        tensors = load_file(ckpt / f)
        if name in tensors:
            tensors[name] = change(tensors[name]).contiguous()
            save_file(tensors, ckpt / f, metadata={"format": "pt"})


def edit_once(ckpt: Path, edit: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    cfg_path = ckpt / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if edit == "finite":
        # NaNs (random bits) replaced by zeros: torch.equal never equals a NaN.
        edit_embedding(ckpt, lambda t: torch.nan_to_num(t, nan=0.0))
    elif edit == "vocab65":
        edit_embedding(ckpt, lambda t: t[:65].clone())
        cfg["vocab_size"] = 65
    elif edit in ("head-equal", "head-differs"):
        # Add lm_head.weight in a file of its own and list it in the index.
        emb_name = "wte.weight" if cfg["model_type"] == "gpt2" else "model.embed_tokens.weight"
        index_path = ckpt / "model.safetensors.index.json"
        if index_path.exists():
            index = json.loads(index_path.read_text())
        else:
            files = sorted(p.name for p in ckpt.glob("*.safetensors"))
            index = {"metadata": {}, "weight_map": {}}
            for f in files:
                for k in load_file(ckpt / f):
                    index["weight_map"][k] = f
        src = index["weight_map"][emb_name]
        emb = load_file(ckpt / src)[emb_name]
        head = emb.clone() if edit == "head-equal" else (emb.float() * -0.5 + 0.25).to(emb.dtype)
        save_file({"lm_head.weight": head}, ckpt / "lm_head.safetensors", metadata={"format": "pt"})
        index["weight_map"]["lm_head.weight"] = "lm_head.safetensors"
        index_path.write_text(json.dumps(index, indent=2))
        assert cfg.get("tie_word_embeddings", cfg["model_type"] == "gpt2")
    elif edit == "deepseek-v2":
        # DeepSeek-V2 layout: same tensors, no FP8 (no weight_scale_inv), softmax routing
        # without the correction bias.
        cfg["architectures"] = ["DeepseekV2ForCausalLM"]
        cfg["model_type"] = "deepseek_v2"
        cfg.pop("quantization_config", None)
        cfg["scoring_func"] = "softmax"
        cfg["topk_method"] = "group_limited_greedy"
        cfg.pop("num_nextn_predict_layers", None)
        cfg["torch_dtype"] = "bfloat16"
        index_path = ckpt / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        n_layers = cfg["num_hidden_layers"]
        new_map = {}
        for f in sorted(set(index["weight_map"].values())):
            tensors = load_file(ckpt / f)
            keep = {}
            for k, t in tensors.items():
                m = re.match(r"model\.layers\.(\d+)\.", k)
                if m and int(m.group(1)) >= n_layers:
                    continue  # the MTP layer is V3 only
                if k.endswith("weight_scale_inv") or k.endswith("e_score_correction_bias"):
                    continue
                if t.dtype == torch.float8_e4m3fn:
                    t = t.to(torch.bfloat16)
                keep[k] = t
            save_file(keep, ckpt / f, metadata={"format": "pt"})
            new_map.update({k: f for k in keep})
        index["weight_map"] = new_map
        index_path.write_text(json.dumps(index, indent=2))
    else:
        raise ValueError(f"unknown edit {edit!r}")
    cfg_path.write_text(json.dumps(cfg, indent=2))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_load(ckpt: Path, out: Path, tp: int, pp: int) -> subprocess.CompletedProcess:
    return run(
        [PYTHON, str(HERE / "vllm_world.py"), str(ckpt), str(out), str(tp), str(pp), str(free_port())],
        1200,
    )


def safeshard_reshard(ckpt: Path, out: Path, tp: int, pp: int) -> subprocess.CompletedProcess:
    return run(
        [str(binary("safeshard")), "reshard", str(ckpt), "--tp", str(tp), "--pp", str(pp), "--out", str(out)],
        600,
    )


def load_safeshard_rank(out: Path, rank: int) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(out.glob(f"model-rank-{rank}-part-*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def concat_dim(parts: list, whole) -> int | None:
    """The dim along which `parts` concatenate to `whole`'s shape, if exactly one fits."""
    fits = []
    for d in range(whole.dim()):
        if any(p.dim() != whole.dim() for p in parts):
            return None
        if sum(p.shape[d] for p in parts) != whole.shape[d]:
            continue
        if all(p.shape[:d] == whole.shape[:d] and p.shape[d + 1 :] == whole.shape[d + 1 :] for p in parts):
            fits.append(d)
    return fits[0] if len(fits) == 1 else None


EXPERT_PARTS = {
    # vLLM's w13 is gate (w1) then up (w3) on the output dim; w2 is down.
    "w13": (("w1", "w3"), ("gate_proj", "up_proj")),
    "w2": (("w2",), ("down_proj",)),
}


def expected_for(key: str, tensor, meta: dict, ss: dict, used: set):
    """safeshard's tensor(s) for vLLM's `key`, assembled like vLLM's parameter, or None."""
    import torch

    if key in ss:
        used.add(key)
        return ss[key]
    # GPT-2: vLLM prefixes `transformer.` and transposes the Conv1D weights.
    if meta["class"] == "GPT2LMHeadModel" and key.startswith("transformer."):
        ck = key[len("transformer.") :]
        if ck in ss:
            used.add(ck)
            t = ss[ck]
            if ck.endswith(".weight") and any(p in ck for p in ("c_attn", "c_proj", "c_fc")):
                t = t.t().contiguous()
            return t
    segs = key.split(".")
    # Fused linear layers: the checkpoint parts, concatenated on the dim that fits.
    for i, seg in enumerate(segs):
        if seg in meta["packed"]:
            names = [".".join(segs[:i] + [p] + segs[i + 1 :]) for p in meta["packed"][seg]]
            if all(n in ss for n in names):
                parts = [ss[n] for n in names]
                d = concat_dim(parts, tensor)
                if d is None:
                    return ("shape", f"parts {[tuple(p.shape) for p in parts]} do not build {tuple(tensor.shape)}")
                used.update(names)
                return torch.cat(parts, dim=d)
    # FusedMoE: experts stacked on dim 0 in the rank's local order.
    m = re.fullmatch(r"(.*)\.(w13|w2)_(.+)", key)
    if m and m.group(1) in meta["experts"]:
        module, which, suffix = m.groups()
        ids = meta["experts"][module]
        # The checkpoint names experts under `...experts.{e}`; vLLM's RoutedExperts module
        # may sit below that (`...experts.routed_experts`).
        prefix = module
        while prefix and not prefix.endswith(".experts"):
            prefix = prefix.rpartition(".")[0]
        for names in EXPERT_PARTS[which]:
            stacked = []
            for e in ids:
                part_names = [f"{prefix}.{e}.{n}.{suffix}" for n in names]
                if not all(n in ss for n in part_names):
                    break
                parts = [ss[n] for n in part_names]
                stacked.append((part_names, parts))
            else:
                per_expert = []
                for part_names, parts in stacked:
                    d = concat_dim(parts, tensor[0]) if len(parts) > 1 else None
                    if len(parts) > 1 and d is None:
                        return ("shape", f"expert parts {[tuple(p.shape) for p in parts]} do not build {tuple(tensor.shape[1:])}")
                    per_expert.append(torch.cat(parts, dim=d) if len(parts) > 1 else parts[0])
                    used.update(part_names)
                return torch.stack(per_expert) if per_expert else None
    return None


def compare_rank(vdir: Path, sdir: Path, rank: int) -> list[str]:
    """Differences between vLLM's rank and safeshard's, one line each (empty: equal)."""
    import torch
    from safetensors.torch import load_file

    meta = json.loads((vdir / f"rank{rank}.json").read_text())
    vt = load_file(vdir / f"rank{rank}.safetensors")
    ss = load_safeshard_rank(sdir, rank)
    loaded = set(meta["loaded"]) if meta["loaded"] is not None else None
    problems = []
    used: set = set()
    for key, t in sorted(vt.items()):
        exp = expected_for(key, t, meta, ss, used)
        if exp is None:
            if loaded is None or key in loaded:
                problems.append(f"rank {rank}: vLLM holds {key} {tuple(t.shape)}, safeshard has no tensor for it")
            continue
        if isinstance(exp, tuple):
            problems.append(f"rank {rank}: {key}: {exp[1]}")
            continue
        if exp.dtype != t.dtype:
            problems.append(f"rank {rank}: {key}: dtype {exp.dtype} (safeshard) != {t.dtype} (vLLM)")
        elif tuple(exp.shape) != tuple(t.shape):
            problems.append(f"rank {rank}: {key}: shape {tuple(exp.shape)} (safeshard) != {tuple(t.shape)} (vLLM)")
        elif not torch.equal(exp.contiguous().view(torch.uint8), t.contiguous().view(torch.uint8)):
            problems.append(f"rank {rank}: {key}: bytes differ")
    # A name vLLM ties to another (a stored head it re-tied to the embedding it equals): the
    # checkpoint-named rank keeps the stored head, which must equal what vLLM holds for both.
    for alias, holder in sorted(meta["aliases"].items()):
        if alias in ss and alias not in used and holder in vt:
            used.add(alias)
            a, b = ss[alias], vt[holder]
            same = a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape)
            if not (same and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))):
                problems.append(f"rank {rank}: {alias}: differs from {holder}, which vLLM ties it to")
    for extra in sorted(set(ss) - used):
        problems.append(f"rank {rank}: safeshard holds {extra} {tuple(ss[extra].shape)}, vLLM does not")
    return problems


def judge(case: str, status: str, details: list[str]) -> tuple[str, list[str]]:
    """A refusal counts as its own outcome only where the case's variant expects it; an
    unexpected one, or an expected one that did not happen, is a failure."""
    variant, tp, pp = parse_case(case)
    expected = any(fnmatch.fnmatch(f"tp{tp}-pp{pp}", g) for g in variant.refuses)
    if status == "both-refuse" and not expected:
        return "fail", ["both refuse, but vLLM is not expected to refuse this case"] + details
    if status == "vllm-cpu-unsupported" and not variant.cpu_unsupported:
        return "fail", ["vLLM's CPU build is not expected to refuse this model"] + details
    if status == "pass" and (expected or variant.cpu_unsupported):
        return "fail", ["expected a refusal (see VARIANTS), both loaded"] + details
    return status, details


def run_case(case: str, root: Path) -> tuple[str, list[str]]:
    """Runs one case; returns ("pass"|"fail"|"both-refuse"|"vllm-cpu-unsupported", details)
    before `judge`."""
    variant, tp, pp = parse_case(case)
    ckpt = make_checkpoint(variant, root)
    work = root / "cases" / case
    shutil.rmtree(work, ignore_errors=True)
    vdir, sdir = work / "vllm", work / "safeshard"
    v = vllm_load(ckpt, vdir, tp, pp)
    s = safeshard_reshard(ckpt, sdir, tp, pp)
    if v.returncode != 0 or s.returncode != 0:
        if v.returncode != 0 and any(p in v.stderr for p in CPU_CANNOT):
            # vLLM's CPU build has no kernel for this quantization: nothing to compare with.
            return "vllm-cpu-unsupported", [f"vLLM (CPU): {last_error(v.stderr)}", f"safeshard: {s.stderr.strip() or 'ok'}"]
        if v.returncode != 0 and s.returncode != 0:
            return "both-refuse", [f"vLLM: {last_error(v.stderr)}", f"safeshard: {s.stderr.strip()}"]
        why = []
        if v.returncode != 0:
            why.append(f"vLLM failed, safeshard did not: {last_error(v.stderr)}")
        if s.returncode != 0:
            why.append(f"safeshard failed, vLLM did not: {s.stderr.strip()}")
        return "fail", why
    problems = []
    for rank in range(tp * pp):
        problems += compare_rank(vdir, sdir, rank)
    if not os.environ.get("SAFESHARD_VLLM_KEEP"):
        shutil.rmtree(work, ignore_errors=True)
    return ("fail" if problems else "pass"), problems


def last_error(stderr: str) -> str:
    lines = [l for l in stderr.strip().splitlines() if l.strip()]
    errs = [l for l in lines if re.match(r"^\w*(Error|Exception)\b|^\w+Error:", l)]
    return (errs or lines or ["(no output)"])[-1][:400]


OUTCOMES = ("pass", "both-refuse", "vllm-cpu-unsupported", "fail")


def drive(
    doc: str,
    every: list[str],
    run_case,
    prefix: str,
    what: str,
    default: list[str] | None = None,
    judge=judge,
) -> int:
    """The command line every vLLM driver shares (this one, sharded_state.py,
    plugin_differential.py): pick cases by comma-separated globs, run each with
    `run_case(case, root) -> (status, details)` and `judge` (expected refusals), print one line
    a case and a summary counting each outcome apart (`what` held for the passes),
    optionally write JSON; exit 1 if a case failed, 2 if none matched. `default` is the list
    `--case '*'` runs when it is not every case."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--case", default="*", help="case names or globs, comma-separated (see --list); default all")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--keep", type=Path, help="work directory to keep (default: a temporary one)")
    ap.add_argument("--json", type=Path, help="write the results as JSON here")
    a = ap.parse_args()
    if a.case == "*" and default is not None:
        names = list(default)
    else:
        names = [c for g in a.case.split(",") for c in every if fnmatch.fnmatch(c, g)]
    names = list(dict.fromkeys(names))
    if a.list:
        print("\n".join(names))
        return 0
    if not names:
        print(f"no case matches {a.case!r}", file=sys.stderr)
        return 2
    root = a.keep or Path(tempfile.mkdtemp(prefix=prefix))
    results = {}
    counts = dict.fromkeys(OUTCOMES, 0)
    t0 = time.monotonic()
    for c in names:
        t = time.monotonic()
        status, details = judge(c, *run_case(c, root))
        dt = time.monotonic() - t
        if status not in counts:
            status, details = "fail", [f"unknown outcome {status!r}"] + details
        results[c] = {"status": status, "seconds": round(dt, 1), "details": details[:20], "count": len(details)}
        counts[status] += 1
        print(f"{status:20} {c} ({dt:.0f} s)", flush=True)
        for line in details[:10]:
            print(f"    {line}", flush=True)
        if len(details) > 10:
            print(f"    ... and {len(details) - 10} more", flush=True)
    total = time.monotonic() - t0
    print(
        f"{len(names)} cases in {total:.0f} s: {counts['pass']} pass ({what}), "
        f"{counts['both-refuse']} both refuse (expected), "
        f"{counts['vllm-cpu-unsupported']} vLLM CPU unsupported (expected), {counts['fail']} fail"
    )
    if a.json:
        a.json.write_text(json.dumps({"vllm": VLLM_VERSION, "seconds": round(total), "counts": counts, "cases": results}, indent=1))
    if not a.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if counts["fail"] else 0


def main() -> int:
    return drive(__doc__, cases(), run_case, "safeshard-vllm-", f"safeshard's ranks agree with vLLM {VLLM_VERSION}")


if __name__ == "__main__":
    sys.exit(main())
