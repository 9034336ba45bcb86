//! Pure planning of the share modes: which rank reads which bytes, which broadcasts run in
//! which order, and how read-once cuts the job's bytes into rounds and pieces. Everything
//! here is a function of the [`Plan`] (and, for read-once, of a group's members and the round
//! size): no communicator, no I/O, so every rank computes the same schedule and the tests
//! check it directly.

use std::collections::HashMap;

use super::segments::rank_segments;
use crate::checkpoint::Dtype;
use crate::plan::{merge_intervals, CopyRun, Plan, RankPlan};

// ---------------------------------------------------------------------------------------
// broadcast

/// A rank's segments split at tensor boundaries: per tensor (arena offsets relative to the
/// tensor), and the segments that fall in no tensor (read privately).
pub(crate) struct Split {
    pub(crate) per_tensor: Vec<Vec<CopyRun>>,
    pub(crate) orphans: Vec<CopyRun>,
}

pub(crate) fn split_by_tensor(rp: &RankPlan) -> Split {
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
                        v.push(CopyRun::contiguous(seg.file, src, pos - t.offset, take));
                    }
                    take
                }
                None => {
                    let next = starts.get(k).copied().unwrap_or(end).min(end);
                    let take = next.saturating_sub(pos).max(1).min(end - pos);
                    out.orphans
                        .push(CopyRun::contiguous(seg.file, src, pos, take));
                    take
                }
            };
            pos += take;
            src += take;
        }
    }
    out
}

/// A tensor that several ranks hold byte for byte.
pub(crate) struct SharedTensor {
    /// (rank, tensor index) of every holder, ranks ascending and distinct.
    pub(crate) holders: Vec<(usize, usize)>,
    /// The holder that reads it and broadcasts it to the others.
    pub(crate) owner: usize,
}

/// The broadcast mode's schedule for the whole job. Computed once per process: rank threads
/// of one process share it.
pub struct BroadcastSchedule {
    pub(crate) shared: Vec<SharedTensor>,
    /// Per rank, per tensor: whether the rank reads the tensor from storage itself.
    reads: Vec<Vec<bool>>,
    /// Distinct holder sets (world ranks, ascending); `set_of[i]` is shared tensor i's set.
    pub(crate) sets: Vec<Vec<usize>>,
    pub(crate) set_of: Vec<usize>,
    /// Sets grouped so that the sets of one layer are disjoint: one split per layer.
    pub(crate) layers: Vec<Vec<usize>>,
}

impl BroadcastSchedule {
    /// Groups the job's tensors by content, picks an owner for each shared one (the holder
    /// with the least bytes to read so far, so owners spread across ranks) and groups the
    /// holder sets into layers of disjoint sets.
    pub fn new(plan: &Plan) -> BroadcastSchedule {
        let splits: Vec<Split> = plan.ranks.iter().map(split_by_tensor).collect();
        let (shared, reads) = plan_broadcast(plan, &splits);
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
        BroadcastSchedule {
            shared,
            reads,
            sets,
            set_of,
            layers,
        }
    }

    /// The segments `rank` reads from storage itself (arena offsets): its bytes outside any
    /// tensor, its unshared tensors and the shared tensors it owns.
    pub fn own_reads(&self, plan: &Plan, rank: usize) -> Vec<CopyRun> {
        let mut segs: Vec<CopyRun> = Vec::new();
        let Some(rp) = plan.ranks.get(rank) else {
            return segs;
        };
        // Recomputed for this rank only: keeping every rank's split would hold the whole
        // job's segments for the length of the load.
        let my = split_by_tensor(rp);
        segs.extend_from_slice(&my.orphans);
        for (ti, t) in rp.tensors.iter().enumerate() {
            let reads = self
                .reads
                .get(rank)
                .and_then(|v| v.get(ti))
                .copied()
                .unwrap_or(true);
            if reads {
                segs.extend(
                    my.per_tensor
                        .get(ti)
                        .into_iter()
                        .flatten()
                        .map(|s| CopyRun {
                            dst: s.dst + t.offset,
                            ..*s
                        }),
                );
            }
        }
        segs
    }

