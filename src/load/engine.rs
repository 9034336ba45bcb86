//! Executing copy and zero runs: file checks, run validation (which yields the
//! [`ValidatedRuns`] token the unsafe copy requires), task splitting, and the I/O paths
//! (positioned reads straight into the arena, gathers from memory-mapped windows, staged
//! reads), chosen per task by [`IoMode`].

use std::fs::File;
use std::marker::PhantomData;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use memmap2::{Advice, Mmap, MmapOptions, UncheckedAdvice};

use super::sigbus;
use super::{IoMode, LoadOptions};
use crate::checkpoint::FileIdentity;
use crate::error::FileChange;
use crate::plan::{merge_intervals, page_size, read_bytes, CopyRun, PlanFile, Strided, ZeroRun};
use crate::{Error, Result};

/// Largest piece of work handed to one rayon task (bytes written to the arena).
pub(crate) const TASK_BYTES: u64 = 8 << 20;

/// What one execution did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecStats {
    /// Bytes read from storage: the page-rounded union of the pages the mmap engine touches,
    /// or the bytes the pread engine asked the kernel for.
    pub read_bytes: u64,
    /// Most staging memory held at once (pread engine; 0 for mmap).
    pub peak_staging: u64,
}

/// Opens the plan's files that `copies` read and checks each against its planned identity
/// (length, modification time, device, inode; fields recorded as 0 are unknown and skipped).
/// The check runs on the open handle, which is the one later mapped or read, so a file
/// replaced after the check is not silently used.
pub(crate) fn open_checked(files: &[PlanFile], copies: &[CopyRun]) -> Result<Vec<Option<File>>> {
    let mut open: Vec<Option<File>> = (0..files.len()).map(|_| None).collect();
    for run in copies {
        let idx = run.file as usize;
        let Some(pf) = files.get(idx) else {
            return Err(Error::plan(format!(
                "copy run names file #{idx}, but the plan has {} files",
                files.len()
            )));
        };
        let Some(slot) = open.get_mut(idx) else {
            continue;
        };
        if slot.is_some() {
            continue;
        }
        let f = File::open(&pf.path).map_err(|e| Error::io(&pf.path, e))?;
        check_identity(pf, &FileIdentity::of(&f, &pf.path)?)?;
        *slot = Some(f);
    }
    Ok(open)
}

fn check_identity(pf: &PlanFile, now: &FileIdentity) -> Result<()> {
    let want = &pf.identity;
    let change = if now.len != want.len {
        FileChange::Length {
            now: now.len,
            planned: want.len,
        }
    } else if (want.mtime_ns != 0 && now.mtime_ns != want.mtime_ns)
        || (want.dev != 0 && now.dev != want.dev)
        || (want.ino != 0 && now.ino != want.ino)
    {
        FileChange::Replaced
    } else {
        return Ok(());
    };
    Err(Error::FileChanged {
        file: pf.path.clone(),
        change,
    })
}

fn bad_plan(msg: String) -> Error {
    Error::plan(msg)
}

/// The message of a load whose input shrank under it (a short read or a recovered `SIGBUS`).
fn truncated(pf: &PlanFile, detail: impl std::fmt::Display) -> Error {
    Error::Truncated {
        file: pf.path.clone(),
        detail: detail.to_string(),
    }
}

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
struct ArenaPtr<'r> {
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
    unsafe fn chunk(&self, off: u64, len: u64) -> &mut [u8] {
        debug_assert!(off + len <= self.len as u64);
        std::slice::from_raw_parts_mut(self.address(off, len), len as usize)
    }

    /// The address of arena byte `off` of a span `[off, off + len)` that `validate` checked
    /// (see [`ArenaPtr::chunk`]).
    fn address(&self, off: u64, len: u64) -> *mut u8 {
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
pub(crate) struct ValidatedRuns<'a> {
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

impl ValidatedRuns<'_> {
    /// The copy runs that were validated.
    pub(crate) fn copies(&self) -> &[CopyRun] {
        self.copies
    }

    fn arena(&self) -> ArenaPtr<'_> {
        ArenaPtr {
            ptr: self.arena,
            len: self.arena_len,
            redirects: &self.redirects,
        }
    }

    /// With `on`, each reader makes a task's destination pages resident in one
    /// `MADV_POPULATE_WRITE` call before reading into them ([`crate::load::ArenaInit::Ahead`]
    /// on a fresh arena): one batched call faults pages about twice as fast as the copy's own
    /// page faults do, and it runs on every reader, so on every core.
    pub(crate) fn populate_ahead(mut self, on: bool) -> Self {
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

/// Checks every run against the files and the arena: within bounds, no arithmetic overflow,
/// and no two destination chunks overlapping (the parallel copy relies on that). Returns the
/// token the copy paths require, holding the arena for as long as it lives.
pub(crate) fn validate<'a>(
    files: &'a [PlanFile],
    copies: &'a [CopyRun],
    zeros: &'a [ZeroRun],
    arena: &'a mut [u8],
) -> Result<ValidatedRuns<'a>> {
    validate_redirected(files, copies, zeros, arena, Vec::new())
}

/// [`validate`] with spans of the arena written to caller buffers instead: every redirect
/// must lie inside the arena, no two may overlap, and every run must lie inside one redirect
/// or outside all of them (so a task, cut from one run, never straddles two buffers).
pub(crate) fn validate_redirected<'a>(
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
    check_disjoint(&mut pats)?;
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

