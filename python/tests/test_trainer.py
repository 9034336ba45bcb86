"""``safeshard.load_state_dict`` in trainers: ``torchrun`` with 4 gloo processes on CPU runs
``trainer_job.py`` (FSDP2 on a 1-D mesh, TP on a 1-D mesh, 2-D dp x tp, an fp32 model from
a bf16 checkpoint, tied embeddings, key_map, a lone _StridedShard, failures on one rank),
comparing every local shard with the same model built from the ``safetensors`` package's
full tensors and with ``dcp.load(HuggingFaceStorageReader)``."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

needs = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None,
    reason="torch and transformers are not installed",
)


def save_llama(path: Path, tied: bool) -> Path:
    """A tiny Llama (vocab 130, not divisible by 4) saved in several files with an index."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=130,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(7 if tied else 3)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="40KB")
    files = list(path.glob("*.safetensors"))
    assert len(files) >= 3 and (path / "model.safetensors.index.json").is_file(), files
    return path


@needs
def test_trainer_layouts_under_torchrun(tmp_path: Path) -> None:
    ckpt = save_llama(tmp_path / "llama", tied=False)
    tied = save_llama(tmp_path / "llama-tied", tied=True)
    job = Path(__file__).with_name("trainer_job.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAFESHARD_LOG": "warn"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
         str(job), str(ckpt), str(tied)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ok ")]
    for case in ("ok fsdp bfloat16:", "ok tp bfloat16:", "ok 2d bfloat16:", "ok fsdp float32:",
                 "ok 2d float32:", "ok fsdp bfloat16 tied:", "ok tp bfloat16 tied:",
                 "ok key_map", "ok torchtitan", "ok lone _StridedShard", "ok missing tensor share=read-once",
                 "ok shape mismatch share=broadcast", "ok strict=False"):
        assert any(line.startswith(case) for line in lines), (case, proc.stdout)
    # The 2-D layout really exercised strided shards.
    assert any("_StridedShard" in line or "_S(0" in line for line in lines
               if line.startswith("ok 2d")), proc.stdout
    assert "all ok" in proc.stdout
