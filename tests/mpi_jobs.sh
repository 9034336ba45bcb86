#!/usr/bin/env bash
# Real `mpirun -n 4` jobs (issues 6 and 9): every share mode for tp=2 × pp=2 and tp=4, each
# rank's bytes compared with the in-process (threads, share none) result, on real plans of a
# synthetic Llama checkpoint; a job with one rank's file broken must fail fast; a job whose
# size does not match the topology must be refused; read-once --per-node with pipeline stages
# on different nodes must not hang; ranks that disagree on an option fail with one message
# (exit 2); a rank that never arrives ends the job after --timeout naming it; a rank stopped
# (SIGSTOP) at any phase, from before MPI_Init to MPI_Finalize, ends the job by its --timeout
# with one line naming the phase and the rank, and no rank prints a result.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1

cargo build -q --features "${SAFESHARD_FEATURES:-mpi}" --example share_toy --example synth --bin safeshard
target=${CARGO_TARGET_DIR:-$PWD/target}
bin=$target/debug/examples/share_toy
safeshard=$target/debug/safeshard
synth=$target/debug/examples/synth
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

"$bin" write toy 8

digests() { python3 -c "
import json, sys
for l in sorted(sys.stdin, key=lambda l: json.loads(l)['rank']):
    d = json.loads(l); print(d['rank'], d['bytes'], d['sha256'])"; }
read_total() { python3 -c "
import json, sys; print(sum(json.loads(l)['read_bytes'] for l in sys.stdin))"; }

fail=0
for topo in "2 2 1" "4 1 1"; do
  "$bin" threads toy $topo none | digests > ref.txt
  [[ $(wc -l < ref.txt) -eq 4 ]] || { echo "reference has no 4 ranks"; exit 1; }
  # Read-once on threads reads each needed byte once (checked against the plan in cargo test).
  once=$("$bin" threads toy $topo read-once | read_total)
  for mode in none broadcast read-once; do
    timeout 120 mpirun -n 4 "$bin" mpi toy $topo $mode > out.jsonl
    if ! digests < out.jsonl | diff ref.txt - > /dev/null; then
      echo "FAIL: tp/pp/dp=$topo --share $mode: rank bytes differ from the in-process load"; fail=1
    fi
    total=$(read_total < out.jsonl)
    if [[ $mode != none && $total -ne $once ]]; then
      echo "FAIL: $mode read $total bytes, the job needs $once"; fail=1
    fi
    echo "ok: mpirun -n 4, tp/pp/dp=$topo, --share $mode, read_bytes total $total (needed $once)"
  done
done

# Tiny MPI transfers (1000 bytes): chunked broadcasts and exchange messages cut into 1000-byte pieces.
"$bin" threads toy 2 1 2 none | digests > ref.txt
for mode in broadcast read-once; do
  SHARE_TOY_MPI_CHUNK=1000 timeout 120 mpirun -x SHARE_TOY_MPI_CHUNK -n 4 "$bin" mpi toy 2 1 2 $mode > out.jsonl
  if ! digests < out.jsonl | diff ref.txt - > /dev/null; then
    echo "FAIL: 1000-byte MPI chunks, tp=2 dp=2 --share $mode: bytes differ"; fail=1
  else
    echo "ok: 1000-byte MPI chunks, tp=2 × dp=2, --share $mode"
  fi
done

# Issue 9 item 2: read-once --per-node with the pipeline stages on different nodes (ranks 0,1
# on node A, 2,3 on node B), unequal stages, 64 KiB rounds: the nodes need different numbers
# of rounds. It used to hang.
for layers in 2,6 6,2; do
  "$bin" threads toy 2 2 1 none --pp-layers $layers | digests > ref.txt
  start=$SECONDS
  if ! timeout 120 mpirun -n 2 -x SAFESHARD_NODE=A "$bin" mpi toy 2 2 1 read-once --per-node --pp-layers $layers --round 65536 \
       : -n 2 -x SAFESHARD_NODE=B "$bin" mpi toy 2 2 1 read-once --per-node --pp-layers $layers --round 65536 > out.jsonl 2> err.txt; then
    echo "FAIL: read-once --per-node, stages $layers on two nodes: job failed or hung"; cat err.txt; fail=1
  elif ! digests < out.jsonl | diff ref.txt - > /dev/null; then
    echo "FAIL: read-once --per-node, stages $layers on two nodes: bytes differ"; fail=1
  else
    echo "ok: read-once --per-node, stages $layers on nodes A/B, 64 KiB rounds: $((SECONDS - start)) s"
  fi
done

# One rank's file broken (as on a node with a bad copy): non-zero exit, fast, naming the file.
for r in 0 1 2 3; do cp -r toy node$r; done
truncate -s -100 node2/model-00002-of-00004.safetensors
for mode in none broadcast read-once; do
  start=$SECONDS
  if timeout 60 mpirun -n 4 "$bin" mpi 'node{rank}' 2 2 1 $mode > /dev/null 2> err.txt; then
    echo "FAIL: broken file, --share $mode: job succeeded"; fail=1
  elif (( SECONDS - start > 30 )); then
    echo "FAIL: broken file, --share $mode: took $((SECONDS - start)) s"; fail=1
  elif ! grep -q "rank 2: model-00002-of-00004.safetensors: file is truncated" err.txt; then
    echo "FAIL: broken file, --share $mode: message does not name the file"; cat err.txt; fail=1
  else
    echo "ok: broken file on rank 2, --share $mode: failed in $((SECONDS - start)) s naming it"
  fi
done

# A world that does not match tp × pp × dp is refused.
if timeout 60 mpirun -n 3 "$bin" mpi toy 2 2 1 none > /dev/null 2> err.txt; then
  echo "FAIL: 3 ranks for tp=2 × pp=2 accepted"; fail=1
elif ! grep -q "3 ranks" err.txt; then
  echo "FAIL: wrong-size job: unclear message"; cat err.txt; fail=1
else
  echo "ok: 3 ranks for tp=2 × pp=2 refused"
fi

# Issue 9 item 4: a rank that never arrives (sleeping before its first collective) ends the
# job after the timeout, every waiting rank naming the phase and the missing rank.
start=$SECONDS
if SHARE_TOY_STALL_RANK=2 timeout 120 mpirun -x SHARE_TOY_STALL_RANK -n 4 "$bin" mpi toy 2 2 1 broadcast --timeout 3 > /dev/null 2> err.txt; then
  echo "FAIL: a stalled rank: job succeeded"; fail=1
elif (( SECONDS - start > 60 )); then
  echo "FAIL: a stalled rank: took $((SECONDS - start)) s with --timeout 3"; fail=1
elif ! grep -q 'timed out after 3s in phase "job fingerprint": rank 2 did not arrive' err.txt; then
  echo "FAIL: a stalled rank: unclear message"; cat err.txt; fail=1
else
  echo "ok: rank 2 stalled: the job ended after $((SECONDS - start)) s naming it"
fi

# The real CLI on a synthetic Llama checkpoint (real spec and planner): every rank verified
# against the slow path, arenas equal to the in-process load (`--all-ranks`, each rank reading
# its own slices); `mpirun ... safeshard load` without --share loads each process's rank.
"$synth" llama-tiny llama > /dev/null
for topo in "--tp 2 --pp 2" "--tp 4"; do
  "$safeshard" load llama $topo --all-ranks --digest --json | digests > ref.txt
  for share in "--share none" "--share broadcast" "--share read-once" ""; do
    timeout 120 mpirun -n 4 "$safeshard" load llama $topo $share --verify --digest --json > out.jsonl
    if ! digests < out.jsonl | diff ref.txt - > /dev/null; then
      echo "FAIL: load $topo $share differs from the in-process load"; fail=1
    elif [[ $(grep -c '"verified":[1-9]' out.jsonl) -ne 4 ]]; then
      echo "FAIL: load $topo $share: not every rank verified"; fail=1
    else
      echo "ok: mpirun -n 4 safeshard load $topo ${share:-(no --share)} --verify, read_bytes total $(read_total < out.jsonl)"
    fi
  done
done
# The command users type (no --digest, no --verify): one line per rank with the promised keys.
timeout 120 mpirun -n 4 "$safeshard" load llama --tp 2 --pp 2 --share broadcast --json > out.jsonl
if ! python3 -c "
import json, sys
ls = [json.loads(l) for l in open('out.jsonl')]
assert sorted(l['rank'] for l in ls) == [0, 1, 2, 3], ls
assert all(all(k in l for k in ('rank', 'tensors', 'bytes', 'read_bytes', 'seconds')) for l in ls)
"; then
  echo "FAIL: mpirun -n 4 safeshard load --share broadcast --json: bad output"; cat out.jsonl; fail=1
else
  echo "ok: mpirun -n 4 safeshard load --tp 2 --pp 2 --share broadcast --json"
fi
# Issue 18: no phase without a deadline. Rank 2 stops itself with SIGSTOP (as `kill -STOP`, a
# debugger or a hung file system would stop it) at each phase of a real `safeshard load` job:
# before MPI_Init (a shell that stops before it execs safeshard), inside MPI_Init (at the
# launcher's fence), right after MPI_Init (the first arrival handshake), inside a broadcast and
# inside a read-once exchange (after their handshakes, before data moves) and at
# MPI_Finalize (tests/stop_rank.c, preloaded). The live ranks must end the job by --timeout (plus
# the liveness probe's grace and the launcher's teardown) with exit != 0, no result on stdout and
# a line naming the phase and the stopped rank.
command -v mpicc > /dev/null || { echo "FAIL: mpicc not found (Debian: libopenmpi-dev)"; exit 1; }
mpicc -shared -fPIC -O1 -o stop_rank.so "$repo/tests/stop_rank.c" -ldl
stop_case() { # what, expected phase and ranks (extended regex), mpirun arguments...
  local name=$1 want=$2 start=$SECONDS rc seen=0 ended="" how=""
  local marker=safeshard-stop-$$-$RANDOM
  shift 2
  set +e
  timeout -k 5 30 mpirun -n 4 -x SAFESHARD_TEST_JOB="$marker" "$@" > out.txt 2> err.txt &
  local pid=$!
  # When the job's rank processes (they carry the marker) are all gone: mpirun itself may
  # still hang or crash in its PMIx teardown after a rank was stopped inside a PMIx fence
  # (Open MPI 4.1 with PMIx 4.2, also with a plain C program), which is not the ranks' doing.
  while kill -0 "$pid" 2> /dev/null; do
    if grep -q -s -z "SAFESHARD_TEST_JOB=$marker" /proc/[0-9]*/environ; then
      seen=1
    elif [[ $seen -eq 1 ]]; then
      ended=$((SECONDS - start))
      break
    fi
    sleep 0.2
  done
  wait "$pid"
  rc=$?
  set -e
  ended=${ended:-$((SECONDS - start))}
  case $rc in
    124 | 137) how=", then mpirun hung in its teardown and was killed" ;;
    139) how=", then mpirun crashed in its teardown" ;;
  esac
  if [[ $rc -eq 0 ]]; then
    echo "FAIL: a rank stopped $name: the job reported success"; fail=1
  elif (( ended < 4 || ended > 4 + 20 )); then
    echo "FAIL: a rank stopped $name: the ranks ended after $ended s with --timeout 4s (exit $rc)"; cat err.txt; fail=1
  elif [[ -s out.txt ]]; then
    echo "FAIL: a rank stopped $name: a rank printed a result"; cat out.txt; fail=1
  elif ! grep -q -E "^error: rank [0-9]+: timed out after 4s in phase $want" err.txt; then
    echo "FAIL: a rank stopped $name: no line naming the phase and the rank (exit $rc)"; cat err.txt; fail=1
  else
    echo "ok: a rank stopped $name: the ranks ended in $ended s (exit $rc$how): $(grep -m1 -o -E "phase $want" err.txt)"
  fi
}
load4=("$safeshard" load llama --tp 2 --pp 2 --timeout 4s)
stop_at() { # the rank to stop, where (tests/stop_rank.c)
  echo -x LD_PRELOAD="$work/stop_rank.so" -x SAFESHARD_STOP_RANK="$1" -x SAFESHARD_STOP_AT="$2"
}
# A rank list holding rank R, e.g. "2" or "1,2".
has() { echo "rank ([0-9]+,)*$1(,[0-9]+)*"; }
stop_case "before MPI_Init" '"MPI start-up": rank 2 did not arrive \(stopped on this node\)' \
  sh -c 'if [ "$OMPI_COMM_WORLD_RANK" = 2 ]; then kill -STOP $$; fi; exec "$0" "$@"' "${load4[@]}" --share broadcast
