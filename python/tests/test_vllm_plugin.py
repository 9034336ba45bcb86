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


# The check that decides between safeshard and vLLM's default loader, on a hand-built model
# and plan (needs torch and vLLM, which the plugin imports).


def _model_and_plan(planned):
    torch = pytest.importorskip("torch")
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    from safeshard import RankInfo, TensorInfo

    model = torch.nn.Module()
    model.embed = torch.nn.Module()
    model.embed.weight = torch.nn.Parameter(torch.empty(8, 4, dtype=torch.bfloat16))
    model.head = torch.nn.Module()
    model.head.weight = model.embed.weight  # tied: one parameter under two names
    model.norm = torch.nn.Module()
    model.norm.weight = torch.nn.Parameter(torch.empty(4, dtype=torch.bfloat16))
    model.register_buffer("_k_scale", torch.tensor(1.0))
    tensors = tuple(TensorInfo(n, dt, tuple(shape), 0) for n, dt, shape in planned)
    info = RankInfo(0, 0, 0, 0, 0, 0, 0, 0, 0, tensors)
    plan = SimpleNamespace(rank=lambda r: info)
    config = SimpleNamespace(quantization=None, is_quantized=False)
    return model, plan, config


def _check(planned):
    model, plan, config = _model_and_plan(planned)
    from safeshard.vllm_plugin import _check_rank

    _check_rank(plan, 0, model, config)


def _refused(planned) -> str:
    from safeshard.vllm_plugin import Fallback

    with pytest.raises(Fallback) as e:
        _check(planned)
    return str(e.value)


EMBED = ("embed.weight", "BF16", (8, 4))
NORM = ("norm.weight", "BF16", (4,))


def test_check_accepts_a_plan_that_fills_every_parameter():
    _check([EMBED, NORM])  # the tied head is the same parameter
    _check([EMBED, ("head.weight", "BF16", (8, 4)), NORM, ("_k_scale", "F32", ())])
    _check([("embed.weight", "F32", (8, 4)), NORM])  # float → bfloat16, as vLLM's copy_
    _check([("embed.weight", "BF16", (6, 4)), NORM])  # padded parameter: narrowed copy


def test_check_refuses_what_it_cannot_prove():
    assert "norm.weight" in _refused([EMBED])
    assert "lm.weight" in _refused([EMBED, NORM, ("lm.weight", "BF16", (8, 4))])
    assert "I32" in _refused([("embed.weight", "I32", (8, 4)), NORM])
    assert "[9, 4]" in _refused([("embed.weight", "BF16", (9, 4)), NORM])
    assert "[8, 4, 1]" in _refused([("embed.weight", "BF16", (8, 4, 1)), NORM])


def test_plugin_log_lines_reach_vllms_handler():
    """The plugin's INFO line (bytes read, time) goes to the handler vLLM configures for its
    own logger (as its engine processes do, with the default LoggingConfig), at vLLM's level;
    a logger outside "vllm" had no handler and showed nothing."""
    import logging

    from vllm.config.logging import LoggingConfig
    from vllm.logger import configure_logging

    from safeshard import vllm_plugin

    configure_logging(LoggingConfig(log_level="INFO", configure_logging=True))
    lg: logging.Logger | None = vllm_plugin.logger
    assert lg is not None and lg.isEnabledFor(logging.INFO)
    while lg is not None and not lg.handlers:
        lg = lg.parent if lg.propagate else None
    assert lg is logging.getLogger("vllm"), lg
