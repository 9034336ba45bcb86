"""The API around a load: plan JSON and digests equal to the CLI's, errors, every dtype
bit-exact in torch and numpy, take/iteration, Hugging Face cache paths, progress."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

import safeshard
from conftest import ESIZE, needs_torch, run_cli

HAS_ML_DTYPES = importlib.util.find_spec("ml_dtypes") is not None
# Dtypes numpy has only through ml_dtypes; without it they come back as packed uint8.
RAW_WITHOUT_ML = {"BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}


def test_plan_to_json_equals_cli(checkpoints):
    ckpt = checkpoints("qwen2-moe-tiny")
    plan = safeshard.plan(ckpt, tp=2, pp=2)
    cli = run_cli("plan", str(ckpt), "--tp", "2", "--pp", "2", "--json").stdout
    assert plan.to_json() + "\n" == cli
    doc = json.loads(cli)
    assert plan.world_size == doc["world_size"] == 4
    assert plan.hash == doc["hash"]
    for r, want in enumerate(doc["ranks"]):
        info = plan.rank(r)
        assert info.bytes == want["bytes"] and info.read_bytes == want["read_bytes"]
        assert [(t.name, t.dtype, list(t.shape), t.nbytes) for t in info.tensors] == [
            (t["name"], t["dtype"], t["shape"], t["bytes"]) for t in want["tensors"]
        ]


@pytest.mark.parametrize("io", ["auto", "mmap", "pread"])
def test_digest_equals_cli(checkpoints, io):
    ckpt = checkpoints("deepseek-v3-tiny")
    plan = safeshard.plan(ckpt, tp=1, pp=2)
    out = run_cli("load", str(ckpt), "--pp", "2", "--all-ranks", "--digest", "--json").stdout
    cli = {d["rank"]: d["sha256"] for d in map(json.loads, out.splitlines())}
    for r in range(plan.world_size):
        rank = plan.load(r, io=io)
        assert rank.digest() == cli[r]
        # And independently of the Rust hash: the bytes the numpy views see.
        base = np.from_dlpack(rank._arena)
        assert hashlib.sha256(base.tobytes()).hexdigest() == cli[r]


def test_error_is_the_cli_line(checkpoints):
    ckpt = checkpoints("llama-tiny")
    with pytest.raises(safeshard.SafeshardError) as e:
        safeshard.plan(ckpt, tp=3)
    cli = run_cli("plan", str(ckpt), "--tp", "3", check=False)
    assert cli.returncode == e.value.exit_code == 1
    assert cli.stderr.strip() == f"error: {e.value}"
    assert e.value.kind == "placement"
    assert isinstance(e.value, ValueError)
    assert "\n" not in str(e.value)


def test_error_kinds(checkpoints, tmp_path):
    with pytest.raises(safeshard.SafeshardError) as e:
        safeshard.plan(tmp_path / "missing")
    assert e.value.kind in ("io", "not_a_checkpoint")
    ckpt = checkpoints("llama-tiny")
    with pytest.raises(safeshard.SafeshardError) as e:
        safeshard.plan(ckpt, tp=0)
    # Options are named as the Python keyword, where the CLI says `--tp`.
    assert (e.value.kind, e.value.exit_code) == ("invalid_argument", 2)
    assert str(e.value).startswith("tp ")
    plan = safeshard.plan(ckpt, tp=2)
    with pytest.raises(safeshard.SafeshardError) as e:
        plan.load(2)
    assert e.value.exit_code == 2 and "2" in str(e.value) and "rank" in str(e.value)
    with pytest.raises(safeshard.SafeshardError) as e:
        plan.load(0, io="aio")
    assert e.value.exit_code == 2 and "aio" in str(e.value)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(safeshard.SafeshardError) as e:
        safeshard.plan(bad, spec=str(_replicate_spec(tmp_path)))
    assert e.value.kind == "invalid_file" and str(bad.name) in str(e.value)
    # A checkpoint without config.json: the hint names the keyword argument, not `--spec`.
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ckpt.iterdir():
        if f.name != "config.json":
            (bare / f.name).write_bytes(f.read_bytes())
    with pytest.raises(safeshard.SafeshardError) as e:
        safeshard.plan(bare)
    assert "`spec=`" in str(e.value) and "--spec" not in str(e.value), str(e.value)
    cli = run_cli("plan", str(bare), check=False)
    assert "--spec" in cli.stderr


def test_truncated_file_is_an_error_not_a_crash(checkpoints, tmp_path):
    src = checkpoints("llama-tiny")
    dst = tmp_path / "ck"
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    plan = safeshard.plan(dst, tp=2)
    victim = sorted(dst.glob("*.safetensors"))[-1]
    os.truncate(victim, victim.stat().st_size // 2)
    with pytest.raises(safeshard.SafeshardError) as e:
        plan.load(0)
    assert victim.name in str(e.value)


def _replicate_spec(d: Path) -> Path:
    spec = d / "all.shard"
    spec.write_text("arch Anything\nsplit.** split(dim=0)\n** replicate\n")
    return spec


def _write_all_dtypes(d: Path) -> tuple[Path, dict[str, tuple[str, tuple[int, ...], bytes]]]:
    """A safetensors file with one tensor of every dtype (written by hand, from the format's
    definition), plus F4/F6 packed ones, and a split copy of each byte-sized one."""
    rng = np.random.default_rng(7)
    tensors: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    for dt, es in ESIZE.items():
        shape = (4, 3)
        data = rng.integers(0, 256, size=12 * es, dtype=np.uint8)
        if dt == "BOOL":
            data = data % 2
        tensors[f"full.{dt}"] = (dt, shape, data.tobytes())
        tensors[f"split.{dt}"] = (dt, shape, data.tobytes())
    tensors["full.F4"] = ("F4", (2, 8), rng.integers(0, 256, 8, dtype=np.uint8).tobytes())
    tensors["full.F6_E2M3"] = ("F6_E2M3", (2, 4), rng.integers(0, 256, 6, dtype=np.uint8).tobytes())
    tensors["full.F6_E3M2"] = ("F6_E3M2", (4,), rng.integers(0, 256, 3, dtype=np.uint8).tobytes())
    header, off, blob = {}, 0, b""
    for name, (dt, shape, data) in tensors.items():
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(data)]}
        off += len(data)
        blob += data
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    f = d / "all.safetensors"
    f.write_bytes(struct.pack("<Q", len(h)) + h + blob)
    return f, tensors


@pytest.mark.parametrize("tp", [1, 2])
def test_every_dtype_numpy_bit_exact(tmp_path, tp):
    f, tensors = _write_all_dtypes(tmp_path)
    spec = _replicate_spec(tmp_path)
    plan = safeshard.plan(f, tp=tp, spec=str(spec))
    for r in range(tp):
        arrays = plan.load(r).numpy()
        assert sorted(arrays) == sorted(tensors)
        for name, (dt, shape, data) in tensors.items():
            a = arrays[name]
            want = data
            if name.startswith("split.") and tp > 1:
                per = len(data) // tp  # rows split evenly: rank r holds the r-th block
                want = data[r * per : (r + 1) * per]
                shape = (shape[0] // tp, *shape[1:])
            assert np.ascontiguousarray(a).tobytes() == want, name
            if dt in ("F4", "F6_E2M3", "F6_E3M2") or (not HAS_ML_DTYPES and dt in RAW_WITHOUT_ML):
                assert a.dtype == np.uint8, name
            elif dt == "BF16":
                assert a.dtype.name == "bfloat16"
            elif dt == "F8_E4M3":
                assert a.dtype.name == "float8_e4m3fn"
            if dt in ESIZE and a.dtype != np.uint8:
                assert a.shape == shape, name
            elif dt in ESIZE:
                assert a.shape == (*shape[:-1], shape[-1] * ESIZE[dt]), name


@needs_torch
def test_every_dtype_torch_bit_exact(tmp_path):
    import torch

    f, tensors = _write_all_dtypes(tmp_path)
    rank = safeshard.plan(f, spec=str(_replicate_spec(tmp_path))).load(0)
    got = rank.torch()
    names = {
        "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
        "F8_E8M0": torch.float8_e8m0fnu, "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
        "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "F16": torch.float16, "U16": torch.uint16,
        "C64": torch.complex64, "BOOL": torch.bool, "F4": torch.uint8,
    }
    for name, (dt, shape, data) in tensors.items():
        t = got[name]
        if dt in names:
            assert t.dtype == names[dt], name
        if dt in ESIZE:
            assert tuple(t.shape) == shape
        assert t.contiguous().view(torch.uint8).numpy().tobytes() == data, name
    assert tuple(got["full.F4"].shape) == (2, 4)  # packed: two F4 per byte


def test_iteration_and_take(checkpoints):
    rank = safeshard.plan(checkpoints("llama-tiny"), tp=2).load(0)
    infos = list(rank)
    assert [i.name for i in infos] == rank.names() and len(rank) == len(infos)
    first = infos[0].name
    arrays = rank.numpy()
    taken = rank.take(first, numpy=True)
    assert taken.tobytes() == arrays[first].tobytes() and first not in rank
    assert first not in rank.numpy() and len(rank) == len(infos) - 1
    with pytest.raises(safeshard.SafeshardError):
        rank.take(first)


def test_hub_cache_snapshot_and_repo_id(checkpoints, tmp_path, monkeypatch):
    """A hub cache layout (snapshot files are symlinks into blobs) works as a path, and a
    repo id is found in the local cache only (HF_HUB_OFFLINE: no network)."""
    pytest.importorskip("huggingface_hub")
    src = checkpoints("llama-tiny")
    repo = tmp_path / "hub" / "models--acme--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    for f in src.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    want = safeshard.plan(src, tp=2).load(1).digest()
    assert safeshard.plan(snap, tp=2).load(1).digest() == want
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert safeshard.plan("acme/tiny", tp=2).load(1).digest() == want
    with pytest.raises(safeshard.SafeshardError) as e:
        safeshard.plan("acme/absent", tp=2)
    assert "Hugging Face cache" in str(e.value)


def test_progress_callback_reaches_the_total(checkpoints):
    plan = safeshard.plan(checkpoints("mixtral-tiny"), tp=2)
    seen: list[int] = []
    native = plan._native.load(0, progress=seen.append)
    assert seen and seen[-1] == plan.rank(0).bytes
    assert seen == sorted(seen)
    assert native.stats()["bytes"] == plan.rank(0).bytes


def test_stats_say_what_the_engine_chose(checkpoints):
    plan = safeshard.plan(checkpoints("llama-tiny"), tp=2)
    for io in ("pread", "mmap", "direct"):
        stats = plan.load(1, io=io, threads=3).stats
        assert stats["threads"] == 3
        assert stats["io_chosen"] == io
        by = stats["io_bytes"]
        # A forced engine reads every copied byte its way (padding is zero-filled, not read).
        assert 0 < by[io] == sum(by[k] for k in ("pread", "mmap", "direct")) <= stats["bytes"]
    stats = plan.load(1).stats
    assert stats["io_chosen"] in ("pread", "mmap", "direct") and stats["threads"] >= 1


def test_default_rank(checkpoints, monkeypatch):
    ckpt = checkpoints("llama-tiny")
    for v in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(v, raising=False)
    with pytest.raises(safeshard.SafeshardError) as e:
        safeshard.load(ckpt, tp=2)
    assert e.value.kind == "usage" and "2 ranks" in str(e.value)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(safeshard.SafeshardError) as e:
        safeshard.load(ckpt, tp=2)
    assert "WORLD_SIZE" in str(e.value)


def test_node_ranks_change_how_pages_are_asked_for_not_the_bytes(checkpoints):
    # tp 4 splits o_proj/down_proj by columns: together the four ranks read every byte of
    # their rows, so each asks for the whole spans. Files evicted first, so that the strided
    # spans are read from storage (where the node's spans matter), then compared with the
    # CLI's digests.
    ckpt = checkpoints("llama-tiny")
    plan = safeshard.plan(ckpt, tp=4)
    out = run_cli("load", str(ckpt), "--tp", "4", "--all-ranks", "--digest", "--json").stdout
    cli = {d["rank"]: d["sha256"] for d in map(json.loads, out.splitlines())}
    for r in range(4):
        for f in ckpt.glob("*.safetensors"):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        assert plan.load(r, node_ranks=[0, 1, 2, 3]).digest() == cli[r]
    with pytest.raises(safeshard.SafeshardError) as e:
        plan.load(0, node_ranks=[0, 4])
    assert e.value.kind == "usage" and "node_ranks: 4" in str(e.value)
