"""vLLM names and a stored head that vLLM re-ties (docs/vllm.md, "Re-tied heads"): a tied
config whose checkpoint stores an exact copy of its (NaN-free) embedding as lm_head.weight.
Every way ``Plan.load`` hands a rank out (its own arena, ``out=``, ``into=``) holds the pair
once, under ``lm_head.weight``, and names the embedding in ``Rank.aliases``; expected bytes
are sliced from the files read by the ``safetensors`` package."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import safetensors
from conftest import read_full

import safeshard

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _write(path: Path, tensors: dict[str, tuple[str, list[int], bytes]]) -> None:
    """A safetensors file (format as the safetensors package documents it)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    at = 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + len(data)]}
        at += len(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(len(h).to_bytes(8, "little") + h + b"".join(t[2] for t in tensors.values()))


def _tied_copy(root: Path) -> Path:
    d = root / "tied-copy"
    safeshard.synth(d, "llama-tiny-tied")
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    f = d / index["weight_map"][EMB]
    tensors = {
        n: (v["dtype"], list(v["shape"]), bytes(v["data"]))
        for n, v in safetensors.deserialize(f.read_bytes())
    }
    dtype, shape, data = tensors[EMB]
    assert dtype == "BF16"
    bits = np.frombuffer(data, dtype=np.uint16).copy()
    nan = (bits & 0x7F80 == 0x7F80) & (bits & 0x007F != 0)
    assert nan.any(), "the synthetic embedding holds NaNs"
    bits[nan] = 0  # torch.equal never equals a NaN: vLLM would keep the copy apart
    tensors[EMB] = (dtype, shape, bits.tobytes())
    _write(f, tensors)
    _write(d / "lm_head.safetensors", {HEAD: tensors[EMB]})
    index["weight_map"][HEAD] = "lm_head.safetensors"
    index_path.write_text(json.dumps(index))
    return d


def _shard(emb: np.ndarray, tp: int, r: int) -> np.ndarray:
    """Rank r's rows as vLLM pads them: vocab to a multiple of 64, split evenly, zeros past it."""
    vocab = emb.shape[0]
    per = -(-vocab // 64) * 64 // tp
    out = np.zeros((per, *emb.shape[1:]), dtype=emb.dtype)
    lo, hi = min(r * per, vocab), min((r + 1) * per, vocab)
    out[: hi - lo] = emb[lo:hi]
    return out


def test_a_retied_head_is_held_once_on_every_load_path(tmp_path: Path) -> None:
    d = _tied_copy(tmp_path)
    _, full = read_full(d)
    emb = full[EMB][1]
    plan = safeshard.plan(d, tp=2, names="vllm")
    for r in range(2):
        info = plan.rank(r)
        assert {EMB, HEAD} <= {t.name for t in info.tensors}, "the plan lists both"
        want = _shard(emb, 2, r).tobytes()
        rank = plan.load(r)
        assert rank.aliases == {EMB: HEAD}
        assert HEAD in rank and EMB not in rank
        assert rank.numpy()[HEAD].tobytes() == want
        out = np.empty(info.arena_bytes, dtype=np.uint8)
        rank = plan.load(r, out=out)
        assert rank.aliases == {EMB: HEAD} and EMB not in rank
        assert rank.numpy()[HEAD].tobytes() == want
        size = {t.name: t.nbytes for t in info.tensors}
        for name in (HEAD, EMB):
            buf = np.zeros(size[name], dtype=np.uint8)
            rank = plan.load(r, into={name: buf})
            assert rank.aliases == {EMB: HEAD}
            assert EMB not in rank
            assert buf.tobytes() == want, f"rank {r}: {name} in the caller's buffer"
            if name == EMB:
                assert rank.numpy()[HEAD].tobytes() == want