stop_case "inside MPI_Init" '"MPI start-up": rank 2 did not arrive \(stopped on this node\)' \
  $(stop_at 2 init) "${load4[@]}" --share broadcast
stop_case "at the first handshake" "\"planning\": $(has 2) did not arrive" \
  $(stop_at 2 handshake) "${load4[@]}" --share broadcast
# Inside a collective, the ranks waiting in it name the stopped one as not answering their
# liveness probe; ranks that went on name it as not arriving at the next phase (whichever
# line comes first: the first rank to abort ends the others). In this plan rank 3 is the root
# of its tensor-parallel pair's broadcasts.
stop_case "inside a broadcast" "\"(broadcast|finish)\": $(has 3) (did not arrive|do(es)? not answer)" \
  $(stop_at 3 broadcast) "${load4[@]}" --share broadcast
stop_case "inside a read-once exchange" "\"read-once( round 1 of 1|: done)\": $(has 2) (did not arrive|do(es)? not answer)" \
  $(stop_at 2 exchange) "${load4[@]}" --share read-once
stop_case "before MPI_Finalize" '"MPI finalize": rank 2 did not arrive \(stopped on this node\)' \
  $(stop_at 2 finalize) "${load4[@]}" --share none

# --rank that contradicts the launcher's rank: refused (exit 2 from the ranks it contradicts).
if timeout 60 mpirun -n 4 "$safeshard" load llama --tp 2 --pp 2 --rank 0 > /dev/null 2> err.txt; then
  echo "FAIL: --rank 0 under mpirun -n 4 accepted"; fail=1
