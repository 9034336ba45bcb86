//! The collectives of the share modes: they follow a schedule from [`super::schedule`] and
//! move bytes over a communicator.

use std::collections::HashMap;

use super::schedule::{BroadcastSchedule, ReadOnceSchedule};
use super::segments::{read_segments, slice_range};
use super::target::Target;
use super::{ShareOptions, Traffic};
use crate::comm::{agree, node_comm, rank_list, Communicator};
use crate::plan::Plan;
use crate::{Error, Result};

/// Largest batch of small shared tensors packed into one broadcast: big enough that a model
/// of many small tensors costs few collectives, small enough that the copy stays cheap.
const BROADCAST_BATCH: u64 = 64 << 20;

/// A zeroed buffer of `len` bytes, allocated fallibly: a failure names the rank, the size and
/// what the buffer was for.
fn buffer(buf: &mut Vec<u8>, len: u64, rank: usize, what: &str) -> Result<()> {
    let fail = || Error::OutOfMemory {
        bytes: len,
        what: what.to_string(),
        rank: Some(rank),
    };
    let n = usize::try_from(len).map_err(|_| fail())?;
    buf.clear();
    buf.try_reserve_exact(n).map_err(|_| fail())?;
    buf.resize(n, 0);
    Ok(())
}

/// FNV-1a of a sequence of words: a short digest of counts to compare across ranks.
fn digest(words: impl IntoIterator<Item = u64>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for w in words {
        for b in w.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Broadcast mode: read what this rank owns, then broadcast every shared tensor within its
/// holders. Returns the bytes read from storage.
pub(super) fn broadcast(
    plan: &Plan,
    schedule: &BroadcastSchedule,
    world: &dyn Communicator,
    opts: &ShareOptions,
    target: &mut Target<'_>,
    traffic: &mut Traffic,
) -> Result<u64> {
    let me = world.rank();
    let rp = plan
        .ranks
        .get(me)
        .ok_or_else(|| Error::plan_rank(me, "not in the plan"))?;

    world.set_phase("broadcast: own reads");
    let segs = schedule.own_reads(plan, me);
    let read = agree(world, target.read(&plan.files, &segs, &opts.load))?.read_bytes;

    // One sub-communicator per distinct holder set; disjoint sets share a split.
    world.set_phase("broadcast: sub-communicators");
    let mut comms: HashMap<usize, Box<dyn Communicator>> = HashMap::new();
    for layer in &schedule.layers {
        let mine = layer.iter().position(|&si| {
            schedule
                .sets
                .get(si)
                .is_some_and(|s| s.binary_search(&me).is_ok())
        });
        let color = mine
            .map(|p| {
                u32::try_from(p).map_err(|_| Error::comm("split", format!("too many sets: {p}")))
            })
            .transpose()?;
        if let Some(c) = world.split(color, me)? {
            if let Some(&si) = mine.and_then(|p| layer.get(p)) {
                comms.insert(si, c);
            }
        }
    }

    // Counts first: within every holder set, the members compare the sizes of the broadcasts
    // they are about to run (in order), so a peer expecting other sizes is an error naming
    // it, never a truncated or overrun buffer. Sets in one global order, as the broadcasts.
    // Sub-communicators keep the phase they were split in: name each phase on them too.
    let set_phase = |phase: &str| {
        world.set_phase(phase);
        for c in comms.values() {
            c.set_phase(phase);
        }
    };
    set_phase("broadcast: count check");
    let mut per_set: HashMap<usize, Vec<u64>> = HashMap::new();
    for b in schedule.broadcasts(me) {
        let bytes = rp.tensors.get(b.tensor).map_or(u64::MAX, |t| t.bytes);
        per_set.entry(b.set).or_default().push(bytes);
    }
    let mut sets: Vec<usize> = per_set.keys().copied().collect();
    sets.sort_unstable();
    let check = (|| {
        for si in sets {
            let comm = comms
                .get(&si)
                .ok_or_else(|| Error::comm("broadcast", "missing sub-communicator"))?;
            let sizes = per_set.get(&si).map_or(&[][..], Vec::as_slice);
            let mine = digest(sizes.iter().copied().chain([sizes.len() as u64]));
            let all = comm.all_gather(&mine.to_le_bytes())?;
            let members = schedule.sets.get(si).map_or(&[][..], Vec::as_slice);
            let differ: Vec<usize> = all
                .iter()
                .enumerate()
                .filter(|(_, d)| d.as_slice() != mine.to_le_bytes())
                .map(|(i, _)| members.get(i).copied().unwrap_or(i))
                .collect();
            if !differ.is_empty() {
                return Err(Error::comm(
                    "broadcast",
                    format!(
                        "rank {me}: rank {} expect other broadcast sizes in their group {}",
                        rank_list(&differ),
                        rank_list(members)
                    ),
                ));
            }
        }
        Ok(())
    })();
    agree(world, check)?;

    // Broadcast in one global order, small tensors of a (set, root) packed into batches.
    // The packing buffer is allocated once, for the largest batch, and agreed on: no rank
    // may fail an allocation between two broadcasts while the others wait in one.
    set_phase("broadcast: buffers");
    let batches = schedule.batches(plan, me, BROADCAST_BATCH);
    let largest = batches
        .iter()
        .filter(|b| b.tensors.len() > 1)
        .map(|b| b.bytes)
        .max()
        .unwrap_or(0);
    let mut packed: Vec<u8> = Vec::new();
    agree(world, buffer(&mut packed, largest, me, "broadcast batches"))?;
    set_phase("broadcast");
    for batch in batches {
        let comm = comms
            .get(&batch.set)
            .ok_or_else(|| Error::comm("broadcast", "missing sub-communicator"))?;
        // Each tensor's (offset, bytes): a whole tensor lies in one caller buffer or in the
        // arena.
        let spans = batch
            .tensors
            .iter()
            .map(|&ti| {
                rp.tensors
                    .get(ti)
                    .map(|t| (t.offset, t.bytes))
                    .ok_or_else(|| {
                        Error::plan_rank(me, "broadcast batch tensor index out of range")
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        if let [(offset, bytes)] = spans.as_slice() {
            // One tensor: straight from and into its memory.
            comm.broadcast(batch.root, target.span_mut(*offset, *bytes)?)?;
        } else {
            // Within the capacity reserved above: no allocation.
            let len = usize::try_from(batch.bytes)
                .map_err(|_| Error::plan_rank(me, format!("a batch of {} bytes", batch.bytes)))?;
            packed.clear();
            packed.resize(len, 0);
            if batch.is_root {
                let mut at = 0;
                for &(offset, bytes) in &spans {
                    let s = target.span_mut(offset, bytes)?;
                    if let Some(d) = packed.get_mut(at..at + s.len()) {
                        d.copy_from_slice(s);
                    }
                    at += s.len();
                }
            }
            comm.broadcast(batch.root, &mut packed)?;
            if !batch.is_root {
                let mut at = 0;
                for &(offset, bytes) in &spans {
                    let d = target.span_mut(offset, bytes)?;
                    if let Some(s) = packed.get(at..at + d.len()) {
                        d.copy_from_slice(s);
                    }
                    at += d.len();
                }
            }
        }
        if batch.is_root {
            traffic.sent_bytes += batch.bytes * (batch.holders as u64 - 1);
        } else {
            traffic.received_bytes += batch.bytes;
        }
    }
    Ok(read)
}

/// Read-once mode. Returns the bytes read from storage.
pub(super) fn read_once(
    plan: &Plan,
    world: &dyn Communicator,
    opts: &ShareOptions,
    target: &mut Target<'_>,
    traffic: &mut Traffic,
) -> Result<u64> {
    let me = world.rank();
    // The group that reads the checkpoint once: the whole job, or this node's ranks.
    world.set_phase("read-once: node groups");
    let (group, members): (Option<Box<dyn Communicator>>, Vec<usize>) = if opts.per_node {
        let node = opts.node.clone().unwrap_or_else(crate::comm::host_name);
        let (c, m) = node_comm(world, &node)?;
        (Some(c), m)
    } else {
        (None, (0..world.size()).collect())
    };
    let gcomm: &dyn Communicator = match &group {
        Some(c) => c.as_ref(),
        None => world,
    };
    let s = ReadOnceSchedule::new(plan, &members, gcomm.rank(), opts.round_bytes);
    let n = members.len();
    let my_idx = gcomm.rank();

    // Counts first: every member tells every other how many bytes it will send it in each
    // round (and how many rounds the group has); a receiver that expects other counts names
    // the sender before any data moves. Agreed on the world: groups never wait on each other
    // after this, so a failure anywhere must be known everywhere now.
    world.set_phase("read-once: count check");
    let expect: Vec<Vec<u64>> = (0..s.rounds).map(|r| s.recv_counts(r)).collect();
    let announce: Vec<Vec<u8>> = (0..n)
        .map(|d| {
            let mut v = Vec::with_capacity(8 * (s.rounds + 1));
            v.extend_from_slice(&(s.rounds as u64).to_le_bytes());
            for r in 0..s.rounds {
                let c = s.send_counts(r).get(d).copied().unwrap_or(0);
                v.extend_from_slice(&c.to_le_bytes());
            }
            v
        })
        .collect();
    let check = gcomm.all_to_all_v(announce).and_then(|got| {
        let mut bad = Vec::new();
        for (o, g) in got.iter().enumerate() {
            let mut want = Vec::with_capacity(8 * (s.rounds + 1));
            want.extend_from_slice(&(s.rounds as u64).to_le_bytes());
            for e in &expect {
                want.extend_from_slice(&e.get(o).copied().unwrap_or(0).to_le_bytes());
            }
            if *g != want {
                bad.push(members.get(o).copied().unwrap_or(o));
            }
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(Error::comm(
                "read-once",
                format!(
                    "rank {me}: rank {} announced other rounds or counts than this rank expects",
                    rank_list(&bad)
                ),
            ))
        }
    });
    agree(world, check)?;

    let rounds = s.rounds;
    let mut read_total = 0u64;
    let (mut staging, mut packed, mut incoming) = (Vec::new(), Vec::new(), Vec::new());
    let result = (|| -> Result<()> {
        for round in 0..rounds {
            gcomm.set_phase(&format!("read-once round {} of {rounds}", round + 1));
            // Read this rank's pieces of the round and size the round's send and receive
            // buffers (reused across rounds: fresh pages cost more than the copy). Agreed
            // before the all-to-all, so no member enters it alone.
            let send_counts = s.send_counts(round);
            let total: u64 = send_counts.iter().sum();
            let recv_counts = s.recv_counts(round);
            let recv_total: u64 = recv_counts.iter().sum();
            let r = (|| {
                let pieces = s.own_pieces(round);
                let len: u64 = pieces.iter().map(|p| p.len).sum();
                buffer(&mut staging, len, me, "read-once staging")?;
                buffer(&mut packed, total, me, "the read-once send buffer")?;
                packed.clear();
                buffer(
                    &mut incoming,
                    recv_total,
                    me,
                    "the read-once receive buffer",
                )?;
                read_segments(plan, &pieces, &mut staging, &opts.load)
            })();
            // Within the group only: other groups may have other round counts.
            read_total += agree(gcomm, r)?;
            // This rank's own transfers go straight from the staging buffer to their memory.
            for x in s.sends(round, my_idx) {
                let base = s.pieces.get(x.piece).map_or(0, |p| p.buf_off);
                let from = slice_range(base + x.off, x.len, staging.len())?;
                slice_range(x.dst, x.len, target.len())?;
                target.write(x.dst, staging.get(from).unwrap_or(&[]))?;
            }
            // One packed send buffer, in destination order (nothing to self).
            for d in (0..n).filter(|&d| d != my_idx) {
                for x in s.sends(round, d) {
                    let base = s.pieces.get(x.piece).map_or(0, |p| p.buf_off);
                    let range = slice_range(base + x.off, x.len, staging.len())?;
                    packed.extend_from_slice(staging.get(range).unwrap_or(&[]));
                }
            }
            traffic.sent_bytes += total;
            let to_usize = |v: Vec<u64>| -> Result<Vec<usize>> {
                v.into_iter()
                    .map(|c| {
                        usize::try_from(c).map_err(|_| {
                            Error::comm("read-once", format!("a count of {c} bytes is too large"))
                        })
                    })
                    .collect()
            };
            gcomm.all_to_all_packed(
                &packed,
                &to_usize(send_counts)?,
                &mut incoming,
                &to_usize(recv_counts)?,
            )?;
            let mut cursor = 0u64;
            for o in (0..n).filter(|&o| o != my_idx) {
                for x in s.receives(round, o) {
                    let from = slice_range(cursor, x.len, incoming.len())?;
                    slice_range(x.dst, x.len, target.len())?;
                    target.write(x.dst, incoming.get(from).unwrap_or(&[]))?;
                    cursor += x.len;
                }
            }
            traffic.received_bytes += cursor;
        }
        Ok(())
    })();
    // Groups finish at different times; the job finishes together.
    world.set_phase("read-once: done");
    agree(world, result)?;
    Ok(read_total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_that_cannot_be_allocated_is_an_error_naming_rank_size_and_purpose() {
        let mut v = vec![1u8; 16];
        let huge = u64::MAX / 2;
        let e = buffer(&mut v, huge, 3, "the read-once receive buffer").unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("rank 3: cannot allocate {huge} bytes for the read-once receive buffer")
        );
        buffer(&mut v, 5, 3, "staging").unwrap();
        assert_eq!(v, [0u8; 5]);
    }

    #[test]
    fn count_digests_differ_when_counts_differ() {
        assert_eq!(digest([1, 2, 3]), digest([1, 2, 3]));
        assert_ne!(digest([1, 2, 3]), digest([1, 3, 2]));
        assert_ne!(digest([0]), digest([0, 0]));
    }
}
