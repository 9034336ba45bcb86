"""The vLLM plugin's packaging, without vLLM: the entry point vLLM looks for, that
``import safeshard`` stays free of vLLM and torch, and the ``names`` option. The plugin's
loads themselves are checked against the real vLLM by tests/vllm/plugin_differential.py."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

import safeshard


def test_entry_point_registers_the_load_format():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    ours = [ep for ep in eps if ep.name == "safeshard"]
    assert [ep.value for ep in ours] == ["safeshard.vllm_plugin:register"]


def test_import_safeshard_imports_neither_vllm_nor_torch():
    code = (
        "import sys, safeshard\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('vllm', 'torch'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_unknown_names_option_is_a_usage_error(checkpoints):
    with pytest.raises(safeshard.SafeshardError) as e:
        safeshard.plan(checkpoints("llama-tiny"), names="megatron")
    assert e.value.exit_code == 2
    assert "names" in str(e.value) and "megatron" in str(e.value)
