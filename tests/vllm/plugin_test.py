"""pytest front of the vLLM plugin differential (plugin_differential.py); one test per case.

SAFESHARD_VLLM_PLUGIN_CASES=GLOB,... picks cases (default: plugin_differential.CASES).
"""

import fnmatch
import os
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytest.importorskip("safeshard")

import plugin_differential  # noqa: E402

_GLOBS = os.environ.get("SAFESHARD_VLLM_PLUGIN_CASES", "").split(",")
CASES = [
    c
    for c in plugin_differential.CASES
    if _GLOBS == [""] or any(fnmatch.fnmatch(c, g) for g in _GLOBS)
]


@pytest.fixture(scope="session")
def root():
    with tempfile.TemporaryDirectory(prefix="safeshard-vplug-") as d:
        yield Path(d)


@pytest.mark.parametrize("case", CASES)
def test_plugin_load_equals_vllm_default(case, root):
    status, details = plugin_differential.run_case(case, root)
    if status == "vllm-cpu-unsupported":
        pytest.skip("; ".join(details))
    assert status == "pass", "\n".join(details)