/// A unit of parallel work: part of one copy or zero run.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Task {
    /// Copy from a file.
    Copy(CopyRun),
    /// Fill with zeros.
    Zero(ZeroRun),
}

impl Task {
    fn dst_pattern(&self) -> Strided {
        match self {
            Task::Copy(c) => c.dst_pattern(),
            Task::Zero(z) => z.dst_pattern(),
        }
    }

    /// Arena bytes this task fills (what progress counts).
    fn arena_bytes(&self) -> u64 {
        let d = self.dst_pattern();
        d.len.saturating_mul(d.count)
    }
}

/// Makes the whole pages under task `t`'s destination span resident without changing a byte
/// (`MADV_POPULATE_WRITE`; partial pages at the ends are left to the readers, so nothing
/// outside the arena is touched). Best effort: where the kernel cannot (before Linux 5.14),
/// the reader's copy faults the pages itself.
fn populate(arena: ArenaPtr<'_>, t: &Task) {
    let d = t.dst_pattern();
    let page = page_size() as usize;
    let len = d.end_saturating() - d.start;
    // Validated: the span lies inside the arena or inside one caller buffer.
    let s = arena.address(d.start, len) as usize;
    let e = s + len as usize;
    let (s, e) = (s.div_ceil(page) * page, e / page * page);
    if e <= s {
        return;
    }
    // SAFETY: `[s, e)` lies inside the arena or a caller's writable buffer;
    // MADV_POPULATE_WRITE faults pages in as a write would but leaves their contents alone,
    // so it races with no reader's write.
    unsafe { libc::madvise(s as *mut libc::c_void, e - s, libc::MADV_POPULATE_WRITE) };
}

/// How a run of `count` chunks of `len` bytes is cut into tasks of about [`TASK_BYTES`].
enum Cut {
    /// `len` bytes at byte `off` of chunk `row`.
    Part { row: u64, off: u64, len: u64 },
    /// Chunks `first..first + n`.
    Rows { first: u64, n: u64 },
}

fn cut(len: u64, count: u64, out: &mut impl FnMut(Cut)) {
    if len >= TASK_BYTES {
        for row in 0..count {
            let mut off = 0;
            while off < len {
                let n = (len - off).min(TASK_BYTES);
                out(Cut::Part { row, off, len: n });
                off += n;
            }
        }
    } else {
        let per = (TASK_BYTES / len).max(1);
        let mut first = 0;
        while first < count {
            let n = (count - first).min(per);
            out(Cut::Rows { first, n });
            first += n;
        }
    }
}

/// Splits runs into tasks of about [`TASK_BYTES`] each: long contiguous runs into pieces,
/// strided runs into groups of rows (long rows into pieces of rows). Copies stay in
/// `(file, src)` order, so the workers, taking tasks in order, stream each file forwards.
pub(crate) fn tasks(copies: &[CopyRun], zeros: &[ZeroRun]) -> Vec<Task> {
    let mut out = Vec::new();
    for r in copies {
        let mut r = *r;
        if r.len == 0 || r.count == 0 {
            continue;
        }
        // Back-to-back chunks on both sides are one contiguous run (validated: no overflow).
        if let Some(one) = r.as_one_chunk() {
            r = one;
        }
        cut(r.len, r.count, &mut |c| {
            out.push(Task::Copy(match c {
                Cut::Part { row, off, len } => r.part(row, off, len),
                Cut::Rows { first, n } => r.rows(first, n),
            }))
        });
    }
    for z in zeros {
        let mut z = *z;
        if z.len == 0 || z.count == 0 {
            continue;
        }
        if let Some(one) = z.as_one_chunk() {
            z = one;
        }
        cut(z.len, z.count, &mut |c| {
            out.push(Task::Zero(match c {
                Cut::Part { row, off, len } => z.part(row, off, len),
                Cut::Rows { first, n } => z.rows(first, n),
            }))
        });
    }
    out
}

/// Page-aligned windows of the files, mapped read-only, each registered with the `SIGBUS`
/// guard for as long as it is mapped.
pub(crate) struct Mapped {
    /// Per plan file: windows sorted by start offset.
    windows: Vec<Vec<Window>>,
}

struct Window {
    start: u64,
    // Declared before `map`: fields drop in order, so the window is unregistered before it
    // is unmapped.
    guard: sigbus::Guard,
    map: Mmap,
}

/// Windows of one file closer than this are mapped as one mapping (unused pages of a mapping
/// cost address space only; they are never read).
const MERGE_GAP: u64 = 16 << 20;
/// Bytes per `madvise(WILLNEED)` call (see [`Mapped::map`]).
const WILLNEED_CALL: usize = 8 << 20;

/// A strided pattern is dense when the pages its chunks touch cover at least a quarter of its
/// span: then reading the whole span sequentially (gaps included) beats one synchronous
/// page-in per chunk on a cold cache.
fn dense(p: &Strided, page: u64) -> bool {
    let touched = (p.len.div_ceil(page) + 1).saturating_mul(page);
    p.count == 1 || touched.saturating_mul(4) >= p.stride
}

