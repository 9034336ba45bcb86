//! Runs cut into tasks of about [`TASK_BYTES`], the unit the worker pool hands out, and the
//! population of a task's destination pages.

use super::validate::ArenaPtr;
use crate::plan::{page_size, CopyRun, Strided, ZeroRun};

/// Largest piece of work handed to one worker at a time (bytes written to the arena).
pub(crate) const TASK_BYTES: u64 = 8 << 20;

/// A unit of parallel work: part of one copy or zero run.
#[derive(Clone, Copy, Debug)]
pub(super) enum Task {
    /// Copy from a file.
    Copy(CopyRun),
    /// Fill with zeros.
    Zero(ZeroRun),
}

impl Task {
    pub(super) fn dst_pattern(&self) -> Strided {
        match self {
            Task::Copy(c) => c.dst_pattern(),
            Task::Zero(z) => z.dst_pattern(),
        }
    }

    /// Arena bytes this task fills (what progress counts).
    pub(super) fn arena_bytes(&self) -> u64 {
        let d = self.dst_pattern();
        d.len.saturating_mul(d.count)
    }
}

/// Makes the whole pages under task `t`'s destination span resident without changing a byte
/// (`MADV_POPULATE_WRITE`; partial pages at the ends are left to the readers, so nothing
/// outside the arena is touched). Best effort: where the kernel cannot (before Linux 5.14),
/// the reader's copy faults the pages itself.
pub(super) fn populate(arena: ArenaPtr<'_>, t: &Task) {
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
pub(super) fn tasks(copies: &[CopyRun], zeros: &[ZeroRun]) -> Vec<Task> {
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
