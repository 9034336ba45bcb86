//! The schedules checked without a communicator, on real plans of synthetic checkpoints.
//! Expected values come from the plan's copy runs, expanded byte by byte here.

use std::collections::BTreeSet;

use super::schedule::{cut_pieces, BroadcastSchedule, ReadOnceSchedule};
use super::*;
use crate::synth::{self, SynthOptions};
use crate::topology::Topology;
use crate::Job;

fn job(dir: &std::path::Path, topo: Topology) -> Job {
    let opts = SynthOptions::preset("llama-tiny").unwrap().with_layers(8);
    synth::write_checkpoint(dir, &opts).unwrap();
    Job::open(dir, topo, None, &[]).unwrap()
}

/// A byte mapping arena offset -> (file, offset) as (dst, file, src, len) pieces.
type Map = Vec<(u64, u32, u64, u64)>;

/// Sorted by destination, checked for overlaps (a byte written twice), contiguous pieces
/// merged: two maps are equal exactly when they map the same bytes the same way.
fn normalize(mut m: Map) -> Map {
    m.retain(|p| p.3 > 0);
    m.sort_unstable();
    let mut out: Map = Vec::new();
    for p in m {
        match out.last_mut() {
            Some(l) => {
                assert!(l.0 + l.3 <= p.0, "arena byte {} written twice", p.0);
                if l.0 + l.3 == p.0 && l.1 == p.1 && l.2 + l.3 == p.2 {
                    l.3 += p.3;
                } else {
                    out.push(p);
                }
            }
            None => out.push(p),
        }
    }
    out
}

/// The bytes a rank must hold, from its plan's runs.
fn needed(plan: &Plan, rank: usize) -> Map {
    let mut m = Vec::new();
    for r in &plan.ranks[rank].copies {
        for i in 0..r.count {
            m.push((
                r.dst + i * r.dst_stride,
                r.file,
                r.src + i * r.src_stride,
                r.len,
            ));
        }
    }
    normalize(m)
}

/// `m` restricted to arena bytes `[a, b)`.
fn clip(m: &Map, a: u64, b: u64) -> Map {
    m.iter()
        .filter_map(|&(d, f, s, l)| {
            let (x, y) = (d.max(a), (d + l).min(b));
            (y > x).then(|| (x, f, s + (x - d), y - x))
        })
        .collect()
}

/// File ranges (file, start, len), sorted; with `disjoint`, overlaps are a failure.
fn ranges(mut v: Vec<(u32, u64, u64)>, disjoint: bool) -> Vec<(u32, u64, u64)> {
    v.retain(|r| r.2 > 0);
    v.sort_unstable();
    let mut out: Vec<(u32, u64, u64)> = Vec::new();
    for r in v {
        match out.last_mut() {
            Some(l) if l.0 == r.0 && r.1 <= l.1 + l.2 => {
                assert!(
                    !disjoint || r.1 == l.1 + l.2,
                    "file byte {} read twice",
                    r.1
                );
                l.2 = l.2.max(r.1 + r.2 - l.1);
            }
            _ => out.push(r),
        }
    }
    out
}

fn total(v: &[(u32, u64, u64)]) -> u64 {
    v.iter().map(|r| r.2).sum()
}

#[test]
fn broadcast_schedule_reads_each_shared_tensor_once_and_fills_every_byte() {
    let dir = tempfile::tempdir().unwrap();
    let mut topo = Topology::new(2, 2, 2, 1).unwrap();
    topo.pp_layers = Some(vec![3, 5]);
    let job = job(dir.path(), topo);
    let plan = &job.plan;
    let s = BroadcastSchedule::new(plan);
    let mut read = Vec::new();
    for rank in 0..plan.ranks.len() {
        let need = needed(plan, rank);
        let mut filled: Map = Vec::new();
        for seg in s.own_reads(plan, rank) {
            read.push((seg.file, seg.src, seg.len));
            filled.push((seg.dst, seg.file, seg.src, seg.len));
        }
        // What the rank receives: whole tensors it does not own.
        for b in s.broadcasts(rank) {
            let t = &plan.ranks[rank].tensors[b.tensor];
            if !b.is_root {
                filled.extend(clip(&need, t.offset, t.offset + t.bytes));
            }
        }
        assert_eq!(normalize(filled), need, "rank {rank}");
    }
    // Replicas (dp 2) and replicated tensors are read once: the job reads the union of the
    // bytes it needs, each byte once.
    let union = ranges(
        (0..plan.ranks.len())
            .flat_map(|r| needed(plan, r))
            .map(|(_, f, s, l)| (f, s, l))
            .collect(),
        false,
    );
    let read_total: u64 = read.iter().map(|r| r.2).sum();
    assert_eq!(ranges(read, true), union);
    assert_eq!(read_total, total(&union));
    // Batches: every holder of a set packs the same tensors in the same order, the root is
    // the tensors' owner, and no batch of several tensors exceeds the limit.
    let limit = 4096;
    let per_rank: Vec<_> = (0..plan.ranks.len())
        .map(|r| s.batches(plan, r, limit))
        .collect();
    let mut batched = 0;
    for (si, members) in s.sets.iter().enumerate() {
        let view = |r: usize| -> Vec<(usize, u64, Vec<String>)> {
            per_rank[r]
                .iter()
                .filter(|b| b.set == si)
                .map(|b| {
                    let names = b
                        .tensors
                        .iter()
                        .map(|&t| plan.ranks[r].tensors[t].name.clone())
                        .collect();
                    (b.root, b.bytes, names)
                })
                .collect()
        };
        let first = view(members[0]);
        for &m in members {
            assert_eq!(view(m), first, "set {si} rank {m}");
        }
        for (root, bytes, names) in &first {
            assert!(names.len() == 1 || *bytes <= limit);
            batched += names.len();
            let owner = members[*root];
            for b in per_rank[owner]
                .iter()
                .filter(|b| b.set == si && b.root == *root)
            {
                assert!(b.is_root);
            }
        }
    }
    assert_eq!(batched, s.shared.len());
}

