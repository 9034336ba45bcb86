#!/usr/bin/env bash
# Distributed loading benchmarks (issue 6), 4 MPI ranks on this machine:
#  1. read-once vs none on a cold page cache (posix_fadvise DONTNEED on every file before
#     each run): bytes read from storage (sum over ranks) and wall time of the job;
#  2. safeshard's MPI broadcast vs a raw MPI_Bcast of the same bytes.
# Usage: bash bench/comm_bench.sh [LAYERS] [REPS]   (needs ~3 GB in $TMPDIR per 2 layers)
set -euo pipefail
cd "$(dirname "$0")/.."
layers=${1:-2}
reps=${2:-3}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
cargo build -q --release --features mpi --bin safeshard --example synth --example bcast_bench
bin=target/release/safeshard
ck=${TMPDIR:-/tmp}/safeshard-comm-bench-l$layers
[[ -d $ck ]] || target/release/examples/synth llama3-8b "$ck" --layers "$layers"
size=$(python3 -c "
import glob, json, os, struct
t = 0
for p in glob.glob('$ck/*.safetensors'):
    with open(p, 'rb') as f: n = struct.unpack('<Q', f.read(8))[0]
    t += os.path.getsize(p) - 8 - n
print(t)")
drop() { python3 -c "
import glob, os
for p in glob.glob('$ck/*.safetensors'):
    fd = os.open(p, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)"; }
echo "checkpoint: llama3-8b shapes, $layers layers, $size bytes of tensor data"
echo "| topology | share | run | wall s | read_bytes (sum) | read / checkpoint |"
echo "|---|---|---|---|---|---|"
for topo in "--tp 2 --dp 2" "--tp 4"; do
  for rep in $(seq "$reps"); do
    for mode in none read-once; do
      drop
      start=$(date +%s.%N)
      mpirun -n 4 --bind-to none "$bin" dist-load "$ck" $topo --share "$mode" --json > /tmp/comm-bench.jsonl
      end=$(date +%s.%N)
      python3 -c "
import json
rows = [json.loads(l) for l in open('/tmp/comm-bench.jsonl')]
r = sum(x['read_bytes'] for x in rows)
print(f'| $topo | $mode | $rep | {$end - $start:.2f} | {r} | {r / $size:.4f} |')"
    done
  done
done
echo
echo "broadcast (medians of 7, 4 ranks):"
for mib in 64 256 1024; do
  mpirun -n 4 --bind-to none target/release/examples/bcast_bench "$mib" 7
done
