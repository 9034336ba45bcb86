//! Loading one rank of a job under a share mode.
//!
//! Every rank calls [`load_rank`] with the same plan and its world communicator. The modes:
//!
//! - [`ShareMode::None`]: every rank reads its own segments from storage.
//! - [`ShareMode::Broadcast`]: a tensor that several ranks hold byte for byte (same name, same
//!   size, same source segments: norms, replicated KV heads, the same slice in every DP
//!   replica) is read by one owner, the member with the least bytes to read so far (so owners
//!   spread across ranks), and broadcast on a sub-communicator of exactly its holders.
//!   Sub-communicators are made once per distinct holder set; disjoint sets share one split.
//!   Each rank takes part in the broadcasts in one global order, which cannot deadlock.
//! - [`ShareMode::ReadOnce`]: the union of all byte ranges the job needs is cut into rounds of
//!   at most [`ShareOptions::round_bytes`], each round into one contiguous piece per rank; each
//!   rank reads its pieces and an all-to-all-v hands every rank the bytes of its segments.
//!   With [`ShareOptions::per_node`] this happens within each node (ranks grouped by host
//!   name), so each node reads the checkpoint once.
//!
//! Every local step that can fail ends with [`agree`] on the world communicator.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::time::Instant;

use super::exec::{check_rank, new_arena, rank_segments, segment_runs, slice_range, Segment};
use super::{agree, check_same_plan, node_comm, Communicator};
use crate::load::{execute, LoadOptions};
use crate::plan::{CopyRun, Plan, RankPlan};
use crate::{Error, Result};

/// How ranks share the reading of the checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ShareMode {
    /// Every rank reads its own slices.
    #[default]
    None,
    /// Bytes held by several ranks are read by one and broadcast to the others.
    Broadcast,
    /// Every needed byte is read once per job (or per node) and scattered with all-to-all-v.
    ReadOnce,
}

impl FromStr for ShareMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(ShareMode::None),
            "broadcast" => Ok(ShareMode::Broadcast),
            "read-once" => Ok(ShareMode::ReadOnce),
            _ => Err(Error::Usage(format!(
                "--share {s:?}: expected none, broadcast or read-once"
            ))),
        }
    }
}

impl fmt::Display for ShareMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ShareMode::None => "none",
            ShareMode::Broadcast => "broadcast",
            ShareMode::ReadOnce => "read-once",
        })
    }
}

/// Options of a shared load (the `--share`, `--per-node` flags).
#[derive(Clone, Debug)]
pub struct ShareOptions {
    /// The share mode.
    pub mode: ShareMode,
    /// Read-once per node instead of per job.
    pub per_node: bool,
    /// This rank's node name for `per_node` (default: the host name).
    pub node: Option<String>,
    /// Read-once: bytes of the job's union read per round (bounds staging memory to about
    /// this divided by the group size, plus the bytes sent).
    pub round_bytes: u64,
    /// How the bytes a rank reads itself are read (the loader's engine and its options).
    pub load: LoadOptions,
}

impl Default for ShareOptions {
    fn default() -> Self {
        ShareOptions {
            mode: ShareMode::None,
            per_node: false,
            node: None,
            round_bytes: 1 << 30,
            load: LoadOptions::default(),
        }
    }
}

/// One rank's loaded bytes and what it cost.
#[derive(Debug)]
pub struct RankLoad {
    /// Global rank.
    pub rank: usize,
    /// The rank's arena, laid out as [`RankPlan::tensors`] says.
    pub arena: Vec<u8>,
    /// Bytes read from storage by this rank.
    pub read_bytes: u64,
    /// Bytes this rank sent to other ranks.
    pub sent_bytes: u64,
    /// Bytes this rank received from other ranks.
    pub received_bytes: u64,
    /// Wall time of the load, seconds.
    pub seconds: f64,
}

