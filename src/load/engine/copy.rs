//! The I/O of one task: a zero fill, a positioned read straight into the arena (contiguous
//! runs, unless the mode maps them), a gather from the mapped windows (strided runs under
//! `Mmap`/`Auto`), or staged positioned reads (strided runs read from storage), each through
//! the page cache or with direct I/O into pooled bounce buffers.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use super::budget::Budget;
use super::direct::{read_direct, BouncePool, DirectFiles, DIRECT_ALIGN};
use super::mapped::{needs_mapping, Mapped};
use super::pool::{run_tasks, workers, Progress};
use super::prefetch::Prefetch;
use super::tasks::{populate, tasks, Task, TASK_BYTES};
use super::validate::{ArenaPtr, ValidatedRuns};
use super::{bad_plan, truncated, ExecStats, IoPaths};
use crate::load::{IoMode, LoadOptions};
use crate::plan::{CopyRun, PlanFile};
use crate::{Error, Result};

/// Under `Auto`, the smallest uncached contiguous run read with direct I/O: smaller ones
/// (single rows of an inner-dim split cut by the share modes, small tensors) go through the
/// page cache with their pages asked for ahead, many requests in flight from one thread
/// instead of one synchronous request per reader.
const DIRECT_MIN: u64 = 1 << 20;

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
pub(super) fn run(
    runs: &ValidatedRuns<'_>,
    open: &[Option<File>],
    mapped: Option<&Mapped>,
    opts: &LoadOptions,
) -> Result<ExecStats> {
    let files = runs.files();
    let tasks = tasks(runs.copies(), runs.zeros());
    let direct = DirectFiles::open(files, open, opts.io, opts.page_cache_limit)?;
    let threads = workers(opts, direct.mostly_uncached(opts.io));
    let mut copier = Copier {
        files,
        open,
        mapped,
        opts,
        arena: runs.arena(),
        direct,
        budget: Budget::new(opts.staging_budget),
        per_thread: (opts.staging_budget / threads as u64).min(TASK_BYTES * 4),
        preads: AtomicU64::new(0),
        bounce: BouncePool::new(),
        prefetching: false,
        paths: Default::default(),
    };
    let prefetch = Prefetch::new(
        open,
        &tasks,
        |r| copier.reads_storage_buffered(r),
        opts.node_spans.as_deref(),
    );
    copier.prefetching = prefetch.is_some();
    for (i, f) in open.iter().enumerate() {
        let Some(f) = f else { continue };
        let advice = if prefetch.as_ref().is_some_and(|p| p.reads_file(i as u32)) {
            // The prefetcher asks for exactly the pages read: no readahead past them.
            libc::POSIX_FADV_RANDOM
        } else if opts.io != IoMode::Mmap || opts.pread_contiguous {
            // Streaming hint: a larger readahead window for the positioned reads.
            libc::POSIX_FADV_SEQUENTIAL
        } else {
            continue;
        };
        // SAFETY: a valid open descriptor; advice only.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, advice) };
    }
    let work = |t: &Task| copier.task(t);
    let prepare = |t: &Task| populate(copier.arena, t);
    let prepare: Option<&(dyn Fn(&Task) + Sync)> = runs.ahead().then_some(&prepare);
    let ahead = |p: &Progress<'_>| {
        if let Some(f) = &prefetch {
            f.run(p);
        }
    };
    let companion: Option<&(dyn Fn(&Progress<'_>) + Sync)> = prefetch.is_some().then_some(&ahead);
    let res = run_tasks(threads, &tasks, opts, &work, prepare, companion);
    // A truncation seen through a mapping is the cause of whatever else went wrong.
    if let Some(m) = mapped {
        m.check(files)?;
    }
    res?;
    let read_bytes = match opts.io {
        IoMode::Pread | IoMode::Direct => copier.preads.load(Ordering::Relaxed),
        _ => super::touched_pages(runs.copies()),
    };
    Ok(ExecStats {
        read_bytes,
        peak_staging: copier.budget.peak(),
        threads,
        paths: copier.paths.get(),
    })
}

/// [`IoPaths`] counted by concurrent tasks.
#[derive(Default)]
struct PathCounters {
    pread: AtomicU64,
    prefetched: AtomicU64,
    mapped: AtomicU64,
    direct: AtomicU64,
}

impl PathCounters {
    fn get(&self) -> IoPaths {
        IoPaths {
            pread: self.pread.load(Ordering::Relaxed),
            prefetched: self.prefetched.load(Ordering::Relaxed),
            mapped: self.mapped.load(Ordering::Relaxed),
            direct: self.direct.load(Ordering::Relaxed),
        }
    }
}

/// What every task of one execution shares.
struct Copier<'r> {
    files: &'r [PlanFile],
    open: &'r [Option<File>],
    mapped: Option<&'r Mapped>,
    opts: &'r LoadOptions,
    arena: ArenaPtr<'r>,
    direct: DirectFiles,
    budget: Budget,
    /// Staging bytes per reader for strided reads.
    per_thread: u64,
    /// Bytes asked of the kernel by positioned and direct reads.
    preads: AtomicU64,
    bounce: BouncePool,
    /// Whether a [`Prefetch`] asks for the pages of the spans read from storage (then
    /// strided ones are read row by row, exactly their pages, instead of whole spans).
    prefetching: bool,
    paths: PathCounters,
}

