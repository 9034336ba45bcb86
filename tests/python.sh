#!/usr/bin/env bash
# The Python package (issue 11): builds it with pip (maturin backend, as `pip install .` does)
# into a virtual environment, then checks the stubs (stubtest), types (mypy --strict), the
# console script, and runs pytest.
#
# The venv lives outside the clone (SAFESHARD_PY_VENV, default ~/.cache/safeshard/py-venv) so
# that torch is installed once per machine: from PyPI it pulls the CUDA libraries, 5.4 GB,
# measured at 324 s here (`pip install --no-cache-dir torch numpy` into an empty venv).
# SAFESHARD_PY_TORCH=0 skips torch (the torch tests skip; numpy-only tests still run).
# The extension is built with the dev profile into the same cargo target directory as the
# Rust steps, so the safeshard crate is not compiled twice.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${SAFESHARD_PY_VENV:-$HOME/.cache/safeshard/py-venv}
if [[ ! -x $venv/bin/python ]]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
py=$venv/bin/python
"$py" -m pip install -q --disable-pip-version-check \
  "maturin>=1.5,<2" numpy safetensors ml_dtypes pytest mypy tqdm huggingface_hub
# The vLLM differential (run-all.sh, SAFESHARD_VLLM_DIFF, default on) needs vLLM 0.33.0 in
# this same venv; vLLM brings its own torch, so one download serves both (5 min 21 s here).
if [[ ${SAFESHARD_VLLM_DIFF:-1} == 1 ]] && ! "$py" -c 'import vllm' 2>/dev/null; then
  t=$SECONDS
  "$py" -m pip install -q --disable-pip-version-check "vllm==0.33.0"
  echo "vllm 0.33.0 (with torch) installed in $((SECONDS - t)) s" >&2
elif [[ ${SAFESHARD_PY_TORCH:-1} == 1 ]] && ! "$py" -c 'import torch' 2>/dev/null; then
  t=$SECONDS
  "$py" -m pip install -q --disable-pip-version-check torch
  echo "torch installed in $((SECONDS - t)) s" >&2
fi
MATURIN_PEP517_ARGS="--profile dev" "$py" -m pip install -q --disable-pip-version-check \
  --no-build-isolation --no-deps --force-reinstall .

"$py" -m mypy.stubtest safeshard._safeshard
"$py" -m mypy
"$venv/bin/safeshard" spec list >/dev/null
# From the tests folder, so `import safeshard` is the installed package, not python/safeshard.
cd python/tests
"$py" -m pytest -q -p no:cacheprovider .