    /// The broadcasts `rank` takes part in, in the one global order every rank follows:
    /// (holder set index, root's position in the set, tensor index in `rank`'s plan, whether
    /// `rank` is the root).
    pub(crate) fn broadcasts(&self, rank: usize) -> impl Iterator<Item = Broadcast> + '_ {
        self.shared
            .iter()
            .zip(&self.set_of)
            .filter_map(move |(st, &set)| {
                let &(_, tensor) = st.holders.iter().find(|&&(r, _)| r == rank)?;
                let root = st.holders.iter().position(|&(r, _)| r == st.owner)?;
                Some(Broadcast {
                    set,
                    root,
                    tensor,
                    holders: st.holders.len(),
                    is_root: st.owner == rank,
                })
            })
    }
}

/// Broadcasts of one holder set and root packed together, seen from one holder: small shared
/// tensors (norms, biases, MoE expert slices) would otherwise cost one collective each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Batch {
    /// Index of the holder set (its sub-communicator).
    pub(crate) set: usize,
    /// Root's rank in the set's sub-communicator.
    pub(crate) root: usize,
    /// Number of holders.
    pub(crate) holders: usize,
    /// Whether this rank is the root.
    pub(crate) is_root: bool,
    /// The tensors' indices in this rank's plan, in the order they are packed.
    pub(crate) tensors: Vec<usize>,
    /// Total bytes.
    pub(crate) bytes: u64,
}

impl BroadcastSchedule {
    /// The broadcasts of `rank` grouped by (holder set, root) into batches of at most
    /// `max_bytes` (a larger tensor is a batch of its own), ordered by (set, root, position).
    /// Every holder of a set computes the same batches for it: the set's shared tensors, their
    /// order and their sizes are the same for all of them.
    pub(crate) fn batches(&self, plan: &Plan, rank: usize, max_bytes: u64) -> Vec<Batch> {
        let Some(rp) = plan.ranks.get(rank) else {
            return Vec::new();
        };
        let mut by_key: std::collections::BTreeMap<(usize, usize), Vec<Broadcast>> =
            std::collections::BTreeMap::new();
        for b in self.broadcasts(rank) {
            by_key.entry((b.set, b.root)).or_default().push(b);
        }
        let mut out: Vec<Batch> = Vec::new();
        for ((set, root), list) in by_key {
            let mut cur: Option<Batch> = None;
            for b in list {
                let bytes = rp.tensors.get(b.tensor).map_or(0, |t| t.bytes);
                if let Some(c) = cur.as_mut() {
                    if c.bytes.saturating_add(bytes) <= max_bytes {
                        c.tensors.push(b.tensor);
                        c.bytes += bytes;
                        continue;
                    }
                }
                out.extend(cur.take());
                cur = Some(Batch {
                    set,
                    root,
                    holders: b.holders,
                    is_root: b.is_root,
                    tensors: vec![b.tensor],
                    bytes,
                });
            }
            out.extend(cur);
        }
        out
    }
}

/// One broadcast of a shared tensor, seen from one of its holders.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Broadcast {
    /// Index of the holder set (its sub-communicator).
    pub(crate) set: usize,
    /// Root's rank in the set's sub-communicator.
    pub(crate) root: usize,
    /// The tensor's index in this rank's plan.
    pub(crate) tensor: usize,
    /// Number of holders.
    pub(crate) holders: usize,
    /// Whether this rank is the root.
    pub(crate) is_root: bool,
}