/// The source of one copy task: its plan file and the handles it may be read with.
#[derive(Clone, Copy)]
struct Source<'r> {
    pf: &'r PlanFile,
    file: &'r File,
    /// The `O_DIRECT` handle, when this task's span is read with direct I/O.
    direct: Option<&'r File>,
}

impl Copier<'_> {
    fn task(&self, t: &Task) -> Result<()> {
        let r = match *t {
            Task::Zero(z) => {
                for (s, e) in z.dst_pattern().chunks() {
                    // SAFETY: validated in bounds and disjoint from every other task's chunks.
                    unsafe { self.arena.chunk(s, e - s) }.fill(0);
                }
                return Ok(());
            }
            Task::Copy(r) => r,
        };
        let (Some(pf), Some(Some(file))) = (
            self.files.get(r.file as usize),
            self.open.get(r.file as usize),
        ) else {
            return Err(bad_plan(format!("file #{} was not opened", r.file)));
        };
        let bytes = r.len.saturating_mul(r.count);
        if self.gathers(&r) {
            self.paths.mapped.fetch_add(bytes, Ordering::Relaxed);
            return self.gather(pf, &r);
        }
        let src_end = r.src_pattern().end_saturating();
        let src = Source {
            pf,
            file,
            direct: self.direct_handle(&r, src_end),
        };
        let exact = src.direct.is_none() && self.prefetching && self.reads_storage_buffered(&r);
        let n = if r.count == 1 {
            // SAFETY: validated in bounds and disjoint.
            let dst = unsafe { self.arena.chunk(r.dst, r.len) };
            self.read_into(src, r.src, dst)?
        } else {
            self.read_strided(src, &r, exact)?
        };
        self.preads.fetch_add(n, Ordering::Relaxed);
        let path = match (src.direct, exact) {
            (Some(_), _) => &self.paths.direct,
            (None, true) => {
                self.paths.prefetched.fetch_add(bytes, Ordering::Relaxed);
                &self.paths.pread
            }
            (None, false) => &self.paths.pread,
        };
        path.fetch_add(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// The `O_DIRECT` handle run `r` (a task, source ending at `end`) is read with, if any:
    /// every run under `Direct`; under `Auto`, contiguous runs of at least [`DIRECT_MIN`]
    /// bytes not cached (strided and small ones are read through the page cache, exactly
    /// their pages, asked for ahead: see [`Copier::reads_storage_buffered`]).
    fn direct_handle(&self, r: &CopyRun, end: u64) -> Option<&File> {
        if self.opts.io == IoMode::Auto && (r.count > 1 || r.len < DIRECT_MIN) {
            return None;
        }
        self.direct.for_span(self.opts.io, r.file, r.src, end)
    }

    /// Whether run `r` is read from storage through the page cache: under `Auto`, a span not
    /// cached when the load started that is strided (an inner-dim split: only its pages are
    /// read) or of a file read without direct I/O.
    fn reads_storage_buffered(&self, r: &CopyRun) -> bool {
        let end = r.src_pattern().end_saturating();
        self.opts.io == IoMode::Auto
            && self.direct.is_cached(r.file, r.src, end) == Some(false)
            && self.direct_handle(r, end).is_none()
    }

    /// Whether run `r` is gathered from the mapping. Auto gathers a strided task only when
    /// its pages are mostly in the page cache (one copy, no staging); a cold one is read with
    /// large positioned reads instead (many requests in flight, instead of one synchronous
    /// page-in per fault).
    fn gathers(&self, r: &CopyRun) -> bool {
        let (io, end) = (self.opts.io, r.src_pattern().end_saturating());
        needs_mapping(io, self.opts.pread_contiguous, r)
            && (io != IoMode::Auto
                || self
                    .direct
                    .is_cached(r.file, r.src, end)
                    .unwrap_or_else(|| {
                        self.mapped
                            .is_some_and(|m| m.mostly_resident(r.file, r.src, end))
                    }))
    }

    /// Copies run `r` chunk by chunk from the mapped windows.
    fn gather(&self, pf: &PlanFile, r: &CopyRun) -> Result<()> {
        let Some(m) = self.mapped else {
            return Err(bad_plan(format!("{}: not mapped", pf.path.display())));
        };
        for k in 0..r.count {
            let at = r.rows(k, 1);
            // SAFETY: validated in bounds and disjoint from every other task's chunks.
            let dst = unsafe { self.arena.chunk(at.dst, r.len) };
            let src = m.slice(r.file, at.src, r.len).ok_or_else(|| {
                bad_plan(format!(
                    "{}: offset {} not mapped",
                    pf.path.display(),
                    at.src
                ))
            })?;
            dst.copy_from_slice(src);
        }
        if self.opts.io == IoMode::Auto {
            m.release(r.file, r.src, r.src_pattern().end_saturating());
        }
        Ok(())
    }

    /// Reads `dst.len()` bytes at `off` into `dst`; returns the bytes read from the file.
    fn read_into(&self, src: Source<'_>, off: u64, dst: &mut [u8]) -> Result<u64> {
        match src.direct {
            Some(h) => self.via_bounce(h, src.pf, off, dst.len() as u64, &mut |b| {
                dst.copy_from_slice(b)
            }),
            None => read_full(src.file, src.pf, dst, off),
        }
    }

    /// A direct read of `len` bytes at `off`, through a pooled buffer, handed to `use_bytes`.
    fn via_bounce(
        &self,
        h: &File,
        pf: &PlanFile,
        off: u64,
        len: u64,
        use_bytes: &mut dyn FnMut(&[u8]),
    ) -> Result<u64> {
        let size = len + 2 * DIRECT_ALIGN;
        let held = self.budget.reserve(size);
        let res = self.bounce.take(size).and_then(|mut buf| {
            let res = read_direct(h, pf, &mut buf, off, len).map(|(bytes, n)| {
                use_bytes(bytes);
                n
            });
            self.bounce.give(buf, self.opts.staging_budget);
            res
        });
        self.budget.give_back(held);
        res
    }

    /// A strided run read from the file (not gathered): row by row when `exact` (its pages
    /// were asked for ahead, exactly, so each row's read finds its pages cached or in
    /// flight); else rows per staged read are as many whole rows as fit in this reader's
    /// share of the budget, when the gaps between rows are small enough that reading them is
    /// cheaper than one syscall per row; else row by row.
    fn read_strided(&self, src: Source<'_>, r: &CopyRun, exact: bool) -> Result<u64> {
        let gap_ok = !exact && r.src_stride.saturating_sub(r.len) <= (64 << 10).max(r.len);
        let rows_per = if gap_ok && self.per_thread >= r.len {
            (self.per_thread - r.len) / r.src_stride + 1
        } else {
            0
        };
        if rows_per < 2 {
            let mut n = 0;
            for k in 0..r.count {
                let at = r.rows(k, 1);
                // SAFETY: validated in bounds and disjoint.
                let dst = unsafe { self.arena.chunk(at.dst, r.len) };
                n += self.read_into(src, at.src, dst)?;
            }
            return Ok(n);
        }
        let mut n = 0;
        let mut row = 0;
        while row < r.count {
            let rows = (r.count - row).min(rows_per);
            n += self.read_rows(src, r, row, rows)?;
            row += rows;
        }
        Ok(n)
    }

    /// Rows `first..first + rows` of `r`, read as one span (gaps included) into a staging
    /// or bounce buffer and scattered to their destinations.
    fn read_rows(&self, src: Source<'_>, r: &CopyRun, first: u64, rows: u64) -> Result<u64> {
        let group = r.rows(first, rows);
        let span = group.src_pattern().end_saturating() - group.src;
        let scatter = &mut |buf: &[u8]| {
            for k in 0..rows {
                let s = (k * r.src_stride) as usize;
                // SAFETY: validated in bounds and disjoint.
                let dst = unsafe { self.arena.chunk(group.rows(k, 1).dst, r.len) };
                dst.copy_from_slice(&buf[s..s + r.len as usize]);
            }
        };
        if let Some(h) = src.direct {
            return self.via_bounce(h, src.pf, group.src, span, scatter);
        }
        let mut buf = self.budget.acquire(span)?;
        let res = read_full(src.file, src.pf, &mut buf, group.src);
        if res.is_ok() {
            scatter(&buf);
        }
        self.budget.release(buf);
        res.map(|_| span)
    }
}