impl Mapped {
    /// Maps the page-aligned windows that the runs `wanted` selects from `copies` cover and,
    /// with `advise`, advises the kernel: `WillNeed` for densely read spans, exactly the
    /// touched pages for sparse strided ones, so pages a rank does not need are not read
    /// (in calls of at most 8 MiB: the kernel reads ahead at most about that much per call,
    /// max(`read_ahead_kb`, `max_sectors_kb`), and drops the rest). Every run is checked
    /// against its file's planned length first, so no window extends past the file's end by
    /// more than the last page.
    pub(crate) fn map(
        files: &[PlanFile],
        open: &[Option<File>],
        copies: &[CopyRun],
        wanted: impl Fn(&CopyRun) -> bool,
        advise: bool,
    ) -> Result<Mapped> {
        let page = page_size();
        let mut spans: Vec<Vec<(u64, u64)>> = vec![Vec::new(); files.len()];
        let mut advice: Vec<Vec<(u64, u64)>> = vec![Vec::new(); files.len()];
        for (i, r) in copies.iter().enumerate() {
            if r.len == 0 || r.count == 0 || !wanted(r) {
                continue;
            }
            let (Some(pf), Some(v), Some(adv)) = (
                files.get(r.file as usize),
                spans.get_mut(r.file as usize),
                advice.get_mut(r.file as usize),
            ) else {
                return Err(bad_plan(format!("copy run {i} names file #{}", r.file)));
            };
            let p = r.src_pattern();
            let end = p
                .end()
                .filter(|&e| e <= pf.identity.len)
                .ok_or_else(|| bad_plan(format!("copy run {i} lies outside its file")))?;
            v.push((p.start / page * page, end.div_ceil(page) * page));
            if dense(&p, page) {
                adv.push((p.start / page * page, end.div_ceil(page) * page));
            } else {
                // Sparse strided runs: ask for exactly the pages of each chunk (merged when
                // adjacent), so a cold load reads them asynchronously and no more.
                adv.extend(
                    p.chunks()
                        .map(|(s, e)| (s / page * page, e.div_ceil(page) * page)),
                );
            }
        }
        let mut windows = Vec::with_capacity(files.len());
        for (fi, (mut v, mut adv)) in spans.into_iter().zip(advice).enumerate() {
            let mut ws = Vec::new();
            if v.is_empty() {
                windows.push(ws);
                continue;
            }
            let (Some(pf), Some(Some(file))) = (files.get(fi), open.get(fi)) else {
                return Err(bad_plan(format!("file #{fi} was not opened")));
            };
            merge_intervals(&mut v, MERGE_GAP);
            for (s, e) in v {
                let len = usize::try_from(e - s).map_err(|_| Error::Load {
                    rank: None,
                    file: Some(pf.path.clone()),
                    reason: "window too large".into(),
                })?;
                // SAFETY: read-only private mapping of a file whose identity was just
                // checked; a page that vanishes under a concurrent truncation faults into
                // the SIGBUS guard registered next, never kills the process.
                let map = unsafe { MmapOptions::new().offset(s).len(len).map(file) }
                    .map_err(|e| Error::io(&pf.path, e))?;
                let guard = sigbus::register(map.as_ptr(), map.len()).ok_or_else(|| {
                    Error::NoSigbusGuard {
                        file: pf.path.clone(),
                    }
                })?;
                ws.push(Window {
                    start: s,
                    guard,
                    map,
                });
            }
            // Hints only; failure changes speed, never results.
            if advise {
                merge_intervals(&mut adv, 0);
            } else {
                adv.clear();
            }
            for (s, e) in adv {
                let Some(w) = find_window(&ws, s, e - s) else {
                    continue;
                };
                let mut off = (s - w.start) as usize;
                let end = ((e - w.start) as usize).min(w.map.len());
                while off < end {
                    let n = (end - off).min(WILLNEED_CALL);
                    let _ = w.map.advise_range(Advice::WillNeed, off, n);
                    off += n;
                }
            }
            windows.push(ws);
        }
        Ok(Mapped { windows })
    }

    /// The mapped bytes `[src, src + len)` of plan file `file`.
    pub(crate) fn slice(&self, file: u32, src: u64, len: u64) -> Option<&[u8]> {
        let ws = self.windows.get(file as usize)?;
        let w = find_window(ws, src, len)?;
        let off = usize::try_from(src - w.start).ok()?;
        w.map.get(off..off.checked_add(usize::try_from(len).ok()?)?)
    }

    /// Drops the page-table entries of the whole pages inside `[src, end)` of file `file`
    /// once they have been copied, so consumed file pages do not stay in this process's
    /// resident set (a later access would fault them in again from the page cache).
    fn release(&self, file: u32, src: u64, end: u64) {
        let page = page_size();
        let (s, e) = (src.div_ceil(page) * page, end / page * page);
        if e <= s {
            return;
        }
        let Some(w) = self
            .windows
            .get(file as usize)
            .and_then(|ws| find_window(ws, s, e - s))
        else {
            return;
        };
        let off = (s - w.start) as usize;
        // SAFETY: a read-only private file mapping: MADV_DONTNEED only drops page-table
        // entries, and a later read faults the same file bytes in again. Hint only.
        let _ = unsafe {
            w.map
                .unchecked_advise_range(UncheckedAdvice::DontNeed, off, (e - s) as usize)
        };
    }

