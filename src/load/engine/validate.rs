//! Soundness: copy and zero runs checked against their files and the arena (no overflow,
//! inside bounds, no two destination chunks overlapping) before any thread writes, and the
//! raw arena pointer the copy threads share, handed out only by the check's token.

use std::marker::PhantomData;

use super::bad_plan;
use crate::plan::{CopyRun, PlanFile, Strided, ZeroRun};
use crate::{Error, Result};

/// Caller memory that takes the place of one span of the arena: arena bytes
/// `[start, start + dst.len())` are written to `dst` instead (a tensor loaded straight into
/// its final buffer, see [`crate::load::load_rank_scattered`]).
pub(crate) struct Redirect<'a> {
    /// First arena byte of the span.
    pub(crate) start: u64,
    /// Where the span's bytes go.
    pub(crate) dst: &'a mut [u8],
}

/// A [`Redirect`] as raw parts, shared by the copy threads.
#[derive(Clone, Copy)]
struct RawRedirect {
    start: u64,
    len: u64,
    ptr: *mut u8,
}

/// The arena (and the caller buffers replacing spans of it) as raw pointers, shared by the
/// copy threads. Only [`ValidatedRuns::arena`] makes one, from the parts [`validate`] checked
/// while borrowing the arena and the buffers mutably for `'a`, so nothing else can read or
/// write them while the copy threads write through it.
#[derive(Clone, Copy)]
pub(super) struct ArenaPtr<'r> {
    ptr: *mut u8,
    len: usize,
    /// Sorted by `start`, disjoint.
    redirects: &'r [RawRedirect],
}
// SAFETY: threads write disjoint ranges only (proved by `validate`, see `ValidatedRuns`).
unsafe impl Send for ArenaPtr<'_> {}
// SAFETY: as above.
unsafe impl Sync for ArenaPtr<'_> {}

impl ArenaPtr<'_> {
    /// The memory holding arena bytes `[off, off + len)`: a caller buffer when a redirect
    /// covers `off`, else the arena.
    ///
    /// # Safety
    /// `[off, off + len)` must lie inside the arena and either inside one redirect or outside
    /// all (checked by `validate` for every run, so for every task cut from one), and be
    /// written by no other thread now.
    #[allow(clippy::mut_from_ref)]
    pub(super) unsafe fn chunk(&self, off: u64, len: u64) -> &mut [u8] {
        debug_assert!(off + len <= self.len as u64);
        std::slice::from_raw_parts_mut(self.address(off, len), len as usize)
    }

    /// The address of arena byte `off` of a span `[off, off + len)` that `validate` checked
    /// (see [`ArenaPtr::chunk`]).
    pub(super) fn address(&self, off: u64, len: u64) -> *mut u8 {
        let i = self.redirects.partition_point(|r| r.start <= off);
        if let Some(r) = i.checked_sub(1).and_then(|i| self.redirects.get(i)) {
            if off < r.start + r.len {
                debug_assert!(off + len <= r.start + r.len);
                return r.ptr.wrapping_add((off - r.start) as usize);
            }
        }
        debug_assert!(off + len <= self.len as u64);
        self.ptr.wrapping_add(off as usize)
    }
}

/// Copy and zero runs proven to lie inside their files (as planned) and inside the arena,
/// with no offset overflow and no two destination chunks overlapping. Produced only by
/// [`validate`], which takes the arena for `'a`: the unsafe parallel copy accepts nothing
/// else, so an unchecked run can never reach it.
pub(super) struct ValidatedRuns<'a> {
    files: &'a [PlanFile],
    copies: &'a [CopyRun],
    zeros: &'a [ZeroRun],
    arena: *mut u8,
    arena_len: usize,
    redirects: Vec<RawRedirect>,
    _borrows: PhantomData<&'a mut [u8]>,
    /// Each reader populates a task's destination pages in one call before reading into it.
    ahead: bool,
}

impl<'a> ValidatedRuns<'a> {
    /// The plan's files.
    pub(super) fn files(&self) -> &'a [PlanFile] {
        self.files
    }

    /// The copy runs that were validated.
    pub(super) fn copies(&self) -> &'a [CopyRun] {
        self.copies
    }

    /// The zero runs that were validated.
    pub(super) fn zeros(&self) -> &'a [ZeroRun] {
        self.zeros
    }

    /// Whether readers populate a task's destination pages first.
    pub(super) fn ahead(&self) -> bool {
        self.ahead
    }

    pub(super) fn arena(&self) -> ArenaPtr<'_> {
        ArenaPtr {
            ptr: self.arena,
            len: self.arena_len,
            redirects: &self.redirects,
        }
    }

    /// With `on`, each reader makes a task's destination pages resident before reading into
    /// them (see [`super::Request::populate_ahead`]).
    pub(super) fn populate_ahead(mut self, on: bool) -> Self {
        self.ahead = on;
        self
    }
}

/// The destination of `{what} run {i}`, checked against the arena: no offset overflow,
/// within `arena_len`, chunks not overlapping each other.
fn checked_dst(what: &str, i: usize, p: Strided, arena_len: u64) -> Result<Strided> {
    let end = p
        .end()
        .ok_or_else(|| bad_plan(format!("{what} run {i}: arena offsets overflow")))?;
    if end > arena_len {
        return Err(bad_plan(format!(
            "{what} run {i} writes up to arena byte {end}, arena has {arena_len}"
        )));
    }
    if p.count > 1 && p.stride < p.len {
        return Err(bad_plan(format!(
            "{what} run {i}: chunks overlap in the arena"
        )));
    }
    Ok(p)
}

