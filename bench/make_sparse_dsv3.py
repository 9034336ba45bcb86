#!/usr/bin/env python3
"""Writes a sparse DeepSeek-V3-shaped checkpoint (tensor names, dtypes and shapes of the real
one: 61 layers + 1 MTP layer, 256 routed experts, FP8 E4M3 weights with F32 128x128 block
scales) as ~163 safetensors files plus model.safetensors.index.json. Tensor data are file
holes, so the ~690 GB checkpoint uses almost no disk. Used to time `safeshard inspect`.

usage: python3 bench/make_sparse_dsv3.py OUT_DIR [FILES]
"""
import json
import math
import os
import struct
import sys

H, INTER, MOE_INTER, VOCAB = 7168, 18432, 2048, 129280
Q_LORA, KV_LORA, HEADS, NOPE, ROPE, V_HEAD = 1536, 512, 128, 128, 64, 128
LAYERS, DENSE, EXPERTS = 61, 3, 256
BITS = {"BF16": 16, "F32": 32, "F8_E4M3": 8}


def fp8(name, out_f, in_f):
    """An FP8 weight and its block scale."""
    yield name + ".weight", "F8_E4M3", [out_f, in_f]
    yield name + ".weight_scale_inv", "F32", [math.ceil(out_f / 128), math.ceil(in_f / 128)]


def layer(i):
    p = f"model.layers.{i}."
    yield p + "input_layernorm.weight", "BF16", [H]
    yield p + "post_attention_layernorm.weight", "BF16", [H]
    a = p + "self_attn."
    yield from fp8(a + "q_a_proj", Q_LORA, H)
    yield a + "q_a_layernorm.weight", "BF16", [Q_LORA]
    yield from fp8(a + "q_b_proj", HEADS * (NOPE + ROPE), Q_LORA)
    yield from fp8(a + "kv_a_proj_with_mqa", KV_LORA + ROPE, H)
    yield a + "kv_a_layernorm.weight", "BF16", [KV_LORA]
    yield from fp8(a + "kv_b_proj", HEADS * (NOPE + V_HEAD), KV_LORA)
    yield from fp8(a + "o_proj", H, HEADS * V_HEAD)
    m = p + "mlp."
    if i < DENSE:
        yield from fp8(m + "gate_proj", INTER, H)
        yield from fp8(m + "up_proj", INTER, H)
        yield from fp8(m + "down_proj", H, INTER)
        return
    yield m + "gate.weight", "BF16", [EXPERTS, H]
    yield m + "gate.e_score_correction_bias", "F32", [EXPERTS]
    for e in range(EXPERTS):
        x = f"{m}experts.{e}."
        yield from fp8(x + "gate_proj", MOE_INTER, H)
        yield from fp8(x + "up_proj", MOE_INTER, H)
        yield from fp8(x + "down_proj", H, MOE_INTER)
    s = m + "shared_experts."
    yield from fp8(s + "gate_proj", MOE_INTER, H)
    yield from fp8(s + "up_proj", MOE_INTER, H)
    yield from fp8(s + "down_proj", H, MOE_INTER)


def tensors():
    yield "model.embed_tokens.weight", "BF16", [VOCAB, H]
    for i in range(LAYERS + 1):  # layer 61 is the MTP layer
        yield from layer(i)
        if i == LAYERS:
            p = f"model.layers.{i}."
            yield p + "enorm.weight", "BF16", [H]
            yield p + "hnorm.weight", "BF16", [H]
            yield p + "eh_proj.weight", "BF16", [H, 2 * H]
            yield p + "shared_head.norm.weight", "BF16", [H]
            yield p + "shared_head.head.weight", "BF16", [VOCAB, H]
    yield "model.norm.weight", "BF16", [H]
    yield "lm_head.weight", "BF16", [VOCAB, H]


def nbytes(dtype, shape):
    return math.prod(shape) * BITS[dtype] // 8


def main():
    out = sys.argv[1]
    nfiles = int(sys.argv[2]) if len(sys.argv) > 2 else 163
    os.makedirs(out, exist_ok=True)
    all_t = list(tensors())
    total = sum(nbytes(d, s) for _, d, s in all_t)
    per_file = total / nfiles
    groups, cur, size = [], [], 0
    for t in all_t:
        cur.append(t)
        size += nbytes(t[1], t[2])
        if size >= per_file * (len(groups) + 1) and len(groups) < nfiles - 1:
            groups.append(cur)
            cur = []
    groups.append(cur)
    weight_map = {}
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        header, pos = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, shape in group:
            n = nbytes(dtype, shape)
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
            pos += n
            weight_map[name] = fname
        js = json.dumps(header, separators=(",", ":")).encode()
        js += b" " * (-len(js) % 8)
        with open(os.path.join(out, fname), "wb") as f:
            f.write(struct.pack("<Q", len(js)))
            f.write(js)
            f.truncate(8 + len(js) + pos)  # the data is a hole
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"architectures": ["DeepseekV3ForCausalLM"], "hidden_size": H,
                   "num_hidden_layers": LAYERS, "n_routed_experts": EXPERTS}, f, indent=2)
    print(f"{len(all_t)} tensors, {len(groups)} files, {total} bytes")


if __name__ == "__main__":
    main()