/// Loads this rank's plan under `opts.mode`, cooperating with the other ranks of `world`.
///
/// Collective on `world`: every rank of the job must call it with an equal plan. Fails on
/// every rank (never hangs) when any rank fails; the error of a rank that failed itself is its
/// own (naming the file), the others name the failed rank.
pub fn load_rank(plan: &Plan, world: &dyn Communicator, opts: &ShareOptions) -> Result<RankLoad> {
    let start = Instant::now();
    let me = world.rank();
    let setup = (|| {
        if world.size() != plan.ranks.len() {
            return Err(Error::Usage(format!(
                "the job has {} ranks but the plan has {}",
                world.size(),
                plan.ranks.len()
            )));
        }
        for r in &plan.ranks {
            check_rank(plan, r)?;
        }
        Ok(())
    })();
    agree(world, setup)?;
    // Plan::hash leaves out paths, inodes and mtimes, which differ between nodes holding
    // copies of the same checkpoint.
    check_same_plan(world, &plan.hash())?;
    let rp = plan
        .ranks
        .get(me)
        .ok_or_else(|| Error::Comm(format!("rank {me} is not in the plan")))?;
    let arena = agree(world, new_arena(rp))?;
    let mut load = RankLoad {
        rank: me,
        arena,
        read_bytes: 0,
        sent_bytes: 0,
        received_bytes: 0,
        seconds: 0.0,
    };
    match opts.mode {
        ShareMode::None => {
            let r = execute(&plan.files, &rp.copies, &[], &mut load.arena, &opts.load);
            load.read_bytes = agree(world, r)?.read_bytes;
        }
        ShareMode::Broadcast => broadcast_mode(plan, world, opts, &mut load)?,
        ShareMode::ReadOnce => read_once_mode(plan, world, opts, &mut load)?,
    }
    load.seconds = start.elapsed().as_secs_f64();
    Ok(load)
}

// ---------------------------------------------------------------------------------------
// broadcast

/// A rank's segments split at tensor boundaries: per tensor (arena offsets relative to the
/// tensor), and the segments that fall in no tensor (read privately).
struct Split {
    per_tensor: Vec<Vec<Segment>>,
    orphans: Vec<Segment>,
}

fn split_by_tensor(rp: &RankPlan) -> Split {
    let mut order: Vec<usize> = (0..rp.tensors.len()).collect();
    order.sort_by_key(|&i| rp.tensors.get(i).map(|t| t.offset).unwrap_or(0));
    let starts: Vec<u64> = order
        .iter()
        .map(|&i| rp.tensors.get(i).map(|t| t.offset).unwrap_or(0))
        .collect();
    let mut out = Split {
        per_tensor: vec![Vec::new(); rp.tensors.len()],
        orphans: Vec::new(),
    };
    for seg in rank_segments(rp) {
        let (mut pos, mut src, end) = (seg.dst, seg.src, seg.dst + seg.len);
        while pos < end {
            let k = starts.partition_point(|&s| s <= pos);
            let containing = k
                .checked_sub(1)
                .and_then(|j| order.get(j))
                .and_then(|&ti| rp.tensors.get(ti).map(|t| (ti, t)))
                .filter(|(_, t)| pos < t.offset + t.bytes);
            let take = match containing {
                Some((ti, t)) => {
                    let take = (t.offset + t.bytes).min(end) - pos;
                    if let Some(v) = out.per_tensor.get_mut(ti) {
                        v.push(Segment {
                            file: seg.file,
                            src,
                            len: take,
                            dst: pos - t.offset,
                        });
                    }
                    take
                }
                None => {
                    let next = starts.get(k).copied().unwrap_or(end).min(end);
                    let take = next.saturating_sub(pos).max(1).min(end - pos);
                    out.orphans.push(Segment {
                        file: seg.file,
                        src,
                        len: take,
                        dst: pos,
                    });
                    take
                }
            };
            pos += take;
            src += take;
        }
    }
    out
}

struct SharedTensor {
    /// (rank, tensor index) of every holder, ranks ascending and distinct.
    holders: Vec<(usize, usize)>,
    owner: usize,
}

