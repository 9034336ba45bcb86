"""One rank of the trainer tests (``test_trainer.py`` runs it with ``torchrun`` on 4 gloo
processes): tiny ``transformers`` Llama models parallelized as trainers do (FSDP2, TP, 2-D
dp x tp), filled with ``safeshard.load_state_dict`` and compared, bit for bit, with

- the reference: the same model built from the checkpoint's full tensors read by the
  ``safetensors`` package, then parallelized the same way (what the trainer would hold had
  it loaded the whole checkpoint on every rank and sharded it), and
- ``torch.distributed.checkpoint.load`` with ``HuggingFaceStorageReader``.

Usage: trainer_job.py CHECKPOINT TIED_CHECKPOINT. Prints ``ok <case>`` lines (rank 0);
any mismatch raises, which makes torchrun fail.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)
from torch.distributed.tensor.placement_types import _StridedShard
from transformers import AutoConfig, LlamaForCausalLM

import safeshard

SHARES = ("none", "broadcast", "read-once")


def full_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, read by the safetensors package."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update(safetensors.torch.load_file(str(f)))
    return out


def tp_plan(model: torch.nn.Module) -> dict[str, Any]:
    plan: dict[str, Any] = {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
        "lm_head": ColwiseParallel(output_layouts=Replicate()),
    }
    for i in range(len(model.model.layers)):
        p = f"model.layers.{i}"
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                  "mlp.up_proj"):
            plan[f"{p}.{m}"] = ColwiseParallel()
        for m in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"{p}.{m}"] = RowwiseParallel()
    return plan


def build(ckpt: Path, layout: str, dtype: torch.dtype, weights: dict[str, torch.Tensor] | None,
          ) -> torch.nn.Module:
    """The model of ``ckpt`` in ``dtype``, with ``weights`` (else a random init, then
    overwritten with a sentinel so nothing stale can pass), parallelized by ``layout``."""
    cfg = AutoConfig.from_pretrained(ckpt)
    torch.manual_seed(1234)
    model = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():
        if weights is not None:
            missing, unexpected = model.load_state_dict(
                {k: v.to(dtype) for k, v in weights.items()}, strict=False)
            assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
        else:
            for p in model.parameters():
                p.fill_(-7)
    world = dist.get_world_size()
    if layout == "fsdp":
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif layout == "tp":
        mesh = init_device_mesh("cpu", (world,))
        parallelize_module(model, mesh, tp_plan(model))
    elif layout == "2d":
        mesh2 = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh2["tp"], tp_plan(model))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh2["dp"])
        fully_shard(model, mesh=mesh2["dp"])
    else:
        raise ValueError(layout)
    return model


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def compare(case: str, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys(), (case, sorted(set(got) ^ set(want)))
    for k in want:
        a, b = local(got[k]), local(want[k])
        assert a.dtype == b.dtype and a.shape == b.shape, (case, k, a.shape, b.shape)
        # Bit-equal: compare the bytes, not the values (NaN, -0.0).
        same = torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
        assert same, f"{case}: rank {dist.get_rank()}: {k} differs"


def placements_seen(sd: dict[str, torch.Tensor]) -> set[str]:
    return {str(tuple(v.placements)) for v in sd.values() if isinstance(v, DTensor)}


def say(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


def check_layout(ckpt: Path, full: dict[str, torch.Tensor], layout: str, dtype: torch.dtype,
                 tied: bool = False) -> None:
    case = f"{layout} {str(dtype).removeprefix('torch.')}{' tied' if tied else ''}"
    want = build(ckpt, layout, dtype, full).state_dict()
    # TP gives the tied head its own DTensor (the tie is lost): both keys read the embedding.
    untied = tied and local(want["lm_head.weight"]).data_ptr() != local(
        want["model.embed_tokens.weight"]).data_ptr()
    key_map = {"lm_head.weight": "model.embed_tokens.weight"} if untied else None
    read: dict[str, int] = {}
    for share in SHARES:
        model = build(ckpt, layout, dtype, None)
        report = safeshard.load_state_dict(model.state_dict(), ckpt, share=share, key_map=key_map)
        total = torch.tensor([report.bytes_read], dtype=torch.int64)
        dist.all_reduce(total)
        read[share] = int(total.item())
        compare(f"{case} share={share}", model.state_dict(), want)
        assert report.tensors == len(want), (report, len(want))
        assert not report.missing and not report.skipped
        if share == "none":
            # Every local element's checkpoint bytes (bf16) are read; tied entries once.
            shards = {local(v).data_ptr(): local(v).numel() for v in model.state_dict().values()}
            assert report.bytes_read >= 2 * sum(shards.values()), report
    # Replicated tensors (TP's norms) are read once by the share modes.
    replicated = any(not isinstance(v, DTensor) for v in want.values())
    if replicated:
        assert read["broadcast"] < read["none"] and read["read-once"] < read["none"], read
    else:
        assert read["read-once"] <= read["none"], read
    say(f"ok {case}: {sorted(placements_seen(want))}{' (head via key_map)' if untied else ''} "
        f"read {read}")
    # torch DCP with the Hugging Face reader puts the same bytes there.
    model = build(ckpt, layout, dtype, None)
    sd = model.state_dict()
    if tied:  # DCP has no key_map: the head is left out (and compared only when tied)
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    dcp.load(sd, storage_reader=dcp.HuggingFaceStorageReader(str(ckpt)))
    got = model.state_dict()
    if untied:
        got.pop("lm_head.weight")
        want = {k: v for k, v in want.items() if k != "lm_head.weight"}
    compare(f"{case} dcp", got, want)
    say(f"ok {case}: equals dcp.load(HuggingFaceStorageReader)")


def check_key_map(ckpt: Path, full: dict[str, torch.Tensor]) -> None:
    want = build(ckpt, "fsdp", torch.bfloat16, full).state_dict()
    model = build(ckpt, "fsdp", torch.bfloat16, None)
    renamed = {f"m.{k}": v for k, v in model.state_dict().items()}
    report = safeshard.load_state_dict(renamed, ckpt, key_map=lambda k: k[2:])
    compare("key_map callable", model.state_dict(), want)
    assert report.tensors == len(want)
    # A partial dict: unnamed keys keep their name; a callable's None skips.
    model = build(ckpt, "tp", torch.bfloat16, None)
    want = build(ckpt, "tp", torch.bfloat16, full).state_dict()
    sd = model.state_dict()
    sd = {("head" if k == "lm_head.weight" else k): v for k, v in sd.items()}
    report = safeshard.load_state_dict(sd, ckpt, key_map={"head": "lm_head.weight"})
    compare("key_map dict", model.state_dict(), want)
    report = safeshard.load_state_dict(
        model.state_dict(), ckpt, key_map=lambda k: None if "norm" in k else k)
    assert sorted(report.skipped) == sorted(k for k in want if "norm" in k), report.skipped
    say("ok key_map: callable, partial dict, None skips")


def check_lone_strided(ckpt: Path, full: dict[str, torch.Tensor]) -> None:
    """A 1-D mesh with a lone _StridedShard: the local shard is several separate row
    blocks. safeshard must put exactly distribute_tensor's shard there."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    name = "model.embed_tokens.weight"
    src = full[name]
    pl = [_StridedShard(0, split_factor=2)]
    want = distribute_tensor(src, mesh, pl, src_data_rank=None)
    got = distribute_tensor(torch.full_like(src, -7), mesh, pl, src_data_rank=None)
    safeshard.load_state_dict({name: got}, ckpt)
    compare("lone _StridedShard", {name: got}, {name: want})
    # DCP's reader treats each local shard as one box: record what it does, do not rely on it.
    other = distribute_tensor(torch.full_like(src, -7), mesh, pl, src_data_rank=None)
    try:
        dcp.load({name: other}, storage_reader=dcp.HuggingFaceStorageReader(str(ckpt)))
        dcp_right = torch.equal(local(other), local(want))
    except Exception as e:  # noqa: BLE001 - DCP may also refuse it
        dcp_right = f"raised {type(e).__name__}"  # type: ignore[assignment]
    say(f"ok lone _StridedShard (dcp.load right: {dcp_right})")


