"""``safeshard.load_state_dict`` in one process (no torch.distributed): plain tensors filled
whole, straight into their storage or cast, compared with the ``safetensors`` package's
tensors; key_map, tied weights, strict, one ``.safetensors`` file, and the refusals (each
naming the state-dict key and the checkpoint tensor, nothing written)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
st = pytest.importorskip("safetensors.torch")

import safeshard  # noqa: E402


def reference(ckpt: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update(st.load_file(str(f)))
    return out


def same(a: Any, b: Any) -> bool:
    """Bit-equal (the synthetic values include NaNs, which ``torch.equal`` calls unequal)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def empty_like(ref: dict[str, Any], dtype: Any = None) -> dict[str, Any]:
    return {k: torch.full(v.shape, -3, dtype=dtype or v.dtype) for k, v in ref.items()}


def test_plain_tensors_are_filled_in_place(checkpoints: Any) -> None:
    ckpt = checkpoints("llama-tiny")
    ref = reference(ckpt)
    sd = empty_like(ref)
    ptrs = {k: v.data_ptr() for k, v in sd.items()}
    report = safeshard.load_state_dict(sd, ckpt)
    assert report.tensors == len(ref) and not report.missing and not report.skipped
    for k, v in ref.items():
        assert same(sd[k], v), k
        assert sd[k].data_ptr() == ptrs[k], f"{k} was replaced, not filled"
    # Every byte read once: at least the tensors' bytes, at most page-rounding more.
    total = sum(v.numel() * v.element_size() for v in ref.values())
    assert total <= report.bytes_read <= total + 4096 * (len(ref) + 8)
    assert report.seconds > 0


def test_another_dtype_is_cast_as_copy_does(checkpoints: Any) -> None:
    ckpt = checkpoints("llama-tiny")
    ref = reference(ckpt)
    sd = empty_like(ref, torch.float32)
    # A non-contiguous target is staged and cast too.
    name = next(k for k, v in ref.items() if v.dim() == 2)
    sd[name] = torch.empty(ref[name].shape[1], ref[name].shape[0]).t()
    safeshard.load_state_dict(sd, ckpt)
    for k, v in ref.items():
        want = torch.empty_like(sd[k]).copy_(v)
        assert same(sd[k], want), k


def test_key_map_tied_weights_and_strict(checkpoints: Any) -> None:
    ckpt = checkpoints("llama-tiny")
    ref = reference(ckpt)
    embed = "model.embed_tokens.weight"
    sd = {f"model.{k}": v for k, v in empty_like(ref).items()}
    # A callable: strip our prefix; None skips.
    report = safeshard.load_state_dict(
        sd, ckpt, key_map=lambda k: None if k.endswith("norm.weight") else k[len("model."):])
    assert sorted(report.skipped) == sorted(f"model.{k}" for k in ref if k.endswith("norm.weight"))
    assert same(sd[f"model.{embed}"], ref[embed])
    # Tied: a second key sharing the embedding's storage counts as loaded though the
    # checkpoint has no tensor of its name; two keys may read one checkpoint tensor.
    w = torch.empty_like(ref[embed])
    copy = torch.empty_like(ref[embed])
    sd2 = {embed: w, "tied.head": w, "copy": copy}
    report = safeshard.load_state_dict(sd2, ckpt, key_map={"copy": embed})
    assert report.tensors == 3 and same(w, ref[embed]) and same(copy, ref[embed])
    # strict=False: missing keys listed and left alone.
    keep = torch.full((3,), 5.0)
    report = safeshard.load_state_dict({"nope": keep, embed: w}, ckpt, strict=False)
    assert report.missing == ["nope"] and report.tensors == 1 and torch.equal(keep, torch.full((3,), 5.0))


def test_refusals_name_key_and_checkpoint_tensor_and_write_nothing(checkpoints: Any) -> None:
    ckpt = checkpoints("llama-tiny")
    ref = reference(ckpt)
    embed = "model.embed_tokens.weight"

    def refused(sd: dict[str, Any], match: str, **kw: Any) -> None:
        before = {k: v.clone() for k, v in sd.items() if isinstance(v, torch.Tensor)}
        with pytest.raises(safeshard.SafeshardError, match=match):
            safeshard.load_state_dict(sd, ckpt, **kw)
        for k, v in before.items():
            assert same(sd[k], v), f"{k} was written"

    good = empty_like(ref)
    refused({**good, "x": torch.zeros(2)}, r"state dict key 'x' \(checkpoint tensor 'x'\): "
            r"the checkpoint has no such tensor")
    refused({**good, "x": torch.zeros(2)}, "checkpoint tensor 'model.nope'",
            key_map={"x": "model.nope"})
    bad = {**good, embed: torch.zeros(ref[embed].shape[0] + 1, ref[embed].shape[1])}
    refused(bad, f"state dict key '{embed}'.*shape .*the checkpoint's is")
    refused({**good, "y": 3}, "'y': a int, not a tensor")
    refused(good, "key_map: expected None, a dict or a callable", key_map=3)
    refused(good, "gave a int", key_map=lambda k: 3)
    refused(good, "share", share="everything")


def test_one_safetensors_file_and_a_read_only_target(tmp_path: Path) -> None:
    ref = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
           "b": torch.arange(5, dtype=torch.int64)}
    path = tmp_path / "one.safetensors"
    st.save_file(ref, str(path))
    sd = {k: torch.zeros_like(v) for k, v in ref.items()}
    report = safeshard.load_state_dict(sd, path)
    assert report.tensors == 2 and all(same(sd[k], v) for k, v in ref.items())


def test_dtensors_in_a_gloo_world_of_one(checkpoints: Any, tmp_path: Path) -> None:
    """The collective path (torch.distributed initialized): a Replicate DTensor is filled,
    a Partial one refused naming its key."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate

    ckpt = checkpoints("llama-tiny")
    ref = reference(ckpt)
    name = "model.norm.weight"
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        t = DTensor.from_local(torch.zeros_like(ref[name]), mesh, [Replicate()])
        for share in ("none", "broadcast", "read-once"):
            t.to_local().zero_()
            safeshard.load_state_dict({name: t}, ckpt, share=share)
            assert same(t.to_local(), ref[name]), share
        p = DTensor.from_local(torch.zeros_like(ref[name]), mesh, [Partial()])
        with pytest.raises(safeshard.SafeshardError, match=f"key '{name}'.*Partial"):
            safeshard.load_state_dict({name: p}, ckpt)
        assert not p.to_local().any()
    finally:
        dist.destroy_process_group()


def test_reindex_reads_rows_in_another_order(checkpoints: Any) -> None:
    ckpt = checkpoints("llama-tiny")
    ref = reference(ckpt)
    name = "model.layers.0.self_attn.q_proj.weight"
    rows = ref[name].shape[0]
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(5))
    target = torch.empty_like(ref[name])
    safeshard.load_state_dict({"wq": target}, ckpt, key_map={"wq": safeshard.Reindex(name, 0, order)})
    assert same(target, ref[name][order])
    with pytest.raises(safeshard.SafeshardError, match="Reindex along dim 0 needs"):
        safeshard.load_state_dict(
            {"wq": target}, ckpt, key_map={"wq": safeshard.Reindex(name, 0, [0, 1])})
