"""An independent numpy model of what each vLLM rank holds, written from vLLM's partition
rules (``linear.py``, ``vocab_parallel_embedding.py``, ``fused_moe``,
``distributed/utils.py::get_pp_indices``) and vLLM 0.33's model classes (which modules each
pipeline stage builds). It never calls safeshard: the tests compare every
loaded tensor with ``materialize(full tensor read by the safetensors package, slice)``.

A slice is ``None`` (the whole tensor) or ``(dim, parts)`` with parts ``("take", start, len)``
or ``("zeros", n)`` concatenated along ``dim``. Global rank = (dp*pp + pp_rank)*tp + tp_rank.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

VOCAB_PAD = 64
BLOCK = 128

Part = tuple  # ("take", start, len) | ("zeros", n)
Slice = tuple[int, list[Part]] | None


class NoRule(Exception):
    """The model refuses the split (vLLM would refuse it too) or knows no rule."""


def even(n: int, tp: int, r: int, what: str) -> Part:
    if n % tp:
        raise NoRule(f"{what}: {n} does not divide by tp {tp}")
    return ("take", r * (n // tp), n // tp)


def vocab(v: int, tp: int, r: int) -> Slice:
    vp = -(-v // VOCAB_PAD) * VOCAB_PAD
    if vp % tp:
        raise NoRule(f"padded vocab {vp} does not divide by tp {tp}")
    per = vp // tp
    a, b = min(r * per, v), min((r + 1) * per, v)
    parts: list[Part] = []
    if b > a:
        parts.append(("take", a, b - a))
    if per > b - a:
        parts.append(("zeros", per - (b - a)))
    return (0, parts)


def kv_part(nkv: int, hd: int, tp: int, r: int, base: int) -> Part:
    if tp >= nkv:
        if tp % nkv:
            raise NoRule(f"tp {tp} not a multiple of {nkv} kv heads")
        return ("take", base + (r // (tp // nkv)) * hd, hd)
    if nkv % tp:
        raise NoRule(f"{nkv} kv heads do not divide by tp {tp}")
    per = nkv // tp
    return ("take", base + r * per * hd, per * hd)


def pp_counts(layers: int, pp: int) -> list[int]:
    if pp > layers:
        raise NoRule(f"{pp} stages for {layers} layers")
    parts = [layers // pp] * pp
    for i in range(2, layers % pp + 2):
        parts[-i] += 1
    return parts


def stage_of(layer: int, counts: list[int]) -> int:
    end = 0
    for s, c in enumerate(counts):
        end += c
        if layer < end:
            return s
    return len(counts) - 1


def layer_of(name: str) -> int | None:
    m = re.match(r"^(?:model\.layers|h)\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def expert_of(name: str) -> int | None:
    m = re.search(r"\.experts\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def tail_of(name: str) -> str:
    return re.sub(r"^(?:model\.layers|h)\.\d+\.", "", name)


def expert_owner(e: int, n: int, ep: int) -> int:
    base, rem = divmod(n, ep)
    big = rem * (base + 1)
    return e // (base + 1) if e < big else rem + (e - big) // max(base, 1)


def llama_family(arch: str, cfg: dict[str, Any], name: str, shape: list[int], tp: int, r: int) -> Slice | str:
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads", nh)
    hd = cfg.get("head_dim", cfg["hidden_size"] // nh)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return vocab(shape[0], tp, r)
    if name == "model.norm.weight":
        return None
    t = tail_of(name)
    if t in ("self_attn.q_proj.weight", "self_attn.q_proj.bias"):
        return (0, [even(shape[0], tp, r, name)])
    if t in ("self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias"):
        return (0, [kv_part(nkv, hd, tp, r, 0)])
    if t == "self_attn.o_proj.weight":
        return (1, [even(shape[1], tp, r, name)])
    if t == "self_attn.qkv_proj.weight" and arch == "Phi3ForCausalLM":
        q, kv = nh * hd, nkv * hd
        return (0, [even(q, tp, r, name), kv_part(nkv, hd, tp, r, q), kv_part(nkv, hd, tp, r, q + kv)])
    if t == "mlp.gate_up_proj.weight" and arch == "Phi3ForCausalLM":
        i = shape[0] // 2
        _, s, n = even(i, tp, r, name)
        return (0, [("take", s, n), ("take", i + s, n)])
    if t in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight"):
        return (0, [even(shape[0], tp, r, name)])
    if t in ("mlp.down_proj.weight", "mlp.shared_expert.down_proj.weight"):
        return (1, [even(shape[1], tp, r, name)])
    if t in ("input_layernorm.weight", "post_attention_layernorm.weight", "block_sparse_moe.gate.weight", "mlp.gate.weight", "mlp.shared_expert_gate.weight"):
        return None
    if t == "self_attn.rotary_emb.inv_freq":
        return "skip"
    if expert_of(name) is not None:
        if t.endswith((".w1.weight", ".w3.weight", ".gate_proj.weight", ".up_proj.weight")):
            return (0, [even(shape[0], tp, r, name)])
        if t.endswith((".w2.weight", ".down_proj.weight")):
            return (1, [even(shape[1], tp, r, name)])
    raise NoRule(f"{name}: no reference rule")


def block_split(shape: list[int], dim: int, tp: int, r: int, name: str) -> Slice:
    p = even(shape[dim], tp, r, name)
    if tp > 1 and (shape[dim] // tp) % BLOCK:
        raise NoRule(f"{name}: partition not whole {BLOCK}-blocks (vLLM refuses)")
    return (dim, [p])


def block_scale(extent: int, dim: int, tp: int, r: int, name: str) -> Slice:
    if extent % tp:
        raise NoRule(f"{name}: {extent} does not divide by tp {tp}")
    per = extent // tp
    if tp > 1 and per % BLOCK:
        raise NoRule(f"{name}: partition not whole {BLOCK}-blocks (vLLM refuses)")
    blocks = -(-per // BLOCK)
    return (dim, [("take", r * blocks, blocks)])


def deepseek(name: str, shape: list[int], tp: int, r: int) -> Slice | str:
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return vocab(shape[0], tp, r)
    if name == "model.norm.weight":
        return None
    t = tail_of(name)
    is_scale = t.endswith(".weight_scale_inv")
    module = re.sub(r"\.(weight_scale_inv|weight)$", "", t)
    rep = {
        "input_layernorm", "post_attention_layernorm", "self_attn.q_a_layernorm",
        "self_attn.kv_a_layernorm", "self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa",
        "mlp.gate", "mlp.gate.e_score_correction_bias",
    }
    col = {"self_attn.q_b_proj", "self_attn.kv_b_proj", "mlp.gate_proj", "mlp.up_proj",
           "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"}
    row = {"self_attn.o_proj", "mlp.down_proj", "mlp.shared_experts.down_proj"}
    if module in rep or t == "mlp.gate.e_score_correction_bias":
        return None
    if module in col or (expert_of(name) is not None and module.endswith((".gate_proj", ".up_proj"))):
        return block_scale(shape[0] * BLOCK, 0, tp, r, name) if is_scale else block_split(shape, 0, tp, r, name)
    if module in row or (expert_of(name) is not None and module.endswith(".down_proj")):
        return block_scale(shape[1] * BLOCK, 1, tp, r, name) if is_scale else block_split(shape, 1, tp, r, name)
    raise NoRule(f"{name}: no reference rule")


def gpt2(cfg: dict[str, Any], name: str, shape: list[int], tp: int, r: int) -> Slice | str:
    h = cfg["n_embd"]
    if name == "wte.weight":
        return vocab(shape[0], tp, r)
    if name in ("wpe.weight", "ln_f.weight", "ln_f.bias"):
        return None
    t = tail_of(name)
    if t in ("attn.c_attn.weight", "attn.c_attn.bias"):
        dim = 1 if t.endswith("weight") else 0
        _, s, n = even(h, tp, r, name)
        return (dim, [("take", k * h + s, n) for k in range(3)])
    if t in ("attn.c_proj.weight", "mlp.c_proj.weight"):
        return (0, [even(shape[0], tp, r, name)])
    if t in ("attn.c_proj.bias", "mlp.c_proj.bias", "ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias"):
        return None
    if t == "mlp.c_fc.weight":
        return (1, [even(shape[1], tp, r, name)])
    if t == "mlp.c_fc.bias":
        return (0, [even(shape[0], tp, r, name)])
    if t in ("attn.bias", "attn.masked_bias"):
        return "skip"
    raise NoRule(f"{name}: no reference rule")


def expected(cfg: dict[str, Any], tp: int, pp: int, dp: int, ep: int, name: str, shape: list[int]) -> list[tuple[int, Slice]]:
    """(global rank, slice) for every rank holding some of ``name``, in rank order."""
    arch = cfg["architectures"][0]
    is_gpt2 = arch == "GPT2LMHeadModel"
    layers = cfg["n_layer"] if is_gpt2 else cfg["num_hidden_layers"]
    local = name.removeprefix("transformer.") if is_gpt2 else name
    # vLLM 0.33 unties a tied config whose checkpoint stores lm_head (the synthetic config
    # key `_checkpoint_has_lm_head` says so); DeepSeek never ties.
    stored_head = cfg.get("_checkpoint_has_lm_head", False)
    tied = cfg.get("tie_word_embeddings", is_gpt2) and not stored_head and arch != "DeepseekV3ForCausalLM"
    # MixtralModel, Qwen2MoeModel and GPT-2 build embeddings, final norm and lm_head on every
    # pipeline stage (no PPMissingLayer); the others only where they are used.
    everywhere = arch in ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "GPT2LMHeadModel")
    heads = cfg["n_head"] if is_gpt2 else cfg["num_attention_heads"]
    if heads % tp:
        raise NoRule(f"{heads} heads do not divide by tp {tp}")
    layer = layer_of(local)
    ends = ("model.embed_tokens.weight", "wte.weight", "wpe.weight", "model.norm.weight",
            "lm_head.weight", "ln_f.weight", "ln_f.bias")
    if layer is not None:
        if layer >= layers:
            if arch == "DeepseekV3ForCausalLM":
                return []  # the MTP layer is not part of vLLM's main model
            raise NoRule(f"{name}: layer past num_hidden_layers")
        stage: Any = ("layer", layer)
    elif everywhere and local in ends:
        stage = "all"
    elif local == "model.embed_tokens.weight":
        stage = "first+last" if tied else "first"
    elif local in ("model.norm.weight", "lm_head.weight"):
        stage = "last"
    else:
        raise NoRule(f"{name}: no reference rule")
    counts = pp_counts(layers, pp)

    def holds(p: int) -> bool:
        if isinstance(stage, tuple):
            return stage_of(stage[1], counts) == p
        if stage == "all":
            return True
        return (p == 0 and stage.startswith("first")) or (p == pp - 1 and stage.endswith("last"))

    expert = expert_of(local)
    out: list[tuple[int, Slice]] = []
    for d in range(dp):
        for p in range(pp):
            if not holds(p):
                continue
            for t in range(tp):
                rank = (d * pp + p) * tp + t
                if expert is not None and ep > 1:
                    n = {"MixtralForCausalLM": "num_local_experts", "Qwen2MoeForCausalLM": "num_experts",
                         "DeepseekV3ForCausalLM": "n_routed_experts"}[arch]
                    if expert_owner(expert, cfg[n], tp * dp) == d * tp + t:
                        out.append((rank, None))
                    continue
                if is_gpt2:
                    s = gpt2(cfg, local, shape, tp, t)
                elif arch == "DeepseekV3ForCausalLM":
                    s = deepseek(local, shape, tp, t)
                else:
                    s = llama_family(arch, cfg, local, shape, tp, t)
                if s == "skip":
                    return []
                out.append((rank, s))  # type: ignore[arg-type]
    return out


def local_shape(shape: list[int], s: Slice) -> list[int]:
    if s is None:
        return list(shape)
    dim, parts = s
    out = list(shape)
    out[dim] = sum(p[2] if p[0] == "take" else p[1] for p in parts)
    return out


def materialize(full: np.ndarray, s: Slice) -> np.ndarray:
    """The rank-local array from the full one (any dtype; zeros for vocab padding)."""
    if s is None:
        return full
    dim, parts = s
    pieces = []
    for p in parts:
        if p[0] == "take":
            _, start, n = p
            assert start + n <= full.shape[dim], (p, full.shape)
            pieces.append(np.take(full, np.arange(start, start + n), axis=dim))
        else:
            zshape = list(full.shape)
            zshape[dim] = p[1]
            pieces.append(np.zeros(zshape, dtype=full.dtype))
    return np.concatenate(pieces, axis=dim)
