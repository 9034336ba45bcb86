#!/usr/bin/env bash
# Several nodes on shared storage, simulated on one machine (benchmark set-up, not CI).
#
#   bash bench/multinode-setup.sh CKPT [NODES=2] [RATE_MB_S=200]      # as root
#   bash bench/multinode-setup.sh --teardown
#
# What a multi-node job sees: each node has its own page cache, and every node reads the
# checkpoint from one storage server of limited rate. Two ways to build that here:
#
# 1. NFS (what the benchmark asks for): export CKPT's directory from the kernel NFS server on
#    loopback, throttle loopback with `tc` (token bucket at RATE), and mount it NODES times
#    with `nosharecache`, so that every mount has its own page cache; each "node" runs its
#    ranks on its own mount.
# 2. Fallback when this kernel has no NFS (a VM or container without the nfs/nfsd
#    filesystems): one copy of the checkpoint per node (separate files have separate page
#    caches, as separate mounts would) and a blkio cgroup that throttles reads from the disk
#    holding them to RATE for every process in it (the storage server's rate, shared by all
#    nodes). bench/job.py --cgroup puts the launcher, so every rank, in it.
#
# Either way it prints the bench/job.py command for the comparison (per-rank reading,
# broadcast, read-once, read-once --per-node and the peers).
set -euo pipefail

state=/run/safeshard-multinode
if [[ ${1:-} == --teardown ]]; then
  for m in /mnt/safeshard-node*; do mountpoint -q "$m" && umount "$m"; done 2>/dev/null || true
  tc qdisc del dev lo root 2>/dev/null || true
  exportfs -ua 2>/dev/null || true
  [[ -d /sys/fs/cgroup/blkio/safeshard-storage ]] && rmdir /sys/fs/cgroup/blkio/safeshard-storage
  rm -rf "$state"
  echo "torn down (node copies under \$CKPT.nodes are kept: remove them by hand)"
  exit 0
fi
ckpt=$(realpath "${1:?usage: multinode-setup.sh CKPT [NODES] [RATE_MB_S]}")
nodes=${2:-2}
rate=${3:-200}
mkdir -p "$state"

nfs_ok() {
  grep -qw nfs /proc/filesystems && grep -qw nfsd /proc/filesystems
}

if nfs_ok; then
  mountpoint -q /proc/fs/nfsd || mount -t nfsd nfsd /proc/fs/nfsd
  rpcbind 2>/dev/null || true
  exportfs -o ro,insecure,no_root_squash,no_subtree_check "127.0.0.1:$ckpt"
  rpc.nfsd 8
  rpc.mountd
  # 200 MB/s = 1600 Mbit/s on loopback (also every other loopback flow: gloo's TCP too).
  tc qdisc replace dev lo root tbf rate "$((rate * 8))mbit" burst 4mb latency 100ms
  dirs=()
  for ((k = 0; k < nodes; k++)); do
    m=/mnt/safeshard-node$k
    mkdir -p "$m"
    mountpoint -q "$m" || mount -t nfs -o ro,vers=4.2,nosharecache,rsize=1048576 "127.0.0.1:$ckpt" "$m"
    dirs+=("$m")
  done
  cgroup=""
  echo "NFS: $ckpt served on 127.0.0.1, loopback throttled to $rate MB/s, mounted at ${dirs[*]}"
else
  why=$(grep -E 'nfs' /proc/filesystems || true)
  echo "no kernel NFS here: /proc/filesystems lists ${why:-neither nfs nor nfsd}" \
       "(and 'mount -t nfsd' fails: unknown filesystem type); using copies + a blkio throttle" >&2
  dirs=()
  for ((k = 0; k < nodes; k++)); do
    d=$ckpt.nodes/node$k
    if [[ ! -d $d ]]; then
      mkdir -p "$d"
      cp -a "$ckpt"/. "$d"/
    fi
    dirs+=("$d")
  done
  majmin=$(stat -c '%Hd:%Ld' "${dirs[0]}/config.json")
  # A partition throttles on its whole disk: blkio accounts by the disk's major:minor.
  if [[ -e /sys/dev/block/$majmin/partition ]]; then
    majmin=$(cat "$(readlink -f "/sys/dev/block/$majmin")/../dev")
  fi
  disk=$(basename "$(readlink -f "/sys/dev/block/$majmin")")
  cgroup=/sys/fs/cgroup/blkio/safeshard-storage
  mkdir -p "$cgroup"
  echo "$majmin $((rate * 1000000))" > "$cgroup/blkio.throttle.read_bps_device"
  echo "copies at ${dirs[*]}; reads from $disk ($majmin) throttled to $rate MB/s in $cgroup"
fi
joined=$(IFS=,; echo "${dirs[*]}")
echo "$joined" > "$state/dirs"
cat <<EOF

run the comparison (W ranks split evenly over $nodes nodes):
  python3 bench/job.py ${dirs[0]} --world 4 --modes cold --reps 3 --nodes $nodes \\
    --node-dirs $joined ${cgroup:+--cgroup $cgroup} --no-floors \\
    --loaders mpirun:cli-none,mpirun:cli-broadcast,mpirun:cli-read-once,mpirun:cli-read-once-per-node,mpirun:cli-default,torchrun:st,torchrun:runai,torchrun:runai-dist,torchrun:fst-dist
tear down: bash bench/multinode-setup.sh --teardown
EOF