def titan_key_map(cfg: Any) -> Callable[[str], Any]:
    """torchtitan Llama3 names -> Hugging Face names, wq/wk with their RoPE row order as a
    safeshard.Reindex (docs/trainers.md has the same function)."""
    head_dim = cfg.hidden_size // cfg.num_attention_heads

    def rope_rows(heads: int) -> torch.Tensor:
        return torch.arange(heads * head_dim).view(heads, 2, head_dim // 2).transpose(1, 2).reshape(-1)

    top = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    layer = {"attention.wv.weight": "self_attn.v_proj.weight",
             "attention.wo.weight": "self_attn.o_proj.weight",
             "feed_forward.w1.weight": "mlp.gate_proj.weight",
             "feed_forward.w3.weight": "mlp.up_proj.weight",
             "feed_forward.w2.weight": "mlp.down_proj.weight",
             "attention_norm.weight": "input_layernorm.weight",
             "ffn_norm.weight": "post_attention_layernorm.weight"}
    q, k = rope_rows(cfg.num_attention_heads), rope_rows(cfg.num_key_value_heads)

    def key_map(key: str) -> Any:
        if key in top:
            return top[key]
        _, i, rest = key.split(".", 2)
        if rest == "attention.wq.weight":
            return safeshard.Reindex(f"model.layers.{i}.self_attn.q_proj.weight", 0, q)
        if rest == "attention.wk.weight":
            return safeshard.Reindex(f"model.layers.{i}.self_attn.k_proj.weight", 0, k)
        return f"model.layers.{i}.{layer[rest]}"

    return key_map


def check_torchtitan(ckpt: Path, full: dict[str, torch.Tensor]) -> None:
    """A torchtitan-named state dict (FSDP-style Shard(0) DTensors): names through key_map,
    wq/wk through a Reindex. The reference applies torchtitan's own from_hf transform
    (its _reverse_permute, written here from its definition) to the full tensors."""
    cfg = AutoConfig.from_pretrained(ckpt)
    n_heads, n_kv, dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size

    def reverse_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
        d1, d2 = w.shape
        return w.view(heads, 2, d1 // heads // 2, d2).transpose(1, 2).reshape(d1, d2)

    titan: dict[str, torch.Tensor] = {"tok_embeddings.weight": full["model.embed_tokens.weight"],
                                      "norm.weight": full["model.norm.weight"],
                                      "output.weight": full["lm_head.weight"]}
    names = {"self_attn.v_proj.weight": "attention.wv.weight",
             "self_attn.o_proj.weight": "attention.wo.weight",
             "mlp.gate_proj.weight": "feed_forward.w1.weight",
             "mlp.up_proj.weight": "feed_forward.w3.weight",
             "mlp.down_proj.weight": "feed_forward.w2.weight",
             "input_layernorm.weight": "attention_norm.weight",
             "post_attention_layernorm.weight": "ffn_norm.weight"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        titan[f"layers.{i}.attention.wq.weight"] = reverse_permute(full[p + "self_attn.q_proj.weight"], n_heads)
        titan[f"layers.{i}.attention.wk.weight"] = reverse_permute(full[p + "self_attn.k_proj.weight"], n_kv)
        for hf, t in names.items():
            titan[f"layers.{i}.{t}"] = full[p + hf]
    assert dim % n_heads == 0
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    want = {k: distribute_tensor(v, mesh, [Shard(0)], src_data_rank=None) for k, v in titan.items()}
    got = {k: distribute_tensor(torch.full_like(v, -7), mesh, [Shard(0)], src_data_rank=None)
           for k, v in titan.items()}
    for share in SHARES:
        report = safeshard.load_state_dict(got, ckpt, key_map=titan_key_map(cfg), share=share)
        compare(f"torchtitan share={share}", got, want)
        assert report.tensors == len(want)
    say("ok torchtitan names via key_map, wq/wk via Reindex")


def expect_failure_everywhere(case: str, call: Callable[[], Any], model: torch.nn.Module,
                              match: str) -> None:
    before = {k: local(v).clone() for k, v in model.state_dict().items()}
    try:
        call()
    except safeshard.SafeshardError as e:
        msg = str(e)
    else:
        raise AssertionError(f"{case}: rank {dist.get_rank()} did not fail")
    assert match in msg, (case, msg)
    for k, v in model.state_dict().items():
        assert torch.equal(local(v), before[k]), f"{case}: {k} was written"
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, msg)
    say(f"ok {case}: every rank failed, nothing written ({gathered[0]!r})")


def check_failures(ckpt: Path) -> None:
    rank = dist.get_rank()
    for share in SHARES:
        model = build(ckpt, "fsdp", torch.bfloat16, None)
        sd: dict[str, Any] = dict(model.state_dict())
        if rank == 1:  # state dicts may differ per rank: only rank 1 has the extra key
            sd["model.extra.weight"] = torch.zeros(4)
        expect_failure_everywhere(
            f"missing tensor share={share}",
            lambda: safeshard.load_state_dict(sd, ckpt, share=share), model, "model.extra.weight")
        model = build(ckpt, "tp", torch.bfloat16, None)
        sd = dict(model.state_dict())
        if rank == 3:
            sd["model.norm.weight"] = torch.zeros(3, dtype=torch.bfloat16)
        expect_failure_everywhere(
            f"shape mismatch share={share}",
            lambda: safeshard.load_state_dict(sd, ckpt, share=share), model, "shape")
    # strict=False: the missing key is listed, the rest loaded.
    model = build(ckpt, "fsdp", torch.bfloat16, None)
    sd = dict(model.state_dict())
    sd["model.extra.weight"] = torch.zeros(4)
    report = safeshard.load_state_dict(sd, ckpt, strict=False)
    assert report.missing == ["model.extra.weight"], report.missing
    say("ok strict=False lists the missing key")


def main() -> None:
    ckpt, tied = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    try:
        full = full_tensors(ckpt)
        for layout in ("fsdp", "tp", "2d"):
            check_layout(ckpt, full, layout, torch.bfloat16)
        check_layout(ckpt, full, "fsdp", torch.float32)
        check_layout(ckpt, full, "2d", torch.float32)
        tied_full = full_tensors(tied)
        check_layout(tied, tied_full, "fsdp", torch.bfloat16, tied=True)
        check_layout(tied, tied_full, "tp", torch.bfloat16, tied=True)
        check_key_map(ckpt, full)
        check_torchtitan(ckpt, full)
        check_lone_strided(ckpt, full)
        check_failures(ckpt)
        say("all ok")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
