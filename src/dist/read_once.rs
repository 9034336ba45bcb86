//! Read-once mode, pipelined: the group's bytes are cut into rounds ([`ReadOnceSchedule`]);
//! while round k's bytes move between the members, a reader thread reads round k + 1 into
//! the other of two staging buffers, so storage and the exchange work at the same time.
//!
//! A round moves in one [`Communicator::exchange`]: transfers that land back to back in the
//! receiver's arena form one message, received straight into its memory (the arena, or the
//! caller buffer a [`Target`] puts there; a message across a buffer's edge lands in a bounce
//! buffer and is copied, as the sender cannot know the receiver's buffers) and sent straight
//! from the owner's staging buffer when they are contiguous there too (dim-0 splits,
//! replicated tensors), packed first when not (inner-dimension splits are strided in the
//! file); runs under 64 KiB travel together in one bundle per pair, copied out on arrival.
//!
//! Agreement: each round's reads, packing and receive layout are local steps agreed within
//! the group before its exchange; an error after it (unpacking) is carried into the next
//! agreement, and the last into the job's final one. The reader of the next round is joined
//! (cancelled when this function owns its load control) before any error is returned.

use std::ops::Range;
use std::sync::Arc;

use super::exchange::{buffer, digest};
use super::schedule::{ReadOnceSchedule, Xfer};
use super::segments::{read_segments, slice_range};
use super::target::Target;
use super::{ShareOptions, Traffic};
use crate::comm::{agree, node_comm, rank_list, Communicator};
use crate::load::{LoadControl, LoadOptions};
use crate::plan::Plan;
use crate::{Error, Result};

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
    // Agreed on the world: groups never wait on each other after this, so a failure
    // anywhere must be known everywhere now.
    world.set_phase("read-once: count check");
    agree(world, count_check(&s, gcomm, &members, me))?;
    world.set_phase("read-once: buffers");
    let buffers = agree(world, Buffers::new(&s, me))?;
    let result = pipeline(plan, &s, gcomm, opts, buffers, target, traffic);
    // Groups finish at different times; the job finishes together.
    world.set_phase("read-once: done");
    agree(world, result)
}