#[test]
fn read_once_schedules_agree_between_members_and_deliver_every_byte_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut topo = Topology::new(2, 2, 1, 1).unwrap();
    // Unequal stages: the two "nodes" {0,1} and {2,3} need different numbers of rounds.
    topo.pp_layers = Some(vec![2, 6]);
    let job = job(dir.path(), topo);
    let plan = &job.plan;
    let round = MIN_ROUND_BYTES;
    let mut rounds_per_group = Vec::new();
    for members in [vec![0usize, 1], vec![2, 3], vec![0, 1, 2, 3]] {
        let n = members.len();
        let scheds: Vec<ReadOnceSchedule> = (0..n)
            .map(|me| ReadOnceSchedule::new(plan, &members, me, round))
            .collect();
        let rounds = scheds[0].rounds;
        assert!(scheds.iter().all(|s| s.rounds == rounds));
        // The group's union, cut into rounds of at most `round` bytes.
        let union = ranges(
            members
                .iter()
                .flat_map(|&r| needed(plan, r))
                .map(|(_, f, s, l)| (f, s, l))
                .collect(),
            false,
        );
        assert_eq!(rounds as u64, total(&union).div_ceil(round));
        let mut read = Vec::new();
        for r in 0..rounds {
            for (o, so) in scheds.iter().enumerate() {
                // Balanced within a round: a member reads at most its share, rounded up.
                assert!(so.staging_bytes(r) <= round.div_ceil(n as u64));
                read.extend(so.own_pieces(r).iter().map(|p| (p.file, p.src, p.len)));
                // What o sends d is what d expects from o.
                for (d, sd) in scheds.iter().enumerate() {
                    assert_eq!(so.send_counts(r)[d], sd.recv_counts(r)[o], "round {r}");
                }
            }
        }
        assert_eq!(ranges(read, true), union);
        // Every member's bytes arrive exactly once, at the right arena offsets.
        for (d, sd) in scheds.iter().enumerate() {
            let mut got: Map = Vec::new();
            for r in 0..rounds {
                for (o, so) in scheds.iter().enumerate() {
                    for x in sd.receives(r, o) {
                        let p = so.pieces[x.piece];
                        got.push((x.dst, p.file, p.start + x.off, x.len));
                    }
                }
            }
            assert_eq!(normalize(got), needed(plan, members[d]), "member {d}");
        }
        rounds_per_group.push(rounds);
    }
    // The regression of issue 9 item 2: the two nodes need different numbers of rounds.
    assert_ne!(rounds_per_group[0], rounds_per_group[1]);
}

#[test]
fn pieces_cover_the_union_once_and_balance() {
    let segs = vec![(0, 0, 100), (0, 50, 150), (1, 10, 20), (0, 300, 310)];
    let pieces = cut_pieces(segs, 3, 64);
    // union: file0 [0,150) [300,310), file1 [10,20) → 170 bytes
    let total: u64 = pieces.iter().map(|p| p.end - p.start).sum();
    assert_eq!(total, 170);
    let mut covered = BTreeSet::new();
    for p in &pieces {
        for b in p.start..p.end {
            assert!(covered.insert((p.file, b)), "byte read twice");
        }
    }
    // rounds of 64, 64, 42 bytes → owners get 21/22 bytes, 21/22, 14
    let rounds = pieces.iter().map(|p| p.round).max().unwrap() + 1;
    assert_eq!(rounds, 3);
    for r in 0..rounds {
        let per: Vec<u64> = (0..3)
            .map(|o| {
                pieces
                    .iter()
                    .filter(|p| p.round == r && p.owner == o)
                    .map(|p| p.end - p.start)
                    .sum()
            })
            .collect();
        let max = *per.iter().max().unwrap();
        let min = *per.iter().min().unwrap();
        assert!(max - min <= 1, "{per:?}");
    }
}