    /// Whether at least half of the pages of `[src, end)` of file `file` are in the page
    /// cache (`mincore`; `false` when unknown).
    fn mostly_resident(&self, file: u32, src: u64, end: u64) -> bool {
        let page = page_size();
        let (s, e) = (src / page * page, end.div_ceil(page) * page);
        let Some(w) = self
            .windows
            .get(file as usize)
            .and_then(|ws| find_window(ws, s, e.saturating_sub(s)))
        else {
            return false;
        };
        mostly_resident(&w.map, w.start, s, e)
    }

    /// The file of the first window that hit a page past its file's end, if any.
    pub(crate) fn faulted_file(&self) -> Option<usize> {
        self.windows
            .iter()
            .position(|ws| ws.iter().any(|w| w.guard.faulted()))
    }

    /// An error naming the first input file that was truncated while mapped, if any.
    pub(crate) fn check(&self, files: &[PlanFile]) -> Result<()> {
        match self.faulted_file() {
            None => Ok(()),
            Some(f) => match files.get(f) {
                Some(pf) => Err(truncated(pf, "a mapped page vanished")),
                None => Err(bad_plan(format!("file #{f} truncated during load"))),
            },
        }
    }
}

/// Whether at least half of the pages of file bytes `[src, end)` are in the page cache, asked
/// through `map`, a mapping of the file from byte `map_start` (page-aligned) that covers
/// `src` (`false` when unknown).
fn mostly_resident(map: &Mmap, map_start: u64, src: u64, end: u64) -> bool {
    let page = page_size();
    let (s, e) = (src / page * page, end.div_ceil(page) * page);
    let Some(off) = s
        .checked_sub(map_start)
        .and_then(|o| usize::try_from(o).ok())
        .filter(|&o| o < map.len())
    else {
        return false;
    };
    let len = usize::try_from(e.saturating_sub(s))
        .unwrap_or(usize::MAX)
        .min(map.len() - off);
    let pages = len.div_ceil(page as usize);
    let mut vec: Vec<u8> = Vec::new();
    if vec.try_reserve_exact(pages).is_err() {
        return false;
    }
    vec.resize(pages, 0);
    // SAFETY: `[ptr + off, + len)` lies inside a live mapping (page-aligned start, as
    // mappings start on pages) and `vec` holds one byte per page of it.
    let rc = unsafe {
        libc::mincore(
            map.as_ptr().add(off) as *mut libc::c_void,
            len,
            vec.as_mut_ptr(),
        )
    };
    rc == 0 && vec.iter().filter(|&&b| b & 1 == 1).count() * 2 >= pages
}

/// Bytes per residency flag of [`DirectFiles`]: a task's size, so a task's decision reads
/// one or two flags.
const RESIDENCY_CHUNK: u64 = TASK_BYTES;

/// Pages sampled per [`RESIDENCY_CHUNK`] by [`residency`].
const RESIDENCY_SAMPLES: usize = 4;

/// Per [`RESIDENCY_CHUNK`] of the file `map` maps (from byte 0), whether the page cache holds
/// it: at least half of [`RESIDENCY_SAMPLES`] pages spread over the chunk are resident
/// (`mincore`). Asked once per file at the start of a load (per-task calls over whole spans
/// contended with the page faults and cost seconds at tp 1) and sampled, so that a 700 GB
/// checkpoint costs about 350k one-page calls rather than 170M page lookups. `None` when
/// unknown.
fn residency(map: &Mmap) -> Option<Vec<bool>> {
    let page = page_size() as usize;
    let chunk = RESIDENCY_CHUNK as usize;
    let n = map.len().div_ceil(chunk);
    let mut flags = Vec::new();
    flags.try_reserve_exact(n).ok()?;
    for c in 0..n {
        let start = c * chunk;
        let len = chunk.min(map.len() - start);
        let mut hits = 0;
        for k in 0..RESIDENCY_SAMPLES {
            let off = (start + len * k / RESIDENCY_SAMPLES) / page * page;
            let mut v = 0u8;
            // SAFETY: `off` is a page-aligned offset inside the live mapping; one byte out.
            let rc =
                unsafe { libc::mincore(map.as_ptr().add(off) as *mut libc::c_void, 1, &mut v) };
            if rc != 0 {
                return None;
            }
            hits += usize::from(v & 1 == 1);
        }
        flags.push(hits * 2 >= RESIDENCY_SAMPLES);
    }
    Some(flags)
}

fn find_window(ws: &[Window], src: u64, len: u64) -> Option<&Window> {
    let i = ws.partition_point(|w| w.start <= src).checked_sub(1)?;
    let w = ws.get(i)?;
    (src.checked_add(len)? <= w.start + w.map.len() as u64).then_some(w)
}

/// Page-rounded union of the file pages the runs touch (what a mapping reads): the plan's
/// [`read_bytes`], which needs runs sorted by `(file, src)`.
pub(crate) fn touched_pages(copies: &[CopyRun]) -> u64 {
    if copies
        .windows(2)
        .all(|w| (w[0].file, w[0].src) <= (w[1].file, w[1].src))
    {
        read_bytes(copies)
    } else {
        let mut sorted = copies.to_vec();
        sorted.sort_by_key(|r| (r.file, r.src));
        read_bytes(&sorted)
    }
}

/// Whether `mode` maps the file for run `r` (strided gathers, or everything for `Mmap`).
pub(crate) fn needs_mapping(mode: IoMode, pread_contiguous: bool, r: &CopyRun) -> bool {
    let contiguous = r.src_pattern().is_contiguous() && r.dst_pattern().is_contiguous();
    match mode {
        IoMode::Pread | IoMode::Direct => false,
        IoMode::Mmap => !(contiguous && pread_contiguous),
        IoMode::Auto => !contiguous,
    }
}

