//! Byte segments of a plan, and the one place where the share modes touch the plan's run
//! type and the loader's engine.
//!
//! The share modes work on [`Segment`]s: one contiguous file range copied to one buffer range
//! (a plan [`CopyRun`] of `count` chunks is `count` segments). Reading goes through
//! [`read_segments`], which hands them to the loader's engine ([`crate::load::execute`]) as
//! contiguous runs.

use crate::load::{execute, LoadOptions};
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
fn run_segments(run: &CopyRun) -> impl Iterator<Item = Segment> + '_ {
    (0..run.count).map(move |i| {
        let chunk = run.rows(i, 1);
        Segment {
            file: run.file,
            src: chunk.src,
            len: run.len,
            dst: chunk.dst,
        }
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
    for r in &rank.copies {
        if (r.file as usize) >= plan.files.len() {
            return Err(Error::Plan(format!(
                "rank {}: copy run names file #{} of {}",
                rank.coords.rank,
                r.file,
                plan.files.len()
            )));
        }
        match r.dst_pattern().end() {
            Some(e) if e <= rank.arena_bytes => {}
            _ => return Err(bad("a copy run ends")),
        }
        if r.src_pattern().end().is_none() {
            return Err(bad("a copy run's source overflows;"));
        }
    }
    for z in &rank.zeros {
        match z.dst_pattern().end() {
            Some(e) if e <= rank.arena_bytes => {}
            _ => return Err(bad("a zero run ends")),
        }
    }
    Ok(())
}

/// Reads `segs` from the plan's files into `buf` (each segment to `buf[dst..dst + len]`) with
/// the loader's engine; returns the bytes read from storage.
pub fn read_segments(
    plan: &Plan,
    segs: &[Segment],
    buf: &mut [u8],
    opts: &LoadOptions,
) -> Result<u64> {
    Ok(execute(&plan.files, &segment_runs(segs), &[], buf, opts)?.read_bytes)
}

/// Contiguous copy runs (count 1) for segments.
fn segment_runs(segs: &[Segment]) -> Vec<CopyRun> {
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
