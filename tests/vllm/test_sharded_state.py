"""pytest front of the `reshard --format vllm` acceptance test (see sharded_state.py); one
test per case.

SAFESHARD_VLLM_CASES=GLOB limits the cases (default: all of them, two vLLM loads each).
"""

import fnmatch
import os
import tempfile
from pathlib import Path

import pytest

import differential
import sharded_state

pytest.importorskip("vllm")

CASES = [c for c in differential.cases() if fnmatch.fnmatch(c, os.environ.get("SAFESHARD_VLLM_CASES", "*"))]


@pytest.fixture(scope="session")
def root():
    with tempfile.TemporaryDirectory(prefix="safeshard-sharded-") as d:
        yield Path(d)


@pytest.mark.parametrize("case", CASES)
def test_sharded_state_load_equals_default_load(case, root):
    status, details = sharded_state.run_case(case, root)
    if status == "vllm-cpu-unsupported":
        pytest.skip("; ".join(details))
    assert status in ("pass", "both-refuse"), "\n".join(details)