/// Groups the job's tensors by content and picks an owner for each shared one.
/// Returns the shared groups and, per rank, which of its tensors it reads itself.
fn plan_broadcast(plan: &Plan, splits: &[Split]) -> (Vec<SharedTensor>, Vec<Vec<bool>>) {
    // Same name, type, shape, size and source segments: the same bytes. Borrowed from the
    // plan (no key is copied: a million-tensor job has millions of placements).
    #[derive(PartialEq, Eq, Hash)]
    struct Content<'a> {
        name: &'a str,
        dtype: Dtype,
        shape: &'a [u64],
        bytes: u64,
        segments: &'a [CopyRun],
    }
    let mut index: HashMap<Content<'_>, usize> = HashMap::new();
    let mut groups: Vec<Vec<(usize, usize)>> = Vec::new();
    let mut group_of: Vec<Vec<Option<usize>>> = Vec::new();
    for (r, (rp, sp)) in plan.ranks.iter().zip(splits).enumerate() {
        let mut mine = vec![None; rp.tensors.len()];
        for (ti, t) in rp.tensors.iter().enumerate() {
            let key = Content {
                name: &t.name,
                dtype: t.dtype,
                shape: &t.shape,
                bytes: t.bytes,
                segments: sp.per_tensor.get(ti).map_or(&[][..], Vec::as_slice),
            };
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
        if let [(r, ti)] = members.as_slice() {
            if let Some(l) = load.get_mut(*r) {
                *l += seg_bytes(*r, *ti);
            }
        }
    }
    let mut shared = Vec::new();
    let mut reads: Vec<Vec<bool>> = group_of
        .iter()
        .map(|g| g.iter().map(Option::is_none).collect())
        .collect();
    for members in groups {
        if let [(r, ti)] = members.as_slice() {
            if let Some(x) = reads.get_mut(*r).and_then(|v| v.get_mut(*ti)) {
                *x = true;
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

// ---------------------------------------------------------------------------------------
// read-once

/// A contiguous file range read by one member of a read-once group in one round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    pub(crate) file: u32,
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) round: usize,
    /// Reading member (index into the group).
    pub(crate) owner: usize,
    /// Offset in the owner's staging buffer for this round.
    pub(crate) buf_off: u64,
}

/// Cuts the union of `segs` (file, start, end) into pieces: rounds of at most `round_bytes`,
/// each split evenly among `n` owners. Pieces come sorted by (file, start).
pub(crate) fn cut_pieces(mut segs: Vec<(u32, u64, u64)>, n: usize, round_bytes: u64) -> Vec<Piece> {
    segs.sort_unstable();
    // The plan's one interval union, file by file.
    let mut union: Vec<(u32, u64, u64)> = Vec::new();
    for same_file in segs.chunk_by(|a, b| a.0 == b.0) {
        let mut v: Vec<(u64, u64)> = same_file.iter().map(|&(_, s, e)| (s, e)).collect();
        merge_intervals(&mut v, 0);
        union.extend(v.into_iter().map(|(s, e)| (same_file[0].0, s, e)));
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

/// One transfer of read-once: `len` bytes at `off` in piece `piece` go to arena offset `dst`
/// of the receiving member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Xfer {
    pub(crate) piece: usize,
    pub(crate) off: u64,
    pub(crate) len: u64,
    pub(crate) dst: u64,
}

/// One member's read-once schedule within its group.
pub struct ReadOnceSchedule {
    pub(crate) pieces: Vec<Piece>,
    /// Rounds of this group (every member of the group computes the same number).
    pub rounds: usize,
    /// This member's index in the group.
    pub(crate) me: usize,
    /// Group size.
    pub(crate) n: usize,
    /// `send[round][dest]`: what this member sends (to itself included).
    send: Vec<Vec<Vec<Xfer>>>,
    /// `recv[round][owner]`: what this member receives (from itself included).
    recv: Vec<Vec<Vec<Xfer>>>,
    /// How `send[round][dest]` travels.
    send_plans: Vec<Vec<PairPlan>>,
    /// How `recv[round][owner]` travels.
    recv_plans: Vec<Vec<PairPlan>>,
}

/// Runs of transfers below this size (bytes landing contiguously in the receiver's arena)
/// travel together in one bundle per pair and round; larger ones are messages of their own,
/// received straight into the arena. A message costs a few microseconds of handshakes; a
/// bundled byte, a copy on each side.
pub(crate) const SMALL_MESSAGE: u64 = 64 << 10;

/// How the transfers of one round from an owner to a receiver travel, computed the same by
/// both (from the same transfer list, in the receiver's arena order): `direct` messages, each
/// a run of transfers that lands contiguously in the receiver's arena, then one bundle of the
/// transfers of the smaller runs. Ranges index the pair's transfer list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct PairPlan {
    pub(crate) direct: Vec<std::ops::Range<usize>>,
    pub(crate) bundle: Vec<std::ops::Range<usize>>,
}

static EMPTY_PAIR: PairPlan = PairPlan {
    direct: Vec::new(),
    bundle: Vec::new(),
};

impl PairPlan {
    /// Bytes of the bundle (of `xs`, the pair's transfer list).
    pub(crate) fn bundle_bytes(&self, xs: &[Xfer]) -> u64 {
        self.bundle
            .iter()
            .filter_map(|r| xs.get(r.clone()))
            .flatten()
            .map(|x| x.len)
            .sum()
    }

    /// The lengths of the messages in the order they are sent: every direct message, then
    /// the bundle when it is not empty. Both sides compare a digest of them before any
    /// round.
    pub(crate) fn message_lengths(&self, xs: &[Xfer]) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .direct
            .iter()
            .map(|r| {
                xs.get(r.clone())
                    .map_or(0, |m| m.iter().map(|x| x.len).sum())
            })
            .collect();
        let b = self.bundle_bytes(xs);
        if b > 0 {
            v.push(b);
        }
        v
    }
}

/// Cuts a pair's transfers (sorted by arena offset) into runs that land contiguously and
/// sorts the runs into direct messages and the bundle by [`SMALL_MESSAGE`].
pub(crate) fn pair_plan(xs: &[Xfer]) -> PairPlan {
    let mut out = PairPlan::default();
    let mut start = 0;
    while start < xs.len() {
        let mut end = start + 1;
        let mut len = xs.get(start).map_or(0, |x| x.len);
        while let (Some(prev), Some(next)) = (xs.get(end - 1), xs.get(end)) {
            if prev.dst + prev.len != next.dst {
                break;
            }
            len += next.len;
            end += 1;
        }
        if len >= SMALL_MESSAGE {
            out.direct.push(start..end);
        } else {
            out.bundle.push(start..end);
        }
        start = end;
    }
    out
}

impl ReadOnceSchedule {
    /// The schedule of member `me` of the group whose world ranks are `members` (in group
    /// order), cutting the union of their bytes into rounds of at most `round_bytes`.
    pub fn new(plan: &Plan, members: &[usize], me: usize, round_bytes: u64) -> ReadOnceSchedule {
        let n = members.len();
        let member_segs: Vec<Vec<CopyRun>> = members
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
            round_bytes,
        );
        let rounds = pieces.iter().map(|p| p.round + 1).max().unwrap_or(0);
        let mut send: Vec<Vec<Vec<Xfer>>> = vec![vec![Vec::new(); n]; rounds];
        let mut recv: Vec<Vec<Vec<Xfer>>> = vec![vec![Vec::new(); n]; rounds];
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
                        let x = Xfer {
                            piece: pi,
                            off: a - p.start,
                            len: b - a,
                            dst: s.dst + (a - s0),
                        };
                        if p.owner == me {
                            if let Some(v) = send.get_mut(p.round).and_then(|r| r.get_mut(d)) {
                                v.push(x);
                            }
                        }
                        if d == me {
                            if let Some(v) = recv.get_mut(p.round).and_then(|r| r.get_mut(p.owner))
                            {
                                v.push(x);
                            }
                        }
                    }
                    pi += 1;
                }
            }
        }
        // In arena order of the receiver, the same on both sides of a pair (both built the
        // list from the receiver's segments): messages are runs of it.
        for per_peer in send.iter_mut().chain(recv.iter_mut()).flatten() {
            per_peer.sort_by_key(|x| x.dst);
        }
        let plans = |lists: &[Vec<Vec<Xfer>>]| -> Vec<Vec<PairPlan>> {
            lists
                .iter()
                .map(|r| r.iter().map(|v| pair_plan(v)).collect())
                .collect()
        };
        let (send_plans, recv_plans) = (plans(&send), plans(&recv));
        ReadOnceSchedule {
            pieces,
            rounds,
            me,
            n,
            send,
            recv,
            send_plans,
            recv_plans,
        }
    }

    /// How the transfers of `round` from this member to `dest` travel.
    pub(crate) fn send_plan(&self, round: usize, dest: usize) -> &PairPlan {
        self.send_plans
            .get(round)
            .and_then(|r| r.get(dest))
            .unwrap_or(&EMPTY_PAIR)
    }

    /// How the transfers of `round` from `owner` to this member travel.
    pub(crate) fn recv_plan(&self, round: usize, owner: usize) -> &PairPlan {
        self.recv_plans
            .get(round)
            .and_then(|r| r.get(owner))
            .unwrap_or(&EMPTY_PAIR)
    }

    /// Where transfer `x` (of this member's pieces) lies in its staging buffer.
    pub(crate) fn staging_offset(&self, x: &Xfer) -> u64 {
        self.pieces.get(x.piece).map_or(0, |p| p.buf_off) + x.off
    }

    /// Whether the transfers `xs` lie back to back in this member's staging buffer (so a
    /// message of them is sent straight from there).
    pub(crate) fn contiguous_in_staging(&self, xs: &[Xfer]) -> bool {
        xs.windows(2).all(|w| match w {
            [a, b] => self.staging_offset(a) + a.len == self.staging_offset(b),
            _ => true,
        })
    }

    /// Bytes of `round` this member packs before sending: its bundles and the direct
    /// messages whose bytes are not contiguous in its staging buffer.
    pub fn packed_bytes(&self, round: usize) -> u64 {
        (0..self.n)
            .filter(|&d| d != self.me)
            .map(|d| {
                let xs = self.sends(round, d);
                let plan = self.send_plan(round, d);
                let bundled: u64 = plan.bundle_bytes(xs);
                let scattered: u64 = plan
                    .direct
                    .iter()
                    .filter_map(|r| xs.get(r.clone()))
                    .filter(|m| !self.contiguous_in_staging(m))
                    .map(|m| m.iter().map(|x| x.len).sum::<u64>())
                    .sum();
                bundled + scattered
            })
            .sum()
    }

    /// Bytes of `round` this member receives in bundles (copied into the arena afterwards).
    pub fn bundled_bytes(&self, round: usize) -> u64 {
        (0..self.n)
            .filter(|&o| o != self.me)
            .map(|o| {
                self.recv_plan(round, o)
                    .bundle_bytes(self.receives(round, o))
            })
            .sum()
    }

    /// What this member reads in `round`: its pieces, as segments into its staging buffer.
    pub(crate) fn own_pieces(&self, round: usize) -> Vec<CopyRun> {
        self.pieces
            .iter()
            .filter(|p| p.round == round && p.owner == self.me)
            .map(|p| CopyRun::contiguous(p.file, p.start, p.buf_off, p.end - p.start))
            .collect()
    }

    /// The transfers of `round` from this member to `dest`.
    pub(crate) fn sends(&self, round: usize, dest: usize) -> &[Xfer] {
        self.send
            .get(round)
            .and_then(|r| r.get(dest))
            .map_or(&[], Vec::as_slice)
    }

    /// The transfers of `round` from `owner` to this member.
    pub(crate) fn receives(&self, round: usize, owner: usize) -> &[Xfer] {
        self.recv
            .get(round)
            .and_then(|r| r.get(owner))
            .map_or(&[], Vec::as_slice)
    }

    /// Bytes this member sends to each member in `round` (0 to itself: that is a local copy).
    pub fn send_counts(&self, round: usize) -> Vec<u64> {
        (0..self.n)
            .map(|d| {
                if d == self.me {
                    0
                } else {
                    self.sends(round, d).iter().map(|x| x.len).sum()
                }
            })
            .collect()
    }

    /// Bytes this member receives from each member in `round` (0 from itself).
    pub fn recv_counts(&self, round: usize) -> Vec<u64> {
        (0..self.n)
            .map(|o| {
                if o == self.me {
                    0
                } else {
                    self.receives(round, o).iter().map(|x| x.len).sum()
                }
            })
            .collect()
    }

    /// The staging bytes of this member's pieces in `round`.
    pub fn staging_bytes(&self, round: usize) -> u64 {
        self.own_pieces(round).iter().map(|s| s.len).sum()
    }
}
