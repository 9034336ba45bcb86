//! Mapped windows of the files (gathers and views, guarded against truncation) and
//! page-cache residency (`mincore`), which [`IoMode::Auto`] decides by.

use std::fs::File;

use memmap2::{Advice, Mmap, MmapOptions, UncheckedAdvice};

use super::super::sigbus;
use super::tasks::TASK_BYTES;
use super::validate::ValidatedRuns;
use super::{bad_plan, truncated};
use crate::load::{IoMode, LoadOptions};
use crate::plan::{merge_intervals, page_size, read_bytes, CopyRun, PlanFile, Strided};
use crate::{Error, Result};

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
    pub(super) fn release(&self, file: u32, src: u64, end: u64) {
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
    pub(super) fn mostly_resident(&self, file: u32, src: u64, end: u64) -> bool {
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

/// Bytes per residency flag of [`super::direct::DirectFiles`]: a task's size, so a task's decision reads
/// one or two flags.
pub(super) const RESIDENCY_CHUNK: u64 = TASK_BYTES;

/// Pages sampled per [`RESIDENCY_CHUNK`] by [`residency`].
const RESIDENCY_SAMPLES: usize = 4;

/// Per [`RESIDENCY_CHUNK`] of the file `map` maps (from byte 0), whether the page cache holds
/// it: at least half of [`RESIDENCY_SAMPLES`] pages spread over the chunk are resident
/// (`mincore`). Asked once per file at the start of a load (per-task calls over whole spans
/// contended with the page faults and cost seconds at tp 1) and sampled, so that a 700 GB
/// checkpoint costs about 350k one-page calls rather than 170M page lookups. `None` when
/// unknown.
pub(super) fn residency(map: &Mmap) -> Option<Vec<bool>> {
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
pub(super) fn needs_mapping(mode: IoMode, pread_contiguous: bool, r: &CopyRun) -> bool {
    let contiguous = r.src_pattern().is_contiguous() && r.dst_pattern().is_contiguous();
    match mode {
        IoMode::Pread | IoMode::Direct => false,
        IoMode::Mmap => !(contiguous && pread_contiguous),
        IoMode::Auto => !contiguous,
    }
}

/// Maps what `opts.io` gathers from a mapping, or nothing.
pub(super) fn map_for(
    runs: &ValidatedRuns<'_>,
    open: &[Option<File>],
    opts: &LoadOptions,
) -> Result<Option<Mapped>> {
    let want = |r: &CopyRun| needs_mapping(opts.io, opts.pread_contiguous, r);
    if runs.copies().iter().any(want) {
        // Auto decides per task from what is cached, so it must not prefetch first.
        Mapped::map(
            runs.files(),
            open,
            runs.copies(),
            want,
            opts.io != IoMode::Auto,
        )
        .map(Some)
    } else {
        Ok(None)
    }
}