/// `MemAvailable` of `/proc/meminfo` in bytes: what the kernel estimates can be allocated
/// without swapping (free memory plus reclaimable cache). `None` where it cannot be read
/// (then files are taken to fit in the page cache).
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Alignment of direct I/O offsets, lengths and buffers: the largest logical block size in
/// use (4 KiB disks; 512-byte ones accept it too).
const DIRECT_ALIGN: u64 = 4096;

/// Per plan file, what direct I/O needs: a second handle opened with `O_DIRECT` (checked
/// against the planned identity like the first) and, for [`IoMode::Auto`], a mapping of the
/// whole file used only to ask `mincore` which pages are cached (never read, so a
/// truncation cannot fault through it).
pub(crate) struct DirectFiles {
    /// Per file, the `O_DIRECT` handle uncached spans are read with (none where the files
    /// fit in the page cache under `Auto`: they are read buffered and stay cached).
    handles: Vec<Option<File>>,
    /// Per file, [`residency`] flags (`Auto` only).
    cached: Vec<Option<Vec<bool>>>,
}

impl DirectFiles {
    /// Opens what `mode` needs: nothing for `Mmap`/`Pread`; for `Direct` every file the
    /// runs read (an error naming the file if its filesystem refuses `O_DIRECT`); for `Auto`
    /// the same where possible (a file without it is read buffered).
    fn open(
        files: &[PlanFile],
        open: &[Option<File>],
        mode: IoMode,
        page_cache_limit: Option<u64>,
    ) -> Result<DirectFiles> {
        let mut d = DirectFiles {
            handles: Vec::new(),
            cached: Vec::new(),
        };
        if !matches!(mode, IoMode::Auto | IoMode::Direct) {
            return Ok(d);
        }
        let direct = mode == IoMode::Direct || {
            let total: u64 = files
                .iter()
                .zip(open)
                .filter(|(_, f)| f.is_some())
                .map(|(pf, _)| pf.identity.len)
                .sum();
            let limit = page_cache_limit.or_else(|| mem_available().map(|m| m / 2));
            limit.is_some_and(|l| total > l)
        };
        for (pf, f) in files.iter().zip(open) {
            let (mut handle, mut cached) = (None, None);
            if let Some(f) = f {
                if direct {
                    match open_direct(pf) {
                        Ok(h) => handle = Some(h),
                        Err(e) if mode == IoMode::Direct => return Err(e),
                        Err(_) => {}
                    }
                }
                if mode == IoMode::Auto && pf.identity.len > 0 {
                    // SAFETY: read-only private mapping that is only passed to mincore,
                    // never dereferenced, and unmapped right after.
                    let probe = unsafe { MmapOptions::new().map(f) }.ok();
                    cached = probe.as_ref().and_then(residency);
                }
            }
            d.handles.push(handle);
            d.cached.push(cached);
        }
        Ok(d)
    }

    /// The direct handle of file `file`, when the span `[src, end)` should be read with it:
    /// always under `Direct`; under `Auto` when fewer than half its pages are cached.
    fn for_span(&self, mode: IoMode, file: u32, src: u64, end: u64) -> Option<&File> {
        let h = self.handles.get(file as usize)?.as_ref()?;
        if mode == IoMode::Direct {
            return Some(h);
        }
        (self.is_cached(file, src, end) == Some(false)).then_some(h)
    }

    /// Whether at least half of the residency chunks `[src, end)` overlaps are cached
    /// (`None`: unknown).
    fn is_cached(&self, file: u32, src: u64, end: u64) -> Option<bool> {
        let flags = self.cached.get(file as usize)?.as_ref()?;
        let (a, b) = (
            (src / RESIDENCY_CHUNK) as usize,
            (end.div_ceil(RESIDENCY_CHUNK) as usize)
                .max(src as usize / RESIDENCY_CHUNK as usize + 1),
        );
        let span = flags.get(a..b.min(flags.len()))?;
        Some(span.iter().filter(|&&c| c).count() * 2 >= span.len())
    }

    /// Whether most of the bytes will be read directly from storage: under `Direct` always,
    /// under `Auto` when fewer than half the pages of the files with a direct handle are
    /// cached (files that fit in the page cache have none: they are read buffered).
    fn mostly_uncached(&self, mode: IoMode) -> bool {
        if mode == IoMode::Direct {
            return self.handles.iter().any(Option::is_some);
        }
        let (mut cached, mut all) = (0usize, 0usize);
        for (flags, h) in self.cached.iter().zip(&self.handles) {
            if let (Some(flags), Some(_)) = (flags, h) {
                cached += flags.iter().filter(|&&c| c).count();
                all += flags.len();
            }
        }
        cached * 2 < all
    }
}

fn open_direct(pf: &PlanFile) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&pf.path)
        .map_err(|e| Error::io(&pf.path, e))?;
    check_identity(pf, &FileIdentity::of(&f, &pf.path)?)?;
    Ok(f)
}

/// Page-aligned buffers for direct reads, reused across tasks so that their pages are
/// faulted once per load, not once per read. Buffers in use are counted by the staging
/// [`Budget`]; the pool keeps at most as many bytes as that budget.
struct BouncePool {
    free: Mutex<Vec<memmap2::MmapMut>>,
}

