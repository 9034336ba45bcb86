#!/usr/bin/env bash
# Runs `safeshard load` as one MPI process per rank.
#
#   launch/mpirun.sh CHECKPOINT --tp 2 --pp 2 [--dp 1] [--share read-once] [--json] ...
#
# The number of processes is tp × pp × dp from the flags (override with NP=...). Environment:
#   SAFESHARD   the binary (default: `safeshard` on PATH, else target/release/safeshard);
#               it must be built with `--features mpi` against the MPI of this mpirun
#   HOSTFILE    an Open MPI hostfile for multi-node jobs (add --per-node to read once per node)
#   MPIRUN_ARGS extra mpirun flags, e.g. "--oversubscribe" on a laptop
set -euo pipefail

bin=${SAFESHARD:-}
if [[ -z $bin ]]; then
  if command -v safeshard > /dev/null; then bin=$(command -v safeshard)
  else bin="$(cd "$(dirname "$0")/.." && pwd)/target/release/safeshard"; fi
fi
[[ -x $bin ]] || { echo "mpirun.sh: $bin is not an executable (set SAFESHARD)" >&2; exit 2; }

tp=1 pp=1 dp=1
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case ${args[i]} in
    --tp) tp=${args[i + 1]:-1} ;; --tp=*) tp=${args[i]#--tp=} ;;
    --pp) pp=${args[i + 1]:-1} ;; --pp=*) pp=${args[i]#--pp=} ;;
    --dp) dp=${args[i + 1]:-1} ;; --dp=*) dp=${args[i]#--dp=} ;;
  esac
done
for v in "$tp" "$pp" "$dp"; do
  [[ $v =~ ^[1-9][0-9]*$ ]] || { echo "mpirun.sh: --tp/--pp/--dp must be positive integers" >&2; exit 2; }
done
np=${NP:-$((tp * pp * dp))}

flags=(-n "$np" --bind-to none -x SAFESHARD_LOG -x SAFESHARD_NODE -x LD_LIBRARY_PATH)
[[ $(id -u) -eq 0 ]] && flags+=(--allow-run-as-root)
[[ -n ${HOSTFILE:-} ]] && flags+=(--hostfile "$HOSTFILE")

# shellcheck disable=SC2086 # MPIRUN_ARGS is a list of flags
exec mpirun "${flags[@]}" ${MPIRUN_ARGS:-} "$bin" load "$@"