elif ! grep -q "started this process as rank" err.txt; then
  echo "FAIL: --rank 0 under mpirun -n 4: unclear message"; cat err.txt; fail=1
else
  echo "ok: --rank 0 under mpirun -n 4 refused"
fi
# Two simulated nodes (SAFESHARD_NODE, MPMD): read-once --per-node reads the data once per node.
"$safeshard" load llama --tp 2 --dp 2 --all-ranks --digest --json | digests > ref.txt
llama_data=$(python3 -c "
import glob, os, struct
t = 0
for p in glob.glob('llama/*.safetensors'):
    with open(p, 'rb') as f: n = struct.unpack('<Q', f.read(8))[0]
    t += os.path.getsize(p) - 8 - n
print(t)")
timeout 120 mpirun -n 2 -x SAFESHARD_NODE=a "$safeshard" load llama --tp 2 --dp 2 --share read-once --per-node --io pread --digest --json \
  : -n 2 -x SAFESHARD_NODE=b "$safeshard" load llama --tp 2 --dp 2 --share read-once --per-node --io pread --digest --json > out.jsonl
total=$(read_total < out.jsonl)
if ! digests < out.jsonl | diff ref.txt - > /dev/null; then
  echo "FAIL: read-once --per-node: bytes differ"; fail=1
elif (( total > 2 * llama_data )); then
  echo "FAIL: read-once --per-node read $total bytes, more than twice the data ($llama_data)"; fail=1
else
  echo "ok: read-once --per-node on 2 simulated nodes: read $total bytes (data $llama_data, once per node)"
fi

# Without --share the job gets the default for its node count and says so: none on one node,
# broadcast on two simulated nodes (issue 21 item 5).
for nodes in 1 2; do
  timeout 120 mpirun -n 2 -x SAFESHARD_NODE=a "$safeshard" load llama --tp 2 --dp 2 --digest --json \
    : -n 2 -x SAFESHARD_NODE=$([[ $nodes == 1 ]] && echo a || echo b) "$safeshard" load llama --tp 2 --dp 2 --digest --json > out.jsonl
  want=$([[ $nodes == 1 ]] && echo none || echo broadcast)
  if ! digests < out.jsonl | diff ref.txt - > /dev/null; then
    echo "FAIL: no --share on $nodes node(s): bytes differ"; fail=1
  elif ! python3 -c "
import json
ls = [json.loads(l) for l in open('out.jsonl')]
assert all(l['share'] == '$want' and '$nodes node' in l['share_default'] for l in ls), ls
"; then
    echo "FAIL: no --share on $nodes node(s): not $want with its reason"; cat out.jsonl; fail=1
  else
    echo "ok: no --share on $nodes simulated node(s): $want, said why"
  fi
done

# Issue 9 item 1: ranks that disagree on an option fail together, fast, exit 2, each with
# one line naming the option, the values and the ranks (MPMD: rank 0 differs from 1-3).
agree_case() { # expected message, rank 0's flags, ranks 1-3's flags
  local want=$1 a=$2 b=$3 start=$SECONDS
  set +e
  timeout 60 mpirun -n 1 "$safeshard" load llama --tp 2 --pp 2 $a : -n 3 "$safeshard" load llama --tp 2 --pp 2 $b > out.jsonl 2> err.txt
  local rc=$?
  set -e
  if [[ $rc -ne 2 ]]; then
    echo "FAIL: disagreement ($a vs $b): exit $rc, expected 2"; cat err.txt; fail=1
  elif (( SECONDS - start > 30 )); then
    echo "FAIL: disagreement ($a vs $b): took $((SECONDS - start)) s"; fail=1
  elif [[ $(grep -c -F "$want" err.txt) -lt 1 ]] || grep '^error:' err.txt | grep -v -q -F "$want"; then
    echo "FAIL: disagreement ($a vs $b): expected '$want'"; cat err.txt; fail=1
  elif [[ -s out.jsonl ]]; then
    echo "FAIL: disagreement ($a vs $b): a rank printed a result"; fail=1
  else
    echo "ok: $want (exit 2 in $((SECONDS - start)) s)"
  fi
}
agree_case "ranks disagree on --share: rank 0 none, rank 1,2,3 broadcast" "--share none" "--share broadcast"
agree_case "ranks disagree on --share: rank 0 read-once, rank 1,2,3 none" "--share read-once" ""
agree_case "ranks disagree on --verify: rank 0 true, rank 1,2,3 false" "--share broadcast --verify" "--share broadcast"
agree_case "ranks disagree on --digest: rank 0 false, rank 1,2,3 true" "--share none" "--share none --digest"
agree_case "ranks disagree on --round: rank 0 65536, rank 1,2,3 1073741824" "--share read-once --round 64KiB" "--share read-once"
agree_case "ranks disagree on --io: rank 0 pread, rank 1,2,3 auto" "--share broadcast --io pread" "--share broadcast"
agree_case "ranks disagree on --per-node: rank 0 true, rank 1,2,3 false" "--share read-once --per-node" "--share read-once"
# Issue 9 item 3 under mpirun: --round under 64 KiB is a usage error, not a hang.
set +e
timeout 60 mpirun -n 4 "$safeshard" load llama --tp 2 --pp 2 --share read-once --round 100 > /dev/null 2> err.txt
rc=$?
set -e
if [[ $rc -ne 2 ]] || ! grep -q -- "--round" err.txt; then
  echo "FAIL: --round 100 under mpirun: exit $rc"; cat err.txt; fail=1
else
  echo "ok: --round 100 under mpirun refused (exit 2)"
fi
# Issue 9 item 2 through the CLI: stages on different nodes, 64 KiB rounds.
"$safeshard" load toy --tp 2 --pp 2 --pp-layers 2,6 --all-ranks --digest --json | digests > ref.txt
flags="--tp 2 --pp 2 --pp-layers 2,6 --share read-once --per-node --round 64KiB --verify --digest --json --timeout 60s"
if ! timeout 120 mpirun -n 2 -x SAFESHARD_NODE=A "$safeshard" load toy $flags : -n 2 -x SAFESHARD_NODE=B "$safeshard" load toy $flags > out.jsonl 2> err.txt; then
  echo "FAIL: load --per-node with stages on nodes A/B failed or hung"; cat err.txt; fail=1
elif ! digests < out.jsonl | diff ref.txt - > /dev/null; then
  echo "FAIL: load --per-node with stages on nodes A/B: bytes differ"; fail=1
else
  echo "ok: mpirun safeshard load --pp-layers 2,6 --share read-once --per-node --round 64KiB on nodes A/B"
fi

truncate -s -100 llama/model-00002-of-00002.safetensors
start=$SECONDS
if timeout 60 mpirun -n 4 "$safeshard" load llama --tp 2 --pp 2 --share read-once > /dev/null 2> err.txt; then
  echo "FAIL: truncated checkpoint: job succeeded"; fail=1
elif ! grep -q "model-00002-of-00002.safetensors" err.txt; then
  echo "FAIL: truncated checkpoint: message does not name the file"; cat err.txt; fail=1
else
  echo "ok: truncated checkpoint under mpirun: failed in $((SECONDS - start)) s naming the file"
fi
exit $fail