impl BouncePool {
    /// A buffer of at least `n` bytes (page-aligned: an anonymous mapping); a kept buffer
    /// too small for it is dropped, so the pool holds one buffer per concurrent reader.
    fn take(&self, n: u64) -> Result<memmap2::MmapMut> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = free.iter().position(|b| b.len() as u64 >= n) {
            return Ok(free.swap_remove(i));
        }
        let small = free.pop();
        drop(free);
        drop(small);
        let len = usize::try_from(n).map_err(|_| Error::OutOfMemory {
            bytes: n,
            what: "a bounce buffer".into(),
            rank: None,
        })?;
        MmapOptions::new()
            .len(len.max(1))
            .map_anon()
            .map_err(|_| Error::OutOfMemory {
                bytes: n,
                what: "a bounce buffer".into(),
                rank: None,
            })
    }

    /// Keeps `b` for the next reader unless the pool already holds `limit` bytes.
    fn give(&self, b: memmap2::MmapMut, limit: u64) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let kept: u64 = free.iter().map(|b| b.len() as u64).sum();
        if kept + b.len() as u64 <= limit {
            free.push(b);
        }
    }
}

/// Reads bytes `[off, off + len)` of `file` (opened with `O_DIRECT`) by reading the
/// enclosing [`DIRECT_ALIGN`]ed range into `buf`, and returns the wanted bytes and the bytes
/// read. A file that ends before `off + len` is a truncation error naming it.
fn read_direct<'b>(
    file: &File,
    pf: &PlanFile,
    buf: &'b mut [u8],
    off: u64,
    len: u64,
) -> Result<(&'b [u8], u64)> {
    let start = off / DIRECT_ALIGN * DIRECT_ALIGN;
    let want_end = off
        .checked_add(len)
        .ok_or_else(|| bad_plan(format!("{}: offsets overflow", pf.path.display())))?;
    let n = (want_end.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN - start) as usize;
    let need = (want_end - start) as usize;
    let buf = buf
        .get_mut(..n)
        .ok_or_else(|| Error::load(None, format!("bounce buffer smaller than {n} bytes")))?;
    let mut got = 0;
    while got < need {
        let Some(rest) = buf.get_mut(got..) else {
            break;
        };
        match file.read_at(rest, start + got as u64) {
            Ok(0) => break,
            Ok(k) => {
                got += k;
                // Only the file's last block comes back short; reading on from an
                // unaligned offset would be refused.
                if k as u64 % DIRECT_ALIGN != 0 {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(&pf.path, e)),
        }
    }
    if got < need {
        return Err(truncated(
            pf,
            format_args!(
                "short read at offset {}: file ended {} bytes early",
                start + got as u64,
                need - got
            ),
        ));
    }
    let s = (off - start) as usize;
    Ok((&buf[s..need], got as u64))
}

/// Runs the copies (and zero fills) into `arena` with the engine `opts.io` selects.
/// `copies` and `zeros` may be any sub-lists of a rank's runs (the communicator reuses this
/// for the tensors a rank reads itself).
pub fn execute(
    files: &[PlanFile],
    copies: &[CopyRun],
    zeros: &[ZeroRun],
    arena: &mut [u8],
    opts: &LoadOptions,
) -> Result<ExecStats> {
    let runs = validate(files, copies, zeros, arena)?;
    let open = open_checked(files, copies)?;
    let mapped = map_for(&runs, &open, opts)?;
    run(&runs, &open, mapped.as_ref(), opts)
}

/// Maps what `opts.io` gathers from a mapping, or nothing.
pub(crate) fn map_for(
    runs: &ValidatedRuns<'_>,
    open: &[Option<File>],
    opts: &LoadOptions,
) -> Result<Option<Mapped>> {
    let want = |r: &CopyRun| needs_mapping(opts.io, opts.pread_contiguous, r);
    if runs.copies.iter().any(want) {
        // Auto decides per task from what is cached, so it must not prefetch first.
        Mapped::map(runs.files, open, runs.copies, want, opts.io != IoMode::Auto).map(Some)
    } else {
        Ok(None)
    }
}

/// Worker threads: `opts.threads`, or enough to keep several reads in flight (I/O-bound
/// threads mostly wait) and every core busy; a load that reads mostly from storage with
/// direct I/O gets more, for more requests in flight (measured: 32 beat 8 cold at tp 1,
/// docs/performance.md; buffered reads have the kernel's readahead instead).
fn workers(opts: &LoadOptions, cold: bool) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    match opts.threads {
        Some(n) if n > 0 => n,
        _ if cold => cores.saturating_mul(2).clamp(32, 64),
        _ => cores.clamp(8, 64),
    }
}

