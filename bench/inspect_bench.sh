#!/usr/bin/env bash
# Times `safeshard inspect` (table and --json) and a plain-Python header reader side by side on
# one checkpoint, RUNS times each, interleaved; prints the median wall time of each.
# usage: bash bench/inspect_bench.sh CKPT_DIR [RUNS]   (build first: cargo build --release)
set -euo pipefail
ckpt=$1
runs=${2:-11}
bin=${SAFESHARD_BIN:-target/release/safeshard}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
t() { # name, command...
  local name=$1; shift
  local s e
  s=$(date +%s%N); "$@" >/dev/null; e=$(date +%s%N)
  echo $(( (e - s) / 1000 )) >>"$tmp/$name"
}
"$bin" inspect "$ckpt" >/dev/null # warm the page cache
for _ in $(seq "$runs"); do
  t table "$bin" inspect "$ckpt"
  t json "$bin" inspect "$ckpt" --json
  t python python3 bench/py_headers.py "$ckpt"
done
for name in table json python; do
  med=$(sort -n "$tmp/$name" | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  min=$(sort -n "$tmp/$name" | head -1)
  printf '%-7s median %8.1f ms  min %8.1f ms  (%d runs)\n' "$name" "$(echo "$med/1000" | bc -l)" "$(echo "$min/1000" | bc -l)" "$runs"
done
