"""pytest front of the vLLM differential (see differential.py); one test per case.

SAFESHARD_VLLM_CASES=GLOB limits the cases (default: all of them, ~1-2 min each).
"""

import fnmatch
import os
import tempfile
from pathlib import Path

import pytest

import differential

pytest.importorskip("vllm")

CASES = [c for c in differential.cases() if fnmatch.fnmatch(c, os.environ.get("SAFESHARD_VLLM_CASES", "*"))]


@pytest.fixture(scope="session")
def root():
    with tempfile.TemporaryDirectory(prefix="safeshard-vllm-") as d:
        yield Path(d)


@pytest.mark.parametrize("case", CASES)
def test_rank_tensors_equal_vllm(case, root):
    status, details = differential.run_case(case, root)
    if status == "vllm-cpu-unsupported":
        pytest.skip("; ".join(details))
    assert status in ("pass", "both-refuse"), "\n".join(details)