/// Groups the job's tensors by content and picks an owner for each shared one.
/// Returns the shared groups and, per rank, which of its tensors it reads itself.
fn plan_broadcast(plan: &Plan, splits: &[Split]) -> (Vec<SharedTensor>, Vec<Vec<bool>>) {
    let mut index: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut groups: Vec<Vec<(usize, usize)>> = Vec::new();
    let mut group_of: Vec<Vec<Option<usize>>> = Vec::new();
    for (r, (rp, sp)) in plan.ranks.iter().zip(splits).enumerate() {
        let mut mine = vec![None; rp.tensors.len()];
        for (ti, t) in rp.tensors.iter().enumerate() {
            let mut key = Vec::new();
            key.extend_from_slice(t.name.as_bytes());
            key.push(0);
            key.extend_from_slice(format!("{}{:?}", t.dtype, t.shape).as_bytes());
            key.extend_from_slice(&t.bytes.to_le_bytes());
            for s in sp.per_tensor.get(ti).into_iter().flatten() {
                for w in [u64::from(s.file), s.src, s.len, s.dst] {
                    key.extend_from_slice(&w.to_le_bytes());
                }
            }
            let g = *index.entry(key).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            if let Some(members) = groups.get_mut(g) {
                // A rank holding the same bytes twice reads the second copy itself.
                if members.last().map(|&(mr, _)| mr) != Some(r) {
                    members.push((r, ti));
                    if let Some(m) = mine.get_mut(ti) {
                        *m = Some(g);
                    }
                }
            }
        }
        group_of.push(mine);
    }
    // Balance: start from each rank's private bytes, give each shared tensor to the member
    // with the least bytes so far.
    let seg_bytes = |r: usize, ti: usize| -> u64 {
        splits
            .get(r)
            .and_then(|s| s.per_tensor.get(ti))
            .map(|v| v.iter().map(|s| s.len).sum())
            .unwrap_or(0)
    };
    let mut load: Vec<u64> = splits
        .iter()
        .map(|s| s.orphans.iter().map(|s| s.len).sum())
        .collect();
    for members in &groups {
        if members.len() == 1 {
            if let Some(&(r, ti)) = members.first() {
                if let Some(l) = load.get_mut(r) {
                    *l += seg_bytes(r, ti);
                }
            }
        }
    }
    let mut shared = Vec::new();
    let mut reads: Vec<Vec<bool>> = group_of
        .iter()
        .map(|g| g.iter().map(Option::is_none).collect())
        .collect();
    for members in groups {
        if members.len() == 1 {
            if let Some(&(r, ti)) = members.first() {
                if let Some(x) = reads.get_mut(r).and_then(|v| v.get_mut(ti)) {
                    *x = true;
                }
            }
            continue;
        }
        let Some(&(owner, oti)) = members
            .iter()
            .min_by_key(|&&(r, _)| (load.get(r).copied().unwrap_or(u64::MAX), r))
        else {
            continue;
        };
        if let Some(l) = load.get_mut(owner) {
            *l += seg_bytes(owner, oti);
        }
        if let Some(x) = reads.get_mut(owner).and_then(|v| v.get_mut(oti)) {
            *x = true;
        }
        shared.push(SharedTensor {
            holders: members,
            owner,
        });
    }
    (shared, reads)
}

