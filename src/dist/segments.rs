//! A plan's runs as single-chunk copies, and the one place where the share modes touch the
//! loader's engine.
//!
//! The share modes cut and move bytes as contiguous copies: the plan's own run type
//! ([`CopyRun`]) with `count == 1` (a run of `count` chunks is `count` of them, see
//! [`rank_segments`]). Reading goes through [`read_segments`], which hands them to the
//! loader's engine ([`crate::load::execute`]).

use crate::load::{execute, ExecStats, LoadOptions};
use crate::plan::{CopyRun, Plan, RankPlan};
use crate::{Error, Result};

/// All chunks of a rank's copy runs as single-chunk runs, in plan order; empty chunks are
/// dropped.
pub fn rank_segments(rank: &RankPlan) -> Vec<CopyRun> {
    rank.copies
        .iter()
        .flat_map(|run| (0..run.count).map(move |i| run.rows(i, 1)))
        .filter(|s| s.len > 0)
        .collect()
}

/// Checks that every run and zero run of `rank` stays inside its arena (a corrupt or
/// hand-made plan must give an error, not a panic).
pub fn check_rank(plan: &Plan, rank: &RankPlan) -> Result<()> {
    let bad = |what: &str| {
        Error::plan_rank(
            rank.coords.rank,
            format!("{what} outside its {}-byte arena", rank.arena_bytes),
        )
    };
    for r in &rank.copies {
        if (r.file as usize) >= plan.files.len() {
            return Err(Error::plan_rank(
                rank.coords.rank,
                format!("copy run names file #{} of {}", r.file, plan.files.len()),
            ));
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

/// Reads `segs` (single-chunk runs) from the plan's files into `buf` (each to
/// `buf[dst..dst + len]`) with the loader's engine; returns the bytes read from storage.
pub fn read_segments(
    plan: &Plan,
    segs: &[CopyRun],
    buf: &mut [u8],
    opts: &LoadOptions,
) -> Result<u64> {
    Ok(read_segments_stats(plan, segs, buf, opts)?.read_bytes)
}

/// [`read_segments`] with everything the engine reports (threads, I/O paths).
pub fn read_segments_stats(
    plan: &Plan,
    segs: &[CopyRun],
    buf: &mut [u8],
    opts: &LoadOptions,
) -> Result<ExecStats> {
    execute(&plan.files, segs, &[], buf, opts)
}

/// `start..start + len` as a usize range checked against `limit`.
pub fn slice_range(start: u64, len: u64, limit: usize) -> Result<std::ops::Range<usize>> {
    let s = usize::try_from(start).ok();
    let e = start.checked_add(len).and_then(|e| usize::try_from(e).ok());
    match (s, e) {
        (Some(s), Some(e)) if e <= limit => Ok(s..e),
        _ => Err(Error::plan(format!(
            "byte range {start}+{len} outside a buffer of {limit} bytes"
        ))),
    }
}