/// Counts first: every member tells every other, per round, how many bytes it will send it
/// and a digest of the message lengths (and how many rounds the group has); a receiver that
/// expects otherwise names the sender before any data moves.
fn count_check(
    s: &ReadOnceSchedule,
    gcomm: &dyn Communicator,
    members: &[usize],
    me: usize,
) -> Result<()> {
    let words = |per_round: &dyn Fn(usize) -> (u64, u64)| -> Vec<u8> {
        let mut v = Vec::with_capacity(8 * (2 * s.rounds + 1));
        v.extend_from_slice(&(s.rounds as u64).to_le_bytes());
        for r in 0..s.rounds {
            let (bytes, lengths) = per_round(r);
            v.extend_from_slice(&bytes.to_le_bytes());
            v.extend_from_slice(&lengths.to_le_bytes());
        }
        v
    };
    let nothing = (0, digest([]));
    let announce: Vec<Vec<u8>> = (0..s.n)
        .map(|d| {
            words(&|r| {
                if d == s.me {
                    return nothing;
                }
                let xs = s.sends(r, d);
                let lengths = s.send_plan(r, d).message_lengths(xs);
                (lengths.iter().sum(), digest(lengths))
            })
        })
        .collect();
    let got = gcomm.all_to_all_v(announce)?;
    let mut bad = Vec::new();
    for (o, g) in got.iter().enumerate() {
        let want = words(&|r| {
            if o == s.me {
                return nothing;
            }
            let xs = s.receives(r, o);
            let lengths = s.recv_plan(r, o).message_lengths(xs);
            (lengths.iter().sum(), digest(lengths))
        });
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
}

/// The buffers of the rounds, allocated once for the largest round (and agreed on): two
/// staging buffers (one read while the other is exchanged), the packed messages and the
/// received bundles.
struct Buffers {
    staging: [Vec<u8>; 2],
    pack: Vec<u8>,
    bundles: Vec<u8>,
}

impl Buffers {
    fn new(s: &ReadOnceSchedule, me: usize) -> Result<Buffers> {
        let most = |f: &dyn Fn(usize) -> u64| (0..s.rounds).map(f).max().unwrap_or(0);
        let staging = most(&|r| s.staging_bytes(r));
        let mut b = Buffers {
            staging: [Vec::new(), Vec::new()],
            pack: Vec::new(),
            bundles: Vec::new(),
        };
        let [first, second] = &mut b.staging;
        buffer(first, staging, me, "read-once staging")?;
        let second_len = if s.rounds > 1 { staging } else { 0 };
        buffer(second, second_len, me, "read-once staging")?;
        let pack = most(&|r| s.packed_bytes(r));
        buffer(&mut b.pack, pack, me, "the read-once send buffer")?;
        let bundles = most(&|r| s.bundled_bytes(r));
        buffer(&mut b.bundles, bundles, me, "the read-once receive buffer")?;
        Ok(b)
    }
}

/// The rounds: round k exchanged while round k + 1 is read.
fn pipeline(
    plan: &Plan,
    s: &ReadOnceSchedule,
    gcomm: &dyn Communicator,
    opts: &ShareOptions,
    buffers: Buffers,
    target: &mut Target<'_>,
    traffic: &mut Traffic,
) -> Result<u64> {
    let Buffers {
        staging: [first, second],
        mut pack,
        mut bundles,
    } = buffers;
    // The reader stops early on a failure when the control is ours; a caller's control (the
    // Python binding's Ctrl-C) is left alone and the read in flight finishes.
    let own = opts
        .load
        .control
        .is_none()
        .then(|| Arc::new(LoadControl::default()));
    let load = LoadOptions {
        control: own.clone().or_else(|| opts.load.control.clone()),
        ..opts.load.clone()
    };
    let rounds = s.rounds;
    // Messages across a caller buffer's edge (none without caller buffers).
    let mut bounce = Vec::new();
    std::thread::scope(|sc| {
        let read = |round: usize, mut buf: Vec<u8>| {
            let r = read_round(plan, s, round, &mut buf, &load);
            (buf, r)
        };
        let mut spare = Some(second);
        let mut ahead = (rounds > 0).then(|| sc.spawn(move || read(0, first)));
        let mut read_total = 0u64;
        // An error found after a round's exchange, reported at the next agreement.
        let mut carried: Result<()> = Ok(());
        let out = (|| -> Result<u64> {
            for round in 0..rounds {
                gcomm.set_phase(&format!("read-once round {} of {rounds}", round + 1));
                let (staging, got) = match ahead.take().map(|h| h.join()) {
                    Some(Ok(done)) => done,
                    _ => (
                        Vec::new(),
                        Err(Error::comm("read-once", "the reader thread failed")),
                    ),
                };
                if round + 1 < rounds {
                    if let Some(buf) = spare.take() {
                        ahead = Some(sc.spawn(move || read(round + 1, buf)));
                    }
                }
                let local = got.and_then(|bytes| {
                    std::mem::replace(&mut carried, Ok(()))?;
                    let sends = outgoing(s, round, &staging, &mut pack)?;
                    let (recvs, bounced) = receive_layout(s, round, target, bundles.len())?;
                    let bounce_len = bounced.iter().map(|(r, _)| r.len() as u64).sum();
                    buffer(&mut bounce, bounce_len, s.me, "read-once bounce buffer")?;
                    Ok((bytes, sends, (recvs, bounced)))
                });
                let (bytes, sends, (recvs, bounced)) = agree(gcomm, local)?;
                read_total += bytes;
                let sends: Vec<(usize, &[u8])> = sends
                    .iter()
                    .map(|(d, from)| {
                        let bytes = match from {
                            Source::Staging(r) => staging.get(r.clone()),
                            Source::Packed(r) => pack.get(r.clone()),
                        };
                        (*d, bytes.unwrap_or(&[]))
                    })
                    .collect();
                let moved =
                    carve(target, &mut bundles, &mut bounce, &recvs).and_then(|mut into| {
                        gcomm.exchange(&sends, &mut into)?;
                        traffic.sent_bytes +=
                            sends.iter().map(|(_, b)| b.len() as u64).sum::<u64>();
                        traffic.received_bytes +=
                            into.iter().map(|(_, b)| b.len() as u64).sum::<u64>();
                        Ok(())
                    });
                carried = moved
                    .and_then(|()| unpack_bundles(s, round, &bundles, target))
                    .and_then(|()| unbounce(&bounce, &bounced, target))
                    .and_then(|()| own_transfers(s, round, &staging, target));
                spare = Some(staging);
            }
            std::mem::replace(&mut carried, Ok(())).map(|()| read_total)
        })();
        if out.is_err() {
            if let Some(c) = &own {
                c.cancel();
            }
        }
        out
    })
}

/// Reads this member's pieces of `round` into `buf`; returns the bytes read from storage.
fn read_round(
    plan: &Plan,
    s: &ReadOnceSchedule,
    round: usize,
    buf: &mut [u8],
    load: &LoadOptions,
) -> Result<u64> {
    let pieces = s.own_pieces(round);
    let len: u64 = pieces.iter().map(|p| p.len).sum();
    let range = slice_range(0, len, buf.len())?;
    let into = buf
        .get_mut(range)
        .ok_or_else(|| Error::plan("read-once staging smaller than its round"))?;
    read_segments(plan, &pieces, into, load)
}

/// Where a message's bytes are sent from.
enum Source {
    Staging(Range<usize>),
    Packed(Range<usize>),
}

/// Where a received message's bytes land: a span of the rank's layout (arena offsets, inside
/// one caller buffer or outside all), the bundle buffer or the bounce buffer.
enum Landing {
    Layout(Range<usize>),
    Bundle(Range<usize>),
    Bounce(Range<usize>),
}

/// Copies `len` bytes from `from[src..]` to `to[dst..]`, both checked.
fn copy(from: &[u8], src: u64, to: &mut [u8], dst: u64, len: u64) -> Result<()> {
    let a = slice_range(src, len, from.len())?;
    let b = slice_range(dst, len, to.len())?;
    if let (Some(a), Some(b)) = (from.get(a), to.get_mut(b)) {
        b.copy_from_slice(a);
    }
    Ok(())
}

/// Copies `len` bytes from `from[src..]` to the layout at `dst`, both checked.
fn copy_out(from: &[u8], src: u64, to: &mut Target<'_>, dst: u64, len: u64) -> Result<()> {
    let a = slice_range(src, len, from.len())?;
    slice_range(dst, len, to.len())?;
    to.write(dst, from.get(a).unwrap_or(&[]))
}

/// The messages of `round` this member sends, in the order each receiver expects them (per
/// destination: its direct messages, then its bundle): ranges of staging, or of `pack` for
/// the bytes that are not contiguous in staging, which this packs.
fn outgoing(
    s: &ReadOnceSchedule,
    round: usize,
    staging: &[u8],
    pack: &mut [u8],
) -> Result<Vec<(usize, Source)>> {
    let mut out = Vec::new();
    let mut at = 0u64;
    let mut pack_all = |xs: &[Xfer], at: &mut u64| -> Result<Range<usize>> {
        let start = *at;
        for x in xs {
            copy(staging, s.staging_offset(x), pack, *at, x.len)?;
            *at += x.len;
        }
        slice_range(start, *at - start, pack.len())
    };
    let bad = || Error::plan("read-once message outside its transfer list");
    for d in (0..s.n).filter(|&d| d != s.me) {
        let xs = s.sends(round, d);
        let plan = s.send_plan(round, d);
        for r in &plan.direct {
            let m = xs.get(r.clone()).ok_or_else(bad)?;
            if s.contiguous_in_staging(m) {
                let start = m.first().map_or(0, |x| s.staging_offset(x));
                let len = m.iter().map(|x| x.len).sum();
                out.push((d, Source::Staging(slice_range(start, len, staging.len())?)));
            } else {
                out.push((d, Source::Packed(pack_all(m, &mut at)?)));
            }
        }
        if !plan.bundle.is_empty() {
            let start = at;
            for r in &plan.bundle {
                pack_all(xs.get(r.clone()).ok_or_else(bad)?, &mut at)?;
            }
            out.push((
                d,
                Source::Packed(slice_range(start, at - start, usize::MAX)?),
            ));
        }
    }
    Ok(out)
}

/// Where the messages of `round` land, in the order each sender sends them: direct ones in
/// their memory (in the bounce buffer when across a caller buffer's edge: returned with
/// their layout offsets), bundles one after the other in the bundle buffer.
#[allow(clippy::type_complexity)]
fn receive_layout(
    s: &ReadOnceSchedule,
    round: usize,
    target: &Target<'_>,
    bundles_len: usize,
) -> Result<(Vec<(usize, Landing)>, Vec<(Range<usize>, u64)>)> {
    let mut out = Vec::new();
    let mut bounced = Vec::new();
    let (mut at, mut at_bounce) = (0u64, 0usize);
    let bad = || Error::plan("read-once message outside its transfer list");
    for o in (0..s.n).filter(|&o| o != s.me) {
        let xs = s.receives(round, o);
        let plan = s.recv_plan(round, o);
        for r in &plan.direct {
            let m = xs.get(r.clone()).ok_or_else(bad)?;
            let dst = m.first().map_or(0, |x| x.dst);
            let len = m.iter().map(|x| x.len).sum();
            let range = slice_range(dst, len, target.len())?;
            if target.is_whole(dst, len) {
                out.push((o, Landing::Layout(range)));
            } else {
                let r = at_bounce..at_bounce + range.len();
                at_bounce = r.end;
                bounced.push((r.clone(), dst));
                out.push((o, Landing::Bounce(r)));
            }
        }
        let b = plan.bundle_bytes(xs);
        if b > 0 {
            out.push((o, Landing::Bundle(slice_range(at, b, bundles_len)?)));
            at += b;
        }
    }
    Ok((out, bounced))
}

/// The receive buffers of `layout`, in its order, cut out of the target's memory (the arena
/// and each caller buffer), the bundle and the bounce buffer (disjoint ranges; an overlap is
/// an error, never two writers).
fn carve<'a>(
    target: &'a mut Target<'_>,
    bundles: &'a mut [u8],
    bounce: &'a mut [u8],
    layout: &[(usize, Landing)],
) -> Result<Vec<(usize, &'a mut [u8])>> {
    let (arena, redirects) = target.parts_mut();
    // Region 0 is the arena, region i + 1 caller buffer i (ranges relative to it); the last
    // two are the bundle and bounce buffers.
    let mut regions: Vec<(u64, &'a mut [u8])> = Vec::with_capacity(redirects.len() + 3);
    regions.push((0, arena));
    regions.extend(redirects);
    let n_layout = regions.len();
    regions.push((0, bundles));
    regions.push((0, bounce));
    let mut wanted: Vec<Vec<Range<usize>>> = regions.iter().map(|_| Vec::new()).collect();
    let mut at = Vec::with_capacity(layout.len());
    for (_, l) in layout {
        let (region, r) = match l {
            Landing::Layout(r) => {
                // The caller buffer holding its start (sorted, disjoint), else the arena.
                let i = regions[1..n_layout].partition_point(|(s, _)| *s <= r.start as u64);
                match regions.get(i).filter(|_| i > 0) {
                    Some((s, b)) if (r.start as u64) < s + b.len() as u64 => {
                        let s = usize::try_from(*s).unwrap_or(usize::MAX);
                        (i, r.start - s..r.end - s)
                    }
                    _ => (0, r.clone()),
                }
            }
            Landing::Bundle(r) => (n_layout, r.clone()),
            Landing::Bounce(r) => (n_layout + 1, r.clone()),
        };
        at.push(region);
        if let Some(w) = wanted.get_mut(region) {
            w.push(r);
        }
    }
    let mut cuts = Vec::with_capacity(regions.len());
    for ((_, buf), w) in regions.into_iter().zip(&wanted) {
        cuts.push(cut(buf, w)?.into_iter());
    }
    layout
        .iter()
        .zip(at)
        .map(|((o, _), region)| {
            cuts.get_mut(region)
                .and_then(Iterator::next)
                .map(|buf| (*o, buf))
                .ok_or_else(|| Error::plan("read-once receive layout"))
        })
        .collect()
}

/// Copies the messages received into the bounce buffer to their layout offsets.
fn unbounce(bounce: &[u8], bounced: &[(Range<usize>, u64)], target: &mut Target<'_>) -> Result<()> {
    for (r, dst) in bounced {
        copy_out(bounce, r.start as u64, target, *dst, r.len() as u64)?;
    }
    Ok(())
}

/// Disjoint `ranges` of `buf` as slices, in the order given.
fn cut<'a>(buf: &'a mut [u8], ranges: &[Range<usize>]) -> Result<Vec<&'a mut [u8]>> {
    let mut order: Vec<usize> = (0..ranges.len()).collect();
    order.sort_by_key(|&i| ranges.get(i).map_or(0, |r| r.start));
    let mut slots: Vec<Option<&'a mut [u8]>> = (0..ranges.len()).map(|_| None).collect();
    let (mut rest, mut base) = (buf, 0usize);
    for i in order {
        let r = ranges.get(i).cloned().unwrap_or(0..0);
        if r.start < base || r.end < r.start || r.end - base > rest.len() {
            return Err(Error::plan(format!(
                "read-once receive range {}..{} overlaps another or leaves its buffer",
                r.start, r.end
            )));
        }
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(r.start - base);
        let (mid, tail) = tail.split_at_mut(r.end - r.start);
        if let Some(slot) = slots.get_mut(i) {
            *slot = Some(mid);
        }
        rest = tail;
        base = r.end;
    }
    Ok(slots.into_iter().flatten().collect())
}

/// Copies the bundles of `round` from the bundle buffer to their layout offsets.
fn unpack_bundles(
    s: &ReadOnceSchedule,
    round: usize,
    bundles: &[u8],
    target: &mut Target<'_>,
) -> Result<()> {
    let mut at = 0u64;
    for o in (0..s.n).filter(|&o| o != s.me) {
        let xs = s.receives(round, o);
        for r in &s.recv_plan(round, o).bundle {
            for x in xs.get(r.clone()).unwrap_or(&[]) {
                copy_out(bundles, at, target, x.dst, x.len)?;
                at += x.len;
            }
        }
    }
    Ok(())
}

/// This member's own transfers of `round`: from its staging buffer to its layout.
fn own_transfers(
    s: &ReadOnceSchedule,
    round: usize,
    staging: &[u8],
    target: &mut Target<'_>,
) -> Result<()> {
    for x in s.sends(round, s.me) {
        copy_out(staging, s.staging_offset(x), target, x.dst, x.len)?;
    }
    Ok(())
}