fn broadcast_mode(
    plan: &Plan,
    world: &dyn Communicator,
    opts: &ShareOptions,
    load: &mut RankLoad,
) -> Result<()> {
    let me = load.rank;
    let splits: Vec<Split> = plan.ranks.iter().map(split_by_tensor).collect();
    let (shared, reads) = plan_broadcast(plan, &splits);
    let rp = plan
        .ranks
        .get(me)
        .ok_or_else(|| Error::Comm(format!("rank {me} is not in the plan")))?;

    // Read what this rank reads itself.
    let mut segs: Vec<Segment> = Vec::new();
    if let Some(my) = splits.get(me) {
        segs.extend_from_slice(&my.orphans);
        for (ti, t) in rp.tensors.iter().enumerate() {
            if !reads
                .get(me)
                .and_then(|v| v.get(ti))
                .copied()
                .unwrap_or(true)
            {
                continue;
            }
            segs.extend(
                my.per_tensor
                    .get(ti)
                    .into_iter()
                    .flatten()
                    .map(|s| Segment {
                        dst: s.dst + t.offset,
                        ..*s
                    }),
            );
        }
    }
    let r = execute(
        &plan.files,
        &segment_runs(&segs),
        &[],
        &mut load.arena,
        &opts.load,
    );
    load.read_bytes = agree(world, r)?.read_bytes;

    // One sub-communicator per distinct holder set; disjoint sets share a split.
    let mut sets: Vec<Vec<usize>> = Vec::new();
    let mut set_of: Vec<usize> = Vec::with_capacity(shared.len());
    let mut set_index: HashMap<Vec<usize>, usize> = HashMap::new();
    for st in &shared {
        let ranks: Vec<usize> = st.holders.iter().map(|&(r, _)| r).collect();
        let i = *set_index.entry(ranks.clone()).or_insert_with(|| {
            sets.push(ranks);
            sets.len() - 1
        });
        set_of.push(i);
    }
    let mut layers: Vec<Vec<usize>> = Vec::new();
    let mut used: Vec<Vec<bool>> = Vec::new();
    for (si, set) in sets.iter().enumerate() {
        let fit = used
            .iter()
            .position(|u| set.iter().all(|&r| !u.get(r).copied().unwrap_or(false)));
        let li = match fit {
            Some(li) => li,
            None => {
                layers.push(Vec::new());
                used.push(vec![false; plan.ranks.len()]);
                layers.len() - 1
            }
        };
        if let (Some(l), Some(u)) = (layers.get_mut(li), used.get_mut(li)) {
            l.push(si);
            for &r in set {
                if let Some(x) = u.get_mut(r) {
                    *x = true;
                }
            }
        }
    }
    let mut comms: HashMap<usize, Box<dyn Communicator>> = HashMap::new();
    for layer in &layers {
        let mine = layer
            .iter()
            .position(|&si| sets.get(si).is_some_and(|s| s.contains(&me)));
        let color = mine.map(|p| p as u32);
        if let Some(c) = world.split(color, me)? {
            if let Some(&si) = mine.and_then(|p| layer.get(p)) {
                comms.insert(si, c);
            }
        }
    }

    // Broadcast in one global order.
    for (st, &si) in shared.iter().zip(&set_of) {
        let Some(&(_, ti)) = st.holders.iter().find(|&&(r, _)| r == me) else {
            continue;
        };
        let comm = comms
            .get(&si)
            .ok_or_else(|| Error::Comm("missing sub-communicator".into()))?;
        let root = st
            .holders
            .iter()
            .position(|&(r, _)| r == st.owner)
            .ok_or_else(|| Error::Comm("owner is not a holder".into()))?;
        let t = rp
            .tensors
            .get(ti)
            .ok_or_else(|| Error::Comm("tensor index out of range".into()))?;
        let range = slice_range(t.offset, t.bytes, load.arena.len())?;
        let buf = load
            .arena
            .get_mut(range)
            .ok_or_else(|| Error::Comm("tensor outside the arena".into()))?;
        comm.broadcast(root, buf)?;
        if st.owner == me {
            load.sent_bytes += t.bytes * (st.holders.len() as u64 - 1);
        } else {
            load.received_bytes += t.bytes;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// read-once

#[derive(Clone, Copy, Debug)]
struct Piece {
    file: u32,
    start: u64,
    end: u64,
    round: usize,
    owner: usize,
    /// Offset in the owner's buffer for this round.
    buf_off: u64,
}

/// Cuts the union of `segs` into pieces: rounds of at most `round_bytes`, each split evenly
/// among `n` owners. Pieces come sorted by (file, start).
fn cut_pieces(mut segs: Vec<(u32, u64, u64)>, n: usize, round_bytes: u64) -> Vec<Piece> {
    segs.sort_unstable();
    let mut union: Vec<(u32, u64, u64)> = Vec::new();
    for (f, s, e) in segs {
        match union.last_mut() {
            Some(last) if last.0 == f && s <= last.2 => last.2 = last.2.max(e),
            _ => union.push((f, s, e)),
        }
    }
    let total: u64 = union.iter().map(|u| u.2 - u.1).sum();
    let round_bytes = round_bytes.max(1);
    let n64 = n.max(1) as u64;
    // Boundaries in the concatenated space: round k owner j starts at
    // k*R + j*L_k/n where L_k is the round's length.
    let mut bounds: Vec<(u64, usize, usize)> = Vec::new(); // (start, round, owner)
    let mut k = 0usize;
    let mut a = 0u64;
    while a < total {
        let len = round_bytes.min(total - a);
        for j in 0..n64 {
            let s = a + (len as u128 * j as u128 / n64 as u128) as u64;
            let e = a + (len as u128 * (j + 1) as u128 / n64 as u128) as u64;
            if e > s {
                bounds.push((s, k, j as usize));
            }
        }
        a += len;
        k += 1;
    }
    let mut pieces = Vec::new();
    let mut bi = 0usize;
    let mut pos = 0u64; // concatenated position of the start of the current interval
    let mut buf_off: HashMap<(usize, usize), u64> = HashMap::new();
    for (f, s, e) in union {
        let mut c = pos; // concatenated cursor
        let cend = pos + (e - s);
        while c < cend {
            while bounds.get(bi + 1).is_some_and(|b| b.0 <= c) {
                bi += 1;
            }
            let Some(&(_, round, owner)) = bounds.get(bi) else {
                break;
            };
            let bound_end = bounds.get(bi + 1).map(|b| b.0).unwrap_or(total);
            let take_end = bound_end.min(cend);
            let off = buf_off.entry((round, owner)).or_insert(0);
            pieces.push(Piece {
                file: f,
                start: s + (c - pos),
                end: s + (take_end - pos),
                round,
                owner,
                buf_off: *off,
            });
            *off += take_end - c;
            c = take_end;
        }
        pos = cend;
    }
    pieces
}

fn read_once_mode(
    plan: &Plan,
    world: &dyn Communicator,
    opts: &ShareOptions,
    load: &mut RankLoad,
) -> Result<()> {
    // The group that reads the checkpoint once: the whole job, or this node's ranks.
    let (group, members): (Option<Box<dyn Communicator>>, Vec<usize>) = if opts.per_node {
        let node = opts.node.clone().unwrap_or_else(super::host_name);
        let (c, m) = node_comm(world, &node)?;
        (Some(c), m)
    } else {
        (None, (0..world.size()).collect())
    };
    let gcomm: &dyn Communicator = match &group {
        Some(c) => c.as_ref(),
        None => world,
    };
    let n = members.len();
    let my_idx = gcomm.rank();

    let member_segs: Vec<Vec<Segment>> = members
        .iter()
        .map(|&r| plan.ranks.get(r).map(rank_segments).unwrap_or_default())
        .collect();
    let pieces = cut_pieces(
        member_segs
            .iter()
            .flatten()
            .map(|s| (s.file, s.src, s.src + s.len))
            .collect(),
        n,
        opts.round_bytes,
    );
    let rounds = pieces.iter().map(|p| p.round + 1).max().unwrap_or(0);

    // Transfers, in (dest segment order, piece order): (piece index, offset in piece, len, dst).
    type Xfer = (usize, u64, u64, u64);
    /// The transfers of `round` with `peer` (empty when out of range).
    fn xfers(t: &[Vec<Vec<Xfer>>], round: usize, peer: usize) -> &[Xfer] {
        t.get(round)
            .and_then(|r| r.get(peer))
            .map_or(&[], Vec::as_slice)
    }
    let mut send: Vec<Vec<Vec<Xfer>>> = vec![vec![Vec::new(); n]; rounds]; // [round][dest]
    let mut recv: Vec<Vec<Vec<Xfer>>> = vec![vec![Vec::new(); n]; rounds]; // [round][owner]
    for (d, segs) in member_segs.iter().enumerate() {
        for s in segs {
            let (s0, s1) = (s.src, s.src + s.len);
            let mut pi = pieces.partition_point(|p| (p.file, p.end) <= (s.file, s0));
            while let Some(p) = pieces.get(pi) {
                if p.file != s.file || p.start >= s1 {
                    break;
                }
                let a = p.start.max(s0);
                let b = p.end.min(s1);
                if b > a {
                    let x = (pi, a - p.start, b - a, s.dst + (a - s0));
                    if p.owner == my_idx {
                        if let Some(v) = send.get_mut(p.round).and_then(|r| r.get_mut(d)) {
                            v.push(x);
                        }
                    }
                    if d == my_idx {
                        if let Some(v) = recv.get_mut(p.round).and_then(|r| r.get_mut(p.owner)) {
                            v.push(x);
                        }
                    }
                }
                pi += 1;
            }
        }
    }

    let (mut staging, mut packed, mut incoming) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        // Read this rank's pieces of the round.
        let r = (|| {
            let runs: Vec<CopyRun> = pieces
                .iter()
                .filter(|p| p.round == round && p.owner == my_idx)
                .map(|p| CopyRun {
                    file: p.file,
                    src: p.start,
                    dst: p.buf_off,
                    len: p.end - p.start,
                    count: 1,
                    src_stride: 0,
                    dst_stride: 0,
                })
                .collect();
            let len: u64 = runs.iter().map(|r| r.len).sum();
            // Reused across rounds: fresh pages cost more than the copy (page faults).
            let mut buf = std::mem::take(&mut staging);
            buf.clear();
            buf.try_reserve_exact(len as usize)
                .map_err(|_| Error::Load(format!("cannot allocate {len} bytes of staging")))?;
            buf.resize(len as usize, 0);
            let stats = execute(&plan.files, &runs, &[], &mut buf, &opts.load)?;
            Ok((buf, stats.read_bytes))
        })();
        let (buf, read) = agree(world, r)?;
        load.read_bytes += read;
        // This rank's own transfers go straight from the piece buffer to the arena.
        for &(pi, off, len, dst) in xfers(&send, round, my_idx) {
            let base = pieces.get(pi).map(|p| p.buf_off).unwrap_or(0);
            let from = slice_range(base + off, len, buf.len())?;
            let to = slice_range(dst, len, load.arena.len())?;
            if let (Some(s), Some(t)) = (buf.get(from), load.arena.get_mut(to)) {
                t.copy_from_slice(s);
            }
        }
        // One packed send buffer, in destination order (nothing to self).
        let mut send_counts = vec![0usize; n];
        let mut total = 0u64;
        for (d, c) in send_counts.iter_mut().enumerate() {
            if d != my_idx {
                let b: u64 = xfers(&send, round, d).iter().map(|x| x.2).sum();
                *c = b as usize;
                total += b;
            }
        }
        packed.clear();
        packed.reserve(total as usize);
        for d in (0..n).filter(|&d| d != my_idx) {
            for &(pi, off, len, _) in xfers(&send, round, d) {
                let base = pieces.get(pi).map(|p| p.buf_off).unwrap_or(0);
                let range = slice_range(base + off, len, buf.len())?;
                packed.extend_from_slice(buf.get(range).unwrap_or(&[]));
            }
        }
        load.sent_bytes += total;
        let recv_counts: Vec<usize> = (0..n)
            .map(|o| {
                if o == my_idx {
                    return 0;
                }
                let b: u64 = xfers(&recv, round, o).iter().map(|x| x.2).sum();
                b as usize
            })
            .collect();
        let recv_total: usize = recv_counts.iter().sum();
        incoming.clear();
        incoming.resize(recv_total, 0);
        gcomm.all_to_all_packed(&packed, &send_counts, &mut incoming, &recv_counts)?;
        let mut cursor = 0u64;
        for (o, _) in recv_counts.iter().enumerate().filter(|(o, _)| *o != my_idx) {
            for &(_, _, len, dst) in xfers(&recv, round, o) {
                let src = slice_range(cursor, len, incoming.len())?;
                let to = slice_range(dst, len, load.arena.len())?;
                if let (Some(s), Some(t)) = (incoming.get(src), load.arena.get_mut(to)) {
                    t.copy_from_slice(s);
                }
                cursor += len;
            }
        }
        load.received_bytes += cursor;
        staging = buf;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_union_once_and_balance() {
        let segs = vec![(0, 0, 100), (0, 50, 150), (1, 10, 20), (0, 300, 310)];
        let pieces = cut_pieces(segs, 3, 64);
        // union: file0 [0,150) [300,310), file1 [10,20) → 170 bytes
        let total: u64 = pieces.iter().map(|p| p.end - p.start).sum();
        assert_eq!(total, 170);
        let mut covered = std::collections::BTreeSet::new();
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
    fn share_mode_parses() {
        assert_eq!(
            "read-once".parse::<ShareMode>().unwrap(),
            ShareMode::ReadOnce
        );
        assert_eq!(ShareMode::Broadcast.to_string(), "broadcast");
        assert!("all".parse::<ShareMode>().unwrap_err().is_usage());
    }
}
