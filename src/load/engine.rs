//! Executing copy and zero runs: file checks, run validation, task splitting, and the two I/O
//! engines (memory-mapped windows and positioned reads).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use memmap2::{Advice, Mmap, MmapOptions};
use rayon::prelude::*;

use super::{IoMode, LoadOptions};
use crate::checkpoint::FileIdentity;
use crate::plan::{CopyRun, PlanFile, ZeroRun};
use crate::{Error, Result};

/// Largest piece of work handed to one rayon task (bytes written to the arena).
pub(crate) const TASK_BYTES: u64 = 8 << 20;
/// Windows of one file closer than this are mapped as one mapping (unused pages of a mapping
/// cost address space only; they are never read).
const MERGE_GAP: u64 = 16 << 20;

/// What one execution did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecStats {
    /// Bytes read from storage: the page-rounded union of the pages the mmap engine touches,
    /// or the bytes the pread engine asked the kernel for.
    pub read_bytes: u64,
    /// Most staging memory held at once (pread engine; 0 for mmap).
    pub peak_staging: u64,
}

pub(crate) fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
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
            return Err(Error::Load(format!(
                "plan: copy run names file #{idx}, but the plan has {} files",
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
    let path = pf.path.display();
    if now.len != want.len {
        let how = if now.len < want.len {
            "truncated"
        } else {
            "grown"
        };
        return Err(Error::Load(format!(
            "{path}: file {how} since planning: {} bytes, plan expects {}",
            now.len, want.len
        )));
    }
    let changed = (want.mtime_ns != 0 && now.mtime_ns != want.mtime_ns)
        || (want.dev != 0 && now.dev != want.dev)
        || (want.ino != 0 && now.ino != want.ino);
    if changed {
        return Err(Error::Load(format!(
            "{path}: file replaced or modified since planning (modification time or inode \
             changed); plan again"
        )));
    }
    Ok(())
}

/// One run, with its end offsets computed without overflow.
#[derive(Clone, Copy, Debug)]
struct Span {
    start: u64,
    end: u64,
}

fn bad_plan(msg: String) -> Error {
    Error::Load(format!("plan: {msg}"))
}

/// `[start, end)` of the bytes a strided pattern touches (bounding span).
fn strided_span(start: u64, len: u64, count: u64, stride: u64) -> Option<Span> {
    if count == 0 || len == 0 {
        return Some(Span { start, end: start });
    }
    let end = (count - 1)
        .checked_mul(stride)?
        .checked_add(start)?
        .checked_add(len)?;
    Some(Span { start, end })
}

/// A destination pattern (contiguous or strided) for the overlap check.
#[derive(Clone, Copy)]
struct DstPattern {
    dst: u64,
    len: u64,
    count: u64,
    stride: u64,
    span: Span,
}

impl DstPattern {
    /// The destination of `{what} run {i}` (copy or zero), checked against the arena:
    /// no offset overflow, within `arena_len`, chunks not overlapping each other.
    fn checked(
        what: &str,
        i: usize,
        dst: u64,
        len: u64,
        count: u64,
        stride: u64,
        arena_len: u64,
    ) -> Result<Self> {
        let span = strided_span(dst, len, count, stride)
            .ok_or_else(|| bad_plan(format!("{what} run {i}: arena offsets overflow")))?;
        if span.end > arena_len {
            return Err(bad_plan(format!(
                "{what} run {i} writes up to arena byte {}, arena has {arena_len}",
                span.end
            )));
        }
        if count > 1 && stride < len {
            return Err(bad_plan(format!(
                "{what} run {i}: chunks overlap in the arena"
            )));
        }
        Ok(DstPattern {
            dst,
            len,
            count,
            stride,
            span,
        })
    }
}

/// Checks every run against the files and the arena: within bounds, no arithmetic overflow,
/// and no two destination chunks overlapping (the parallel copy relies on that).
pub(crate) fn validate(
    files: &[PlanFile],
    copies: &[CopyRun],
    zeros: &[ZeroRun],
    arena_len: u64,
) -> Result<()> {
    let mut pats = Vec::with_capacity(copies.len() + zeros.len());
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
        let src = strided_span(r.src, r.len, r.count, r.src_stride)
            .ok_or_else(|| bad_plan(format!("copy run {i}: source offsets overflow")))?;
        if src.end > pf.identity.len {
            return Err(Error::Load(format!(
                "{}: copy run {i} reads up to byte {} but the file has {} bytes",
                pf.path.display(),
                src.end,
                pf.identity.len
            )));
        }
        pats.push(DstPattern::checked(
            "copy",
            i,
            r.dst,
            r.len,
            r.count,
            r.dst_stride,
            arena_len,
        )?);
    }
    for (i, z) in zeros.iter().enumerate() {
        if z.count == 0 || z.len == 0 {
            continue;
        }
        pats.push(DstPattern::checked(
            "zero",
            i,
            z.dst,
            z.len,
            z.count,
            z.dst_stride,
            arena_len,
        )?);
    }
    check_disjoint(&mut pats)
}

/// Runs whose bounding spans do not overlap are disjoint; only groups of interleaved runs
/// (fused parts split on an inner dimension) are checked chunk by chunk.
fn check_disjoint(pats: &mut [DstPattern]) -> Result<()> {
    pats.sort_by_key(|p| (p.span.start, p.span.end));
    let mut i = 0;
    while i < pats.len() {
        let mut j = i + 1;
        let mut end = pats[i].span.end;
        while j < pats.len() && pats[j].span.start < end {
            end = end.max(pats[j].span.end);
            j += 1;
        }
        if j - i > 1 {
            let mut chunks = Vec::new();
            for p in &pats[i..j] {
                for k in 0..p.count {
                    let s = p.dst + k * p.stride; // in range: validated above
                    chunks.push((s, s + p.len));
                }
            }
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

/// A unit of parallel work. `file == None` means zero fill.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Task {
    file: Option<u32>,
    src: u64,
    dst: u64,
    len: u64,
    count: u64,
    src_stride: u64,
    dst_stride: u64,
}

/// Splits runs into tasks of about [`TASK_BYTES`] each: long contiguous runs into pieces,
/// strided runs into groups of rows (long rows into pieces of rows).
pub(crate) fn tasks(copies: &[CopyRun], zeros: &[ZeroRun]) -> Vec<Task> {
    let mut out = Vec::new();
    let runs = copies
        .iter()
        .map(|r| Task {
            file: Some(r.file),
            src: r.src,
            dst: r.dst,
            len: r.len,
            count: r.count,
            src_stride: r.src_stride,
            dst_stride: r.dst_stride,
        })
        .chain(zeros.iter().map(|z| Task {
            file: None,
            src: 0,
            dst: z.dst,
            len: z.len,
            count: z.count,
            src_stride: 0,
            dst_stride: z.dst_stride,
        }));
    for mut t in runs {
        if t.len == 0 || t.count == 0 {
            continue;
        }
        // Back-to-back chunks are one contiguous run (validated: no overflow).
        if t.count > 1 && t.dst_stride == t.len && (t.file.is_none() || t.src_stride == t.len) {
            t.len *= t.count;
            t.count = 1;
        }
        if t.len >= TASK_BYTES {
            for row in 0..t.count {
                let mut off = 0;
                while off < t.len {
                    let n = (t.len - off).min(TASK_BYTES);
                    out.push(Task {
                        src: t.src + row * t.src_stride + off,
                        dst: t.dst + row * t.dst_stride + off,
                        len: n,
                        count: 1,
                        ..t
                    });
                    off += n;
                }
            }
        } else {
            let per = (TASK_BYTES / t.len).max(1);
            let mut row = 0;
            while row < t.count {
                let n = (t.count - row).min(per);
                out.push(Task {
                    src: t.src + row * t.src_stride,
                    dst: t.dst + row * t.dst_stride,
                    count: n,
                    ..t
                });
                row += n;
            }
        }
    }
    // Big tasks first so the tail of the parallel loop is short.
    out.sort_by_key(|t| std::cmp::Reverse(t.len * t.count));
    out
}

/// The arena as a raw pointer, shared by the copy threads. Sound because [`validate`] proved
/// that no two destination chunks overlap and all lie inside the arena.
#[derive(Clone, Copy)]
struct ArenaPtr {
    ptr: *mut u8,
    len: usize,
}
// SAFETY: threads write disjoint ranges only (checked by `validate`).
unsafe impl Send for ArenaPtr {}
// SAFETY: as above.
unsafe impl Sync for ArenaPtr {}

impl ArenaPtr {
    /// # Safety
    /// `[off, off + len)` must lie inside the arena and be written by no other thread now.
    #[allow(clippy::mut_from_ref)]
    unsafe fn chunk(&self, off: u64, len: u64) -> &mut [u8] {
        debug_assert!(off + len <= self.len as u64);
        std::slice::from_raw_parts_mut(self.ptr.add(off as usize), len as usize)
    }
}

/// Page-aligned windows of the files, mapped read-only.
pub(crate) struct Mapped {
    /// Per plan file: windows sorted by start offset.
    windows: Vec<Vec<Window>>,
}

struct Window {
    start: u64,
    map: Mmap,
}

impl Mapped {
    /// Maps the page-aligned windows that `copies` cover and advises the kernel: `WillNeed`
    /// for densely read spans, `Random` (no readahead) for sparse strided ones, so pages a
    /// rank does not need are not read.
    pub(crate) fn map(
        files: &[PlanFile],
        open: &[Option<File>],
        copies: &[CopyRun],
    ) -> Result<Mapped> {
        let page = page_size();
        // (start, end, the run when it is sparse)
        type SpanList = Vec<(u64, u64, Option<CopyRun>)>;
        let mut spans: Vec<SpanList> = vec![Vec::new(); files.len()];
        for r in copies {
            if r.len == 0 || r.count == 0 {
                continue;
            }
            let end = r.src + (r.count - 1) * r.src_stride + r.len; // validated
                                                                    // Dense when the pages the chunks touch cover at least a quarter of the span:
                                                                    // then reading the whole span sequentially (gaps included) beats one synchronous
                                                                    // page-in per chunk on a cold cache.
            let touched = (r.len.div_ceil(page) + 1).saturating_mul(page);
            let dense = r.count == 1 || touched.saturating_mul(4) >= r.src_stride;
            if let Some(v) = spans.get_mut(r.file as usize) {
                v.push((
                    r.src / page * page,
                    end.div_ceil(page) * page,
                    (!dense).then_some(*r),
                ));
            }
        }
        let mut windows = Vec::with_capacity(files.len());
        for (fi, mut v) in spans.into_iter().enumerate() {
            let mut ws = Vec::new();
            if v.is_empty() {
                windows.push(ws);
                continue;
            }
            let (Some(pf), Some(Some(file))) = (files.get(fi), open.get(fi)) else {
                return Err(bad_plan(format!("file #{fi} was not opened")));
            };
            v.sort_unstable_by_key(|x| (x.0, x.1));
            let mut merged: Vec<(u64, u64)> = Vec::new();
            for &(s, e, _) in &v {
                match merged.last_mut() {
                    Some(last) if s <= last.1.saturating_add(MERGE_GAP) => last.1 = last.1.max(e),
                    _ => merged.push((s, e)),
                }
            }
            for (s, e) in merged {
                // The mapping may extend past EOF only within the last page (validated:
                // every run lies inside the file), so no access can fault with SIGBUS.
                let len = usize::try_from(e - s)
                    .map_err(|_| Error::Load(format!("{}: window too large", pf.path.display())))?;
                // SAFETY: read-only private mapping of a file whose identity was just
                // checked; see the module docs on concurrent modification.
                let map = unsafe { MmapOptions::new().offset(s).len(len).map(file) }
                    .map_err(|e| Error::io(&pf.path, e))?;
                ws.push(Window { start: s, map });
            }
            // Hints only; failure changes speed, never results.
            let will_need = |s: u64, e: u64| {
                if let Some(w) = find_window(&ws, s, e - s) {
                    let off = (s - w.start) as usize;
                    let len = ((e - s) as usize).min(w.map.len() - off);
                    let _ = w.map.advise_range(Advice::WillNeed, off, len);
                }
            };
            for &(s, e, sparse) in &v {
                match sparse {
                    None => will_need(s, e),
                    // Sparse strided runs: ask for exactly the pages of each chunk (merged
                    // when adjacent), so a cold load reads them asynchronously and no more.
                    Some(r) => {
                        let mut cur: Option<(u64, u64)> = None;
                        for k in 0..r.count {
                            let cs = r.src + k * r.src_stride;
                            let (ps, pe) = (cs / page * page, (cs + r.len).div_ceil(page) * page);
                            match &mut cur {
                                Some((_, ce)) if ps <= *ce => *ce = (*ce).max(pe),
                                _ => {
                                    if let Some((a, b)) = cur {
                                        will_need(a, b);
                                    }
                                    cur = Some((ps, pe));
                                }
                            }
                        }
                        if let Some((a, b)) = cur {
                            will_need(a, b);
                        }
                    }
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
}

fn find_window(ws: &[Window], src: u64, len: u64) -> Option<&Window> {
    let i = ws.partition_point(|w| w.start <= src).checked_sub(1)?;
    let w = ws.get(i)?;
    (src + len <= w.start + w.map.len() as u64).then_some(w)
}

/// Page-rounded union of the file pages the runs touch (what the mmap engine reads).
pub(crate) fn touched_pages(copies: &[CopyRun]) -> u64 {
    let page = page_size();
    let mut iv: Vec<(u32, u64, u64)> = Vec::new();
    for r in copies {
        if r.len == 0 || r.count == 0 {
            continue;
        }
        if r.count == 1 || r.src_stride <= r.len {
            let end = r.src + (r.count - 1) * r.src_stride + r.len;
            iv.push((r.file, r.src / page, end.div_ceil(page)));
        } else {
            for k in 0..r.count {
                let s = r.src + k * r.src_stride;
                iv.push((r.file, s / page, (s + r.len).div_ceil(page)));
            }
        }
    }
    iv.sort_unstable();
    let mut total = 0;
    let mut cur: Option<(u32, u64, u64)> = None;
    for (f, s, e) in iv {
        match &mut cur {
            Some((cf, _, ce)) if *cf == f && s <= *ce => *ce = (*ce).max(e),
            _ => {
                if let Some((_, cs, ce)) = cur {
                    total += ce - cs;
                }
                cur = Some((f, s, e));
            }
        }
    }
    if let Some((_, cs, ce)) = cur {
        total += ce - cs;
    }
    total * page
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
    validate(files, copies, zeros, arena.len() as u64)?;
    let open = open_checked(files, copies)?;
    match opts.io {
        IoMode::Mmap => {
            let mapped = Mapped::map(files, &open, copies)?;
            run_mmap(files, &open, &mapped, copies, zeros, arena, opts)
        }
        IoMode::Pread => run_pread(files, &open, copies, zeros, arena, opts),
    }
}

/// Runs validated runs from already mapped windows.
pub(crate) fn run_mmap(
    files: &[PlanFile],
    open: &[Option<File>],
    mapped: &Mapped,
    copies: &[CopyRun],
    zeros: &[ZeroRun],
    arena: &mut [u8],
    opts: &LoadOptions,
) -> Result<ExecStats> {
    let ptr = ArenaPtr {
        ptr: arena.as_mut_ptr(),
        len: arena.len(),
    };
    let tasks = tasks(copies, zeros);
    let work = |t: &Task| -> Result<()> {
        for k in 0..t.count {
            // SAFETY: validated in bounds and disjoint from every other task's chunks.
            let dst = unsafe { ptr.chunk(t.dst + k * t.dst_stride, t.len) };
            match t.file {
                None => dst.fill(0),
                Some(f) if t.count == 1 && opts.pread_contiguous => {
                    // Contiguous pieces: one positioned read straight into the arena (a
                    // kernel copy, with no page-table faults on the file mapping).
                    let (Some(pf), Some(Some(file))) =
                        (files.get(f as usize), open.get(f as usize))
                    else {
                        return Err(bad_plan(format!("file #{f} was not opened")));
                    };
                    read_full(file, pf, dst, t.src)?;
                }
                Some(f) => {
                    let src = mapped
                        .slice(f, t.src + k * t.src_stride, t.len)
                        .ok_or_else(|| {
                            let name = files.get(f as usize).map(|p| p.path.display().to_string());
                            bad_plan(format!(
                                "{}: offset {} not mapped",
                                name.unwrap_or_default(),
                                t.src
                            ))
                        })?;
                    dst.copy_from_slice(src);
                }
            }
        }
        Ok(())
    };
    in_pool(opts, || {
        tasks
            .par_iter()
            .try_for_each(|t| super::controlled(opts, t.len * t.count, || work(t)))
    })?;
    Ok(ExecStats {
        read_bytes: touched_pages(copies),
        peak_staging: 0,
    })
}

fn in_pool<R: Send>(opts: &LoadOptions, f: impl FnOnce() -> R + Send) -> R {
    match opts.threads {
        Some(n) if n > 0 => match rayon::ThreadPoolBuilder::new().num_threads(n).build() {
            Ok(pool) => pool.install(f),
            Err(_) => f(),
        },
        _ => f(),
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
    fn acquire(&self, n: u64) -> Vec<u8> {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used + n > self.limit {
            used = self.freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += n;
        self.peak.fetch_max(*used, Ordering::Relaxed);
        drop(used);
        vec![0u8; n as usize]
    }

    fn release(&self, buf: Vec<u8>) {
        let n = buf.len() as u64;
        drop(buf);
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        *used -= n;
        self.freed.notify_all();
    }
}

/// `read_at` until `buf` is full; a short read (file shrank) is an error naming the offset.
fn read_full(file: &File, pf: &PlanFile, mut buf: &mut [u8], mut off: u64) -> Result<u64> {
    let total = buf.len() as u64;
    while !buf.is_empty() {
        match file.read_at(buf, off) {
            Ok(0) => {
                return Err(Error::Load(format!(
                    "{}: short read at offset {off}: file ended {} bytes early",
                    pf.path.display(),
                    buf.len()
                )))
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

/// Positioned reads: contiguous pieces are read straight into the arena; strided groups whose
/// rows sit close together are read as one span into a staging buffer (within the staging
/// budget) and scattered; rows far apart, or any group when the budget is too small, are
/// read row by row straight into the arena.
pub(crate) fn run_pread(
    files: &[PlanFile],
    open: &[Option<File>],
    copies: &[CopyRun],
    zeros: &[ZeroRun],
    arena: &mut [u8],
    opts: &LoadOptions,
) -> Result<ExecStats> {
    let ptr = ArenaPtr {
        ptr: arena.as_mut_ptr(),
        len: arena.len(),
    };
    let tasks = tasks(copies, zeros);
    let threads = opts
        .threads
        .unwrap_or_else(rayon::current_num_threads)
        .max(1) as u64;
    let budget = Budget {
        limit: opts.staging_budget,
        used: Mutex::new(0),
        freed: Condvar::new(),
        peak: AtomicU64::new(0),
    };
    let per_thread = (opts.staging_budget / threads).min(TASK_BYTES * 4);
    let read = AtomicU64::new(0);
    let work = |t: &Task| -> Result<()> {
        let Some(f) = t.file else {
            for k in 0..t.count {
                // SAFETY: validated in bounds and disjoint.
                unsafe { ptr.chunk(t.dst + k * t.dst_stride, t.len) }.fill(0);
            }
            return Ok(());
        };
        let (Some(pf), Some(Some(file))) = (files.get(f as usize), open.get(f as usize)) else {
            return Err(bad_plan(format!("file #{f} was not opened")));
        };
        // Rows per staged read: as many whole rows as fit in this thread's share of the
        // budget, when the gaps between rows are small enough that reading them is cheaper
        // than one syscall per row.
        let gap_ok = t.count > 1 && t.src_stride.saturating_sub(t.len) <= (64 << 10).max(t.len);
        let rows_per = if gap_ok && per_thread >= t.len {
            (per_thread - t.len) / t.src_stride + 1
        } else {
            0
        };
        if rows_per < 2 {
            let mut n = 0;
            for k in 0..t.count {
                // SAFETY: validated in bounds and disjoint.
                let dst = unsafe { ptr.chunk(t.dst + k * t.dst_stride, t.len) };
                n += read_full(file, pf, dst, t.src + k * t.src_stride)?;
            }
            read.fetch_add(n, Ordering::Relaxed);
            return Ok(());
        }
        let mut row = 0;
        while row < t.count {
            let n = (t.count - row).min(rows_per);
            let span = (n - 1) * t.src_stride + t.len;
            let mut buf = budget.acquire(span);
            let res = read_full(file, pf, &mut buf, t.src + row * t.src_stride);
            if let Err(e) = res {
                budget.release(buf);
                return Err(e);
            }
            for k in 0..n {
                let s = (k * t.src_stride) as usize;
                // SAFETY: validated in bounds and disjoint.
                let dst = unsafe { ptr.chunk(t.dst + (row + k) * t.dst_stride, t.len) };
                dst.copy_from_slice(&buf[s..s + t.len as usize]);
            }
            budget.release(buf);
            read.fetch_add(span, Ordering::Relaxed);
            row += n;
        }
        Ok(())
    };
    in_pool(opts, || {
        tasks
            .par_iter()
            .try_for_each(|t| super::controlled(opts, t.len * t.count, || work(t)))
    })?;
    Ok(ExecStats {
        read_bytes: read.load(Ordering::Relaxed),
        peak_staging: budget.peak.load(Ordering::Relaxed),
    })
}