/// Checks every run against the files and an arena of `arena_len` bytes, without caller
/// buffers (see [`validate`]).
pub(super) fn check(
    files: &[PlanFile],
    copies: &[CopyRun],
    zeros: &[ZeroRun],
    arena_len: u64,
) -> Result<()> {
    check_runs(files, copies, zeros, arena_len, &[])
}

/// Checks every run against the files and the arena: within bounds, no arithmetic overflow,
/// and no two destination chunks overlapping (the parallel copy relies on that), with spans
/// of the arena written to caller buffers instead: every redirect must lie inside the arena,
/// no two may overlap, and every run must lie inside one redirect or outside all of them (so
/// a task, cut from one run, never straddles two buffers). Returns the token the copy paths
/// require, holding the arena and the buffers for as long as it lives.
pub(super) fn validate<'a>(
    files: &'a [PlanFile],
    copies: &'a [CopyRun],
    zeros: &'a [ZeroRun],
    arena: &'a mut [u8],
    mut redirects: Vec<Redirect<'a>>,
) -> Result<ValidatedRuns<'a>> {
    let arena_len = arena.len() as u64;
    redirects.sort_by_key(|r| r.start);
    let mut raw: Vec<RawRedirect> = Vec::new();
    raw.try_reserve_exact(redirects.len()).map_err(|_| {
        bad_plan(format!(
            "{} redirects do not fit in memory",
            redirects.len()
        ))
    })?;
    for r in redirects {
        let len = r.dst.len() as u64;
        let end = r.start.checked_add(len).filter(|&e| e <= arena_len);
        if end.is_none() {
            return Err(bad_plan(format!(
                "a caller buffer of {len} bytes at arena byte {} ends past the arena ({arena_len} bytes)",
                r.start
            )));
        }
        if let Some(prev) = raw.last() {
            if r.start < prev.start + prev.len {
                return Err(bad_plan(format!(
                    "caller buffers overlap in the arena at byte {}",
                    r.start
                )));
            }
        }
        if len > 0 {
            raw.push(RawRedirect {
                start: r.start,
                len,
                ptr: r.dst.as_mut_ptr(),
            });
        }
    }
    check_runs(files, copies, zeros, arena_len, &raw)?;
    Ok(ValidatedRuns {
        files,
        copies,
        zeros,
        arena: arena.as_mut_ptr(),
        arena_len: arena.len(),
        redirects: raw,
        _borrows: PhantomData,
        ahead: false,
    })
}

/// The run checks of [`validate`] against `raw`, the sorted, disjoint caller buffers.
fn check_runs(
    files: &[PlanFile],
    copies: &[CopyRun],
    zeros: &[ZeroRun],
    arena_len: u64,
    raw: &[RawRedirect],
) -> Result<()> {
    let straddles = |p: &Strided| {
        let (s, e) = (p.start, p.end_saturating());
        let i = raw.partition_point(|r| r.start <= s);
        match i.checked_sub(1).and_then(|i| raw.get(i)) {
            Some(r) if s < r.start + r.len => e > r.start + r.len,
            // Outside every redirect unless one starts inside the span.
            _ => raw.get(i).is_some_and(|r| r.start < e),
        }
    };
    let mut pats = Vec::new();
    pats.try_reserve_exact(copies.len() + zeros.len())
        .map_err(|_| bad_plan(format!("{} runs do not fit in memory", copies.len())))?;
    for (i, r) in copies.iter().enumerate() {
        if r.count == 0 || r.len == 0 {
            continue;
        }
        let pf = files.get(r.file as usize).ok_or_else(|| {
            bad_plan(format!(
                "copy run {i} names file #{}, plan has {}",
                r.file,
                files.len()
            ))
        })?;
        let src_end = r
            .src_pattern()
            .end()
            .ok_or_else(|| bad_plan(format!("copy run {i}: source offsets overflow")))?;
        if src_end > pf.identity.len {
            return Err(Error::Load {
                rank: None,
                file: Some(pf.path.clone()),
                reason: format!(
                    "copy run {i} reads up to byte {src_end} but the file has {} bytes",
                    pf.identity.len
                ),
            });
        }
        let p = checked_dst("copy", i, r.dst_pattern(), arena_len)?;
        if straddles(&p) {
            return Err(bad_plan(format!(
                "copy run {i} straddles a caller buffer's edge"
            )));
        }
        pats.push(p);
    }
    for (i, z) in zeros.iter().enumerate() {
        if z.count == 0 || z.len == 0 {
            continue;
        }
        let p = checked_dst("zero", i, z.dst_pattern(), arena_len)?;
        if straddles(&p) {
            return Err(bad_plan(format!(
                "zero run {i} straddles a caller buffer's edge"
            )));
        }
        pats.push(p);
    }
    check_disjoint(&mut pats)
}

/// Runs whose bounding spans do not overlap are disjoint; only groups of interleaved runs
/// (fused parts split on an inner dimension) are checked chunk by chunk.
fn check_disjoint(pats: &mut [Strided]) -> Result<()> {
    // Ends were checked by `checked_dst`.
    pats.sort_by_key(|p| (p.start, p.end_saturating()));
    let mut i = 0;
    while i < pats.len() {
        let mut j = i + 1;
        let mut end = pats[i].end_saturating();
        while j < pats.len() && pats[j].start < end {
            end = end.max(pats[j].end_saturating());
            j += 1;
        }
        if j - i > 1 {
            let mut chunks: Vec<(u64, u64)> = pats[i..j].iter().flat_map(|p| p.chunks()).collect();
            chunks.sort_unstable();
            for w in chunks.windows(2) {
                if w[1].0 < w[0].1 {
                    return Err(bad_plan(format!(
                        "runs overlap in the arena at byte {}",
                        w[1].0
                    )));
                }
            }
        }
        i = j;
    }
    Ok(())
}