#[test]
fn options_are_validated_and_fingerprinted_by_field() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path(), Topology::new(2, 1, 1, 1).unwrap());
    for bad in [0, 100, MIN_ROUND_BYTES - 1] {
        let o = ShareOptions {
            round_bytes: bad,
            ..Default::default()
        };
        let e = o.validate().unwrap_err();
        assert!(e.is_usage(), "{e}");
        assert!(e.to_string().starts_with("round_bytes "), "{e}");
        assert!(!e.to_string().contains("--"), "{e}");
    }
    let read_once = ShareOptions {
        mode: ShareMode::ReadOnce,
        round_bytes: MIN_ROUND_BYTES,
        ..Default::default()
    };
    read_once.validate().unwrap();
    let names: Vec<String> = read_once
        .fingerprint(&job.plan)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(
        names,
        [
            "version",
            "world size",
            "mode",
            "per_node",
            "round_bytes",
            "io",
            "plan"
        ]
    );
    // Options that do not shape a mode's collectives are not compared.
    let none: Vec<String> = ShareOptions::default()
        .fingerprint(&job.plan)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(none, ["version", "world size", "mode", "plan"]);
    assert!("all".parse::<ShareMode>().unwrap_err().is_usage());
    assert_eq!(ShareMode::ReadOnce.to_string(), "read-once");
}

#[test]
fn read_once_messages_pair_up_and_cover_every_transfer_once() {
    use super::schedule::SMALL_MESSAGE;
    let dir = tempfile::tempdir().unwrap();
    let (mut direct, mut packed, mut bundled) = (0u64, 0u64, 0u64);
    for (i, (tp, pp, dp)) in [(4, 1, 1), (2, 2, 1), (2, 1, 2)].into_iter().enumerate() {
        let job = job(
            &dir.path().join(i.to_string()),
            Topology::new(tp, pp, dp, 1).unwrap(),
        );
        let plan = &job.plan;
        let members: Vec<usize> = (0..plan.ranks.len()).collect();
        for round in [MIN_ROUND_BYTES, 1 << 20] {
            let s: Vec<ReadOnceSchedule> = (0..members.len())
                .map(|me| ReadOnceSchedule::new(plan, &members, me, round))
                .collect();
            for r in 0..s[0].rounds {
                for (o, so) in s.iter().enumerate() {
                    let mut packs = 0;
                    for (d, sd) in s.iter().enumerate() {
                        // Both sides see the same transfers, cut the same way.
                        let xs = so.sends(r, d);
                        assert_eq!(xs, sd.receives(r, o));
                        let p = so.send_plan(r, d);
                        assert_eq!(p, sd.recv_plan(r, o));
                        // Direct messages and bundle runs partition the list, in order.
                        let mut runs: Vec<_> = p.direct.iter().chain(&p.bundle).cloned().collect();
                        runs.sort_by_key(|x| x.start);
                        let mut next = 0;
                        for run in &runs {
                            assert_eq!(run.start, next);
                            next = run.end;
                            let m = &xs[run.clone()];
                            // A run lands back to back in the receiver's arena.
                            for w in m.windows(2) {
                                assert_eq!(w[0].dst + w[0].len, w[1].dst);
                            }
                            let len: u64 = m.iter().map(|x| x.len).sum();
                            let is_direct = p.direct.contains(run);
                            assert_eq!(is_direct, len >= SMALL_MESSAGE, "run {run:?}");
                            if d == o {
                                continue;
                            }
                            match (is_direct, so.contiguous_in_staging(m)) {
                                (true, true) => direct += len,
                                (true, false) => {
                                    packed += len;
                                    packs += len;
                                }
                                (false, _) => {
                                    bundled += len;
                                    packs += len;
                                }
                            }
                        }
                        assert_eq!(next, xs.len());
                    }
                    assert_eq!(so.packed_bytes(r), packs, "round {r} member {o}");
                }
            }
        }
    }
    // Every kind of message occurs: straight from staging, packed first, bundled.
    assert!(
        direct > 0 && packed > 0 && bundled > 0,
        "{direct} {packed} {bundled}"
    );
}
