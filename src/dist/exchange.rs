//! The collectives of the share modes: they follow a schedule from [`super::schedule`] and
//! move bytes over a communicator.

use std::collections::HashMap;

use super::schedule::{Batch, BroadcastSchedule};
use super::target::Target;
use super::{ShareOptions, Traffic};
use crate::comm::{agree, rank_list, Communicator};
use crate::plan::{Plan, RankPlan};
use crate::{Error, Result};

/// Largest batch of small shared tensors packed into one broadcast: big enough that a model
/// of many small tensors costs few collectives, small enough that the copy stays cheap.
const BROADCAST_BATCH: u64 = 64 << 20;

/// A zeroed buffer of `len` bytes, allocated fallibly: a failure names the rank, the size and
/// what the buffer was for.
pub(super) fn buffer(buf: &mut Vec<u8>, len: u64, rank: usize, what: &str) -> Result<()> {
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
pub(super) fn digest(words: impl IntoIterator<Item = u64>) -> u64 {
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

    world.set_phase("broadcast: sub-communicators");
    let comms = holder_comms(schedule, world)?;
    // Sub-communicators keep the phase they were split in: name each phase on them too.
    let set_phase = |phase: &str| {
        world.set_phase(phase);
        for c in comms.values() {
            c.set_phase(phase);
        }
    };
    set_phase("broadcast: count check");
    agree(world, check_sizes(rp, schedule, &comms, me))?;

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
        broadcast_batch(rp, me, &batch, comm.as_ref(), target, &mut packed)?;
        if batch.is_root {
            traffic.sent_bytes += batch.bytes * (batch.holders as u64 - 1);
        } else {
            traffic.received_bytes += batch.bytes;
        }
    }
    Ok(read)
}

/// One sub-communicator per holder set this rank belongs to, keyed by set index; the sets of
/// one schedule layer are disjoint and share a split. Collective: every rank takes part in
/// every split, in the schedule's order.
fn holder_comms(
    schedule: &BroadcastSchedule,
    world: &dyn Communicator,
) -> Result<HashMap<usize, Box<dyn Communicator>>> {
    let me = world.rank();
    let mut comms = HashMap::new();
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
    Ok(comms)
}

/// Within every holder set, the members compare the sizes of the broadcasts they are about
/// to run (in order), so a peer expecting other sizes is an error naming it, never a
/// truncated or overrun buffer. Sets are visited in one global order, as the broadcasts.
fn check_sizes(
    rp: &RankPlan,
    schedule: &BroadcastSchedule,
    comms: &HashMap<usize, Box<dyn Communicator>>,
    me: usize,
) -> Result<()> {
    let mut per_set: HashMap<usize, Vec<u64>> = HashMap::new();
    for b in schedule.broadcasts(me) {
        let bytes = rp.tensors.get(b.tensor).map_or(u64::MAX, |t| t.bytes);
        per_set.entry(b.set).or_default().push(bytes);
    }
    let mut sets: Vec<usize> = per_set.keys().copied().collect();
    sets.sort_unstable();
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
}

/// Broadcasts one batch within its holder set: a single tensor straight from and into its
/// memory, several packed into `packed` (whose capacity was reserved for the largest batch,
/// so nothing is allocated here).
fn broadcast_batch(
    rp: &RankPlan,
    me: usize,
    batch: &Batch,
    comm: &dyn Communicator,
    target: &mut Target<'_>,
    packed: &mut Vec<u8>,
) -> Result<()> {
    // Each tensor's (offset, bytes): a whole tensor lies in one caller buffer or in the arena.
    let spans = batch
        .tensors
        .iter()
        .map(|&ti| {
            rp.tensors
                .get(ti)
                .map(|t| (t.offset, t.bytes))
                .ok_or_else(|| Error::plan_rank(me, "broadcast batch tensor index out of range"))
        })
        .collect::<Result<Vec<_>>>()?;
    if let [(offset, bytes)] = spans.as_slice() {
        return comm.broadcast(batch.root, target.span_mut(*offset, *bytes)?);
    }
    let len = usize::try_from(batch.bytes)
        .map_err(|_| Error::plan_rank(me, format!("a batch of {} bytes", batch.bytes)))?;
    packed.clear();
    packed.resize(len, 0);
    if batch.is_root {
        pack(&spans, target, packed, true)?;
    }
    comm.broadcast(batch.root, packed)?;
    if !batch.is_root {
        pack(&spans, target, packed, false)?;
    }
    Ok(())
}

/// Copies the tensors at `spans` (arena offset, bytes) back to back into `packed`
/// (`into_packed`), or out of it into their memory.
fn pack(
    spans: &[(u64, u64)],
    target: &mut Target<'_>,
    packed: &mut [u8],
    into_packed: bool,
) -> Result<()> {
    let mut at = 0;
    for &(offset, bytes) in spans {
        let tensor = target.span_mut(offset, bytes)?;
        if let Some(p) = packed.get_mut(at..at + tensor.len()) {
            if into_packed {
                p.copy_from_slice(tensor);
            } else {
                tensor.copy_from_slice(p);
            }
        }
        at += tensor.len();
    }
    Ok(())
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
