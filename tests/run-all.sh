#!/usr/bin/env bash
# The whole test suite: installs what it needs on Debian (as root), then runs formatting,
# lint, unit/integration/snapshot/property tests and the MPI jobs.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
for p in openmpi-bin libopenmpi-dev libclang-dev pkg-config; do
  dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
if ((${#need_pkgs[@]})); then
  if [[ $(id -u) -eq 0 ]]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}"
  else
    echo "missing Debian packages: ${need_pkgs[*]} (run as root or install them)" >&2
    exit 1
  fi
fi
python3 -c 'import safetensors, numpy' 2>/dev/null || python3 -m pip install -q safetensors numpy

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets
cargo test --doc

# MPI and GPU features (issue 6): lint and test with rsmpi, compile the NCCL/CUDA paths
# (no GPU in CI), then real `mpirun -n 4` jobs on a tiny checkpoint.
cargo clippy --all-targets --features mpi -- -D warnings
cargo test --features mpi --lib comm
cargo test --features mpi --test comm_share --test comm_cli
cargo check --features nccl,cuda
cargo clippy --all-targets --features nccl,cuda -- -D warnings
cargo test --features nccl,cuda --lib comm::  # no GPU: missing libcuda is an error, not a panic
bash tests/mpi_jobs.sh
