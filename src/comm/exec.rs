//! Byte segments of a plan and a small `pread` executor for them.
//!
//! The share modes work on [`Segment`]s: one contiguous file range copied to one arena range
//! (a plan [`CopyRun`] of `count` chunks is `count` segments).
//! The reading itself is the loader's engine ([`crate::load::execute`]), fed with the runs a
//! rank reads itself.

use crate::plan::{CopyRun, Plan, RankPlan};
use crate::{Error, Result};

/// One contiguous copy: `len` bytes from file `file` at `src` to arena offset `dst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Segment {
    /// Index into [`Plan::files`].
    pub file: u32,
    /// File offset.
    pub src: u64,
    /// Length in bytes.
    pub len: u64,
    /// Arena offset.
    pub dst: u64,
}

/// The segments of one copy run, chunk by chunk.
pub fn run_segments(run: &CopyRun) -> impl Iterator<Item = Segment> + '_ {
    (0..run.count).map(move |i| Segment {
        file: run.file,
        src: run.src + i * run.src_stride,
        len: run.len,
        dst: run.dst + i * run.dst_stride,
    })
}

/// All segments of a rank, in plan order; empty chunks are dropped.
pub fn rank_segments(rank: &RankPlan) -> Vec<Segment> {
    rank.copies
        .iter()
        .flat_map(run_segments)
        .filter(|s| s.len > 0)
        .collect()
}

/// Checks that every run and zero run of `rank` stays inside its arena (a corrupt or
/// hand-made plan must give an error, not a panic).
pub fn check_rank(plan: &Plan, rank: &RankPlan) -> Result<()> {
    let bad = |what: &str| {
        Error::Plan(format!(
            "rank {}: {what} outside its {}-byte arena",
            rank.coords.rank, rank.arena_bytes
        ))
    };
    let end = |dst: u64, len: u64, count: u64, stride: u64| -> Option<u64> {
        if count == 0 {
            return Some(dst);
        }
        (count - 1)
            .checked_mul(stride)?
            .checked_add(dst)?
            .checked_add(len)
    };
    for r in &rank.copies {
        if (r.file as usize) >= plan.files.len() {
            return Err(Error::Plan(format!(
                "rank {}: copy run names file #{} of {}",
                rank.coords.rank,
                r.file,
                plan.files.len()
            )));
        }
        match end(r.dst, r.len, r.count, r.dst_stride) {
            Some(e) if e <= rank.arena_bytes => {}
            _ => return Err(bad("a copy run ends")),
        }
        if end(r.src, r.len, r.count, r.src_stride).is_none() {
            return Err(bad("a copy run's source overflows;"));
        }
    }
    for z in &rank.zeros {
        match end(z.dst, z.len, z.count, z.dst_stride) {
            Some(e) if e <= rank.arena_bytes => {}
            _ => return Err(bad("a zero run ends")),
        }
    }
    Ok(())
}

/// A fresh zeroed arena of `rank.arena_bytes` (zero runs are then already satisfied).
pub fn new_arena(rank: &RankPlan) -> Result<Vec<u8>> {
    let len = usize::try_from(rank.arena_bytes)
        .map_err(|_| Error::Load(format!("rank {}: arena too large", rank.coords.rank)))?;
    let mut arena = Vec::new();
    arena.try_reserve_exact(len).map_err(|_| {
        Error::Load(format!(
            "rank {}: cannot allocate {len} bytes for its tensors",
            rank.coords.rank
        ))
    })?;
    arena.resize(len, 0);
    Ok(arena)
}

/// Contiguous copy runs (count 1) for segments, to hand to [`crate::load::execute`].
pub fn segment_runs(segs: &[Segment]) -> Vec<CopyRun> {
    segs.iter()
        .map(|s| CopyRun {
            file: s.file,
            src: s.src,
            dst: s.dst,
            len: s.len,
            count: 1,
            src_stride: 0,
            dst_stride: 0,
        })
        .collect()
}

/// `start..start + len` as a usize range checked against `limit`.
pub fn slice_range(start: u64, len: u64, limit: usize) -> Result<std::ops::Range<usize>> {
    let s = usize::try_from(start).ok();
    let e = start.checked_add(len).and_then(|e| usize::try_from(e).ok());
    match (s, e) {
        (Some(s), Some(e)) if e <= limit => Ok(s..e),
        _ => Err(Error::Plan(format!(
            "byte range {start}+{len} outside a buffer of {limit} bytes"
        ))),
    }
}