/// Runs `work` on every task from a shared queue on `n` scoped threads (the caller's thread
/// is one of them), in order; the first error stops the others at their next task.
/// Each task also goes through `opts.control` (cancellation and progress), see
/// [`super::controlled`].
fn run_tasks(
    n: usize,
    tasks: &[Task],
    opts: &LoadOptions,
    work: &(dyn Fn(&Task) -> Result<()> + Sync),
    prepare: Option<&(dyn Fn(&Task) + Sync)>,
) -> Result<()> {
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let first_err: Mutex<Option<Error>> = Mutex::new(None);
    let worker = || {
        while !stop.load(Ordering::Relaxed) {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(t) = tasks.get(i) else {
                break;
            };
            if let Some(prepare) = prepare {
                prepare(t);
            }
            if let Err(e) = super::controlled(opts, t.arena_bytes(), || work(t)) {
                stop.store(true, Ordering::Relaxed);
                let mut slot = first_err.lock().unwrap_or_else(|p| p.into_inner());
                slot.get_or_insert(e);
            }
        }
    };
    let n = n.clamp(1, tasks.len().max(1));
    std::thread::scope(|s| {
        for _ in 1..n {
            // A thread that cannot be spawned just leaves more work to the others.
            let _ = std::thread::Builder::new().spawn_scoped(s, worker);
        }
        worker();
    });
    match first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A counting limit on staging memory: acquiring blocks until the bytes fit, so the budget is
/// never exceeded however many threads run.
struct Budget {
    limit: u64,
    used: Mutex<u64>,
    freed: Condvar,
    peak: AtomicU64,
}

impl Budget {
    /// Waits until `n` more bytes fit, then counts them as held and returns the count to
    /// give back (at most the whole budget: a single larger piece waits for all others to
    /// finish instead of forever).
    fn reserve(&self, n: u64) -> u64 {
        let n = n.min(self.limit);
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used + n > self.limit {
            used = self.freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += n;
        self.peak.fetch_max(*used, Ordering::Relaxed);
        n
    }

    fn acquire(&self, n: u64) -> Result<Vec<u8>> {
        // Callers size pieces within the budget (rows per read come from it).
        self.reserve(n);
        let mut buf = Vec::new();
        let ok = usize::try_from(n)
            .ok()
            .is_some_and(|n| buf.try_reserve_exact(n).is_ok());
        if !ok {
            self.give_back(n);
            return Err(Error::OutOfMemory {
                bytes: n,
                what: "a staging buffer".into(),
                rank: None,
            });
        }
        buf.resize(n as usize, 0);
        Ok(buf)
    }

    fn give_back(&self, n: u64) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        *used = used.saturating_sub(n);
        self.freed.notify_all();
    }

    fn release(&self, buf: Vec<u8>) {
        let n = buf.len() as u64;
        drop(buf);
        self.give_back(n);
    }
}

/// `read_at` until `buf` is full; a short read (the file shrank) is an error naming the
/// input file and the offset.
fn read_full(file: &File, pf: &PlanFile, mut buf: &mut [u8], mut off: u64) -> Result<u64> {
    let total = buf.len() as u64;
    while !buf.is_empty() {
        match file.read_at(buf, off) {
            Ok(0) => {
                return Err(truncated(
                    pf,
                    format_args!(
                        "short read at offset {off}: file ended {} bytes early",
                        buf.len()
                    ),
                ))
            }
            Ok(n) => {
                buf = &mut buf[n..];
                off += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(&pf.path, e)),
        }
    }
    Ok(total)
}

/// Executes validated runs: every task is a zero fill, a positioned read straight into the
/// arena (contiguous runs, unless the mode maps them), a gather from the mapped windows
/// (strided runs under `Mmap`/`Auto`), or staged positioned reads (strided runs under
/// `Pread`). Tasks are taken in file order by [`workers`] threads, so several reads are in
/// flight and the fresh arena's page faults are paid on all of them, during the reads.
pub(crate) fn run(
    runs: &ValidatedRuns<'_>,
    open: &[Option<File>],
    mapped: Option<&Mapped>,
    opts: &LoadOptions,
) -> Result<ExecStats> {
    let files = runs.files;
    let ptr = runs.arena();
    let tasks = tasks(runs.copies, runs.zeros);
    let direct = DirectFiles::open(files, open, opts.io, opts.page_cache_limit)?;
    let threads = workers(opts, direct.mostly_uncached(opts.io));
    if opts.io != IoMode::Mmap || opts.pread_contiguous {
        // Streaming hint: a larger readahead window for the positioned reads.
        for f in open.iter().flatten() {
            // SAFETY: a valid open descriptor; advice only.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
        }
    }
    let budget = Budget {
        limit: opts.staging_budget,
        used: Mutex::new(0),
        freed: Condvar::new(),
        peak: AtomicU64::new(0),
    };
    let per_thread = (opts.staging_budget / threads as u64).min(TASK_BYTES * 4);
    let preads = AtomicU64::new(0);
    let bounce = BouncePool {
        free: Mutex::new(Vec::new()),
    };
    // A direct read of `len` bytes at `off`, through a pooled buffer, handed to `use_bytes`.
    let via_bounce = |h: &File,
                      pf: &PlanFile,
                      off: u64,
                      len: u64,
                      use_bytes: &mut dyn FnMut(&[u8])|
     -> Result<u64> {
        let size = len + 2 * DIRECT_ALIGN;
        let held = budget.reserve(size);
        let res = bounce.take(size).and_then(|mut buf| {
            let res = read_direct(h, pf, &mut buf, off, len).map(|(bytes, n)| {
                use_bytes(bytes);
                n
            });
            bounce.give(buf, opts.staging_budget);
            res
        });
        budget.give_back(held);
        res
    };
    let work = |t: &Task| -> Result<()> {
        let r = match *t {
            Task::Zero(z) => {
                for (s, e) in z.dst_pattern().chunks() {
                    // SAFETY: validated in bounds and disjoint from every other task's chunks.
                    unsafe { ptr.chunk(s, e - s) }.fill(0);
                }
                return Ok(());
            }
            Task::Copy(r) => r,
        };
        let (Some(pf), Some(Some(file))) = (files.get(r.file as usize), open.get(r.file as usize))
        else {
            return Err(bad_plan(format!("file #{} was not opened", r.file)));
        };
        // Auto gathers a strided task from the mapping only when its pages are mostly in the
        // page cache (one copy, no staging); a cold one is read with large positioned reads
        // instead (many requests in flight, instead of one synchronous page-in per fault).
        let gather = needs_mapping(opts.io, opts.pread_contiguous, &r)
            && (opts.io != IoMode::Auto
                || direct
                    .is_cached(r.file, r.src, r.src_pattern().end_saturating())
                    .unwrap_or_else(|| {
                        mapped.is_some_and(|m| {
                            m.mostly_resident(r.file, r.src, r.src_pattern().end_saturating())
                        })
                    }));
        if gather {
            let Some(m) = mapped else {
                return Err(bad_plan(format!("{}: not mapped", pf.path.display())));
            };
            for k in 0..r.count {
                let at = r.rows(k, 1);
                // SAFETY: validated in bounds and disjoint from every other task's chunks.
                let dst = unsafe { ptr.chunk(at.dst, r.len) };
                let src = m.slice(r.file, at.src, r.len).ok_or_else(|| {
                    bad_plan(format!(
                        "{}: offset {} not mapped",
                        pf.path.display(),
                        at.src
                    ))
                })?;
                dst.copy_from_slice(src);
            }
            if opts.io == IoMode::Auto {
                m.release(r.file, r.src, r.src_pattern().end_saturating());
            }
            return Ok(());
        }
        let src_end = r.src_pattern().end_saturating();
        let direct_file = direct.for_span(opts.io, r.file, r.src, src_end);
        if r.count == 1 {
            // SAFETY: validated in bounds and disjoint.
            let dst = unsafe { ptr.chunk(r.dst, r.len) };
            let n = match direct_file {
                Some(h) => via_bounce(h, pf, r.src, r.len, &mut |b| dst.copy_from_slice(b))?,
                None => read_full(file, pf, dst, r.src)?,
            };
            preads.fetch_add(n, Ordering::Relaxed);
            return Ok(());
        }
        // Strided under pread. Rows per staged read: as many whole rows as fit in this
        // thread's share of the budget, when the gaps between rows are small enough that
        // reading them is cheaper than one syscall per row.
        let gap_ok = r.src_stride.saturating_sub(r.len) <= (64 << 10).max(r.len);
        let rows_per = if gap_ok && per_thread >= r.len {
            (per_thread - r.len) / r.src_stride + 1
        } else {
            0
        };
        if rows_per < 2 {
            let mut n = 0;
            for k in 0..r.count {
                let at = r.rows(k, 1);
                // SAFETY: validated in bounds and disjoint.
                let dst = unsafe { ptr.chunk(at.dst, r.len) };
                n += match direct_file {
                    Some(h) => via_bounce(h, pf, at.src, r.len, &mut |b| dst.copy_from_slice(b))?,
                    None => read_full(file, pf, dst, at.src)?,
                };
            }
            preads.fetch_add(n, Ordering::Relaxed);
            return Ok(());
        }
        let mut row = 0;
        while row < r.count {
            let n = (r.count - row).min(rows_per);
            let group = r.rows(row, n);
            let span = group.src_pattern().end_saturating() - group.src;
            if let Some(h) = direct_file {
                let scatter = &mut |buf: &[u8]| {
                    for k in 0..n {
                        let s = (k * r.src_stride) as usize;
                        // SAFETY: validated in bounds and disjoint.
                        let dst = unsafe { ptr.chunk(group.rows(k, 1).dst, r.len) };
                        dst.copy_from_slice(&buf[s..s + r.len as usize]);
                    }
                };
                preads.fetch_add(
                    via_bounce(h, pf, group.src, span, scatter)?,
                    Ordering::Relaxed,
                );
                row += n;
                continue;
            }
            let mut buf = budget.acquire(span)?;
            let res = read_full(file, pf, &mut buf, group.src);
            if let Err(e) = res {
                budget.release(buf);
                return Err(e);
            }
            for k in 0..n {
                let s = (k * r.src_stride) as usize;
                // SAFETY: validated in bounds and disjoint.
                let dst = unsafe { ptr.chunk(group.rows(k, 1).dst, r.len) };
                dst.copy_from_slice(&buf[s..s + r.len as usize]);
            }
            budget.release(buf);
            preads.fetch_add(span, Ordering::Relaxed);
            row += n;
        }
        Ok(())
    };
    let prepare = |t: &Task| populate(ptr, t);
    let prepare: Option<&(dyn Fn(&Task) + Sync)> = runs.ahead.then_some(&prepare);
    let res = run_tasks(threads, &tasks, opts, &work, prepare);
    // A truncation seen through a mapping is the cause of whatever else went wrong.
    if let Some(m) = mapped {
        m.check(files)?;
    }
    res?;
    let read_bytes = match opts.io {
        IoMode::Pread | IoMode::Direct => preads.load(Ordering::Relaxed),
        _ => touched_pages(runs.copies),
    };
    Ok(ExecStats {
        read_bytes,
        peak_staging: budget.peak.load(Ordering::Relaxed),
    })
}
