#!/usr/bin/env bash
# Real `mpirun -n 4` jobs (issue 6): every share mode for tp=2 × pp=2 and tp=4, each rank's
# bytes compared with the in-process (threads, share none) result; read-once must read the
# checkpoint's data exactly once; a job with one rank's file broken must fail fast; a job
# whose size does not match the topology must be refused.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1

cargo build -q --features mpi --example share_toy --example synth --bin safeshard
bin=$PWD/target/debug/examples/share_toy
safeshard=$PWD/target/debug/safeshard
synth=$PWD/target/debug/examples/synth
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

"$bin" write toy.safetensors
data_bytes=$(python3 -c "import os,struct; f=open('toy.safetensors','rb'); n=struct.unpack('<Q', f.read(8))[0]; print(os.path.getsize('toy.safetensors') - 8 - n)")

digests() { python3 -c "
import json, sys
for l in sorted(sys.stdin, key=lambda l: json.loads(l)['rank']):
    d = json.loads(l); print(d['rank'], d['bytes'], d['sha256'])"; }
read_total() { python3 -c "
import json, sys; print(sum(json.loads(l)['read_bytes'] for l in sys.stdin))"; }

fail=0
for topo in "2 2 1" "4 1 1"; do
  "$bin" threads toy.safetensors $topo none | digests > ref.txt
  [[ $(wc -l < ref.txt) -eq 4 ]] || { echo "reference has no 4 ranks"; exit 1; }
  for mode in none broadcast read-once; do
    timeout 120 mpirun -n 4 "$bin" mpi toy.safetensors $topo $mode > out.jsonl
    if ! digests < out.jsonl | diff ref.txt - > /dev/null; then
      echo "FAIL: tp/pp/dp=$topo --share $mode: rank bytes differ from the in-process load"; fail=1
    fi
    total=$(read_total < out.jsonl)
    if [[ $mode == read-once && $total -ne $data_bytes ]]; then
      echo "FAIL: read-once read $total bytes, checkpoint data is $data_bytes"; fail=1
    fi
    echo "ok: mpirun -n 4, tp/pp/dp=$topo, --share $mode, read_bytes total $total (data $data_bytes)"
  done
done

# Tiny MPI transfers (1000 bytes): chunked broadcasts and multi-round all-to-all-v.
"$bin" threads toy.safetensors 2 1 2 none | digests > ref.txt
for mode in broadcast read-once; do
  SHARE_TOY_MPI_CHUNK=1000 timeout 120 mpirun -x SHARE_TOY_MPI_CHUNK -n 4 "$bin" mpi toy.safetensors 2 1 2 $mode > out.jsonl
  if ! digests < out.jsonl | diff ref.txt - > /dev/null; then
    echo "FAIL: 1000-byte MPI chunks, tp=2 dp=2 --share $mode: bytes differ"; fail=1
  else
    echo "ok: 1000-byte MPI chunks, tp=2 × dp=2, --share $mode"
  fi
done

# One rank's file broken (as on a node with a bad copy): non-zero exit, fast, naming the file.
for r in 0 1 2 3; do mkdir -p node$r; cp toy.safetensors node$r/; done
truncate -s 1000 node2/toy.safetensors
for mode in none broadcast read-once; do
  start=$SECONDS
  if timeout 60 mpirun -n 4 "$bin" mpi 'node{rank}/toy.safetensors' 2 2 1 $mode > /dev/null 2> err.txt; then
    echo "FAIL: broken file, --share $mode: job succeeded"; fail=1
  elif (( SECONDS - start > 30 )); then
    echo "FAIL: broken file, --share $mode: took $((SECONDS - start)) s"; fail=1
  elif ! grep -q "node2/toy.safetensors: file truncated" err.txt; then
    echo "FAIL: broken file, --share $mode: message does not name the file"; cat err.txt; fail=1
  else
    echo "ok: broken file on rank 2, --share $mode: failed in $((SECONDS - start)) s naming it"
  fi
done

# A world that does not match tp × pp × dp is refused.
if timeout 60 mpirun -n 3 "$bin" mpi toy.safetensors 2 2 1 none > /dev/null 2> err.txt; then
  echo "FAIL: 3 ranks for tp=2 × pp=2 accepted"; fail=1
elif ! grep -q "the job has 3 ranks" err.txt; then
  echo "FAIL: wrong-size job: unclear message"; cat err.txt; fail=1
else
  echo "ok: 3 ranks for tp=2 × pp=2 refused"
fi

# The real CLI on a synthetic Llama checkpoint (real spec and planner): every rank verified
# against the slow path, arenas equal to the in-process (threads) load.
"$synth" llama-tiny llama > /dev/null
for topo in "--tp 2 --pp 2" "--tp 4"; do
  "$safeshard" dist-load llama $topo --json | digests > ref.txt
  for mode in none broadcast read-once; do
    timeout 120 mpirun -n 4 "$safeshard" dist-load llama $topo --share $mode --verify --json > out.jsonl
    if ! digests < out.jsonl | diff ref.txt - > /dev/null; then
      echo "FAIL: dist-load $topo --share $mode differs from the threads load"; fail=1
    elif [[ $(grep -c '"verified":[1-9]' out.jsonl) -ne 4 ]]; then
      echo "FAIL: dist-load $topo --share $mode: not every rank verified"; fail=1
    else
      echo "ok: mpirun -n 4 safeshard dist-load $topo --share $mode --verify, read_bytes total $(read_total < out.jsonl)"
    fi
  done
done
# Two simulated nodes (SAFESHARD_NODE, MPMD): read-once --per-node reads the data once per node.
"$safeshard" dist-load llama --tp 2 --dp 2 --json | digests > ref.txt
llama_data=$(python3 -c "
import glob, os, struct
t = 0
for p in glob.glob('llama/*.safetensors'):
    with open(p, 'rb') as f: n = struct.unpack('<Q', f.read(8))[0]
    t += os.path.getsize(p) - 8 - n
print(t)")
timeout 120 mpirun -n 2 -x SAFESHARD_NODE=a "$safeshard" dist-load llama --tp 2 --dp 2 --share read-once --per-node --io pread --json \
  : -n 2 -x SAFESHARD_NODE=b "$safeshard" dist-load llama --tp 2 --dp 2 --share read-once --per-node --io pread --json > out.jsonl
total=$(read_total < out.jsonl)
if ! digests < out.jsonl | diff ref.txt - > /dev/null; then
  echo "FAIL: read-once --per-node: bytes differ"; fail=1
elif (( total > 2 * llama_data )); then
  echo "FAIL: read-once --per-node read $total bytes, more than twice the data ($llama_data)"; fail=1
else
  echo "ok: read-once --per-node on 2 simulated nodes: read $total bytes (data $llama_data, once per node)"
fi

truncate -s -100 llama/model-00002-of-00002.safetensors
start=$SECONDS
if timeout 60 mpirun -n 4 "$safeshard" dist-load llama --tp 2 --pp 2 --share read-once > /dev/null 2> err.txt; then
  echo "FAIL: truncated checkpoint: job succeeded"; fail=1
elif ! grep -q "model-00002-of-00002.safetensors" err.txt; then
  echo "FAIL: truncated checkpoint: message does not name the file"; cat err.txt; fail=1
else
  echo "ok: truncated checkpoint under mpirun: failed in $((SECONDS - start)) s naming the file"
fi
exit $fail
