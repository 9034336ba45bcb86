//! Readahead ahead of the readers. For the spans a load reads from storage through the page
//! cache, one thread asks the kernel (`POSIX_FADV_WILLNEED`) for exactly the pages of the
//! next tasks, up to [`WINDOW`] bytes ahead of the tasks the readers have taken. The kernel
//! submits those reads without waiting for them, so many requests are in flight however
//! the readers are scheduled (on a busy machine a reader that waits for a core also leaves
//! the disk idle), and no page outside the tasks' chunks is read: the readers' handles have
//! the kernel's own readahead off (`POSIX_FADV_RANDOM`), which used to read past the end of
//! every span. The pages stay in the page cache for the next load.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::time::Duration;

use super::pool::Progress;
use super::tasks::Task;
use crate::plan::{page_size, CopyRun};

/// How far ahead of the tasks the readers have taken the prefetcher asks for pages: enough
/// to keep the disk busy while readers wait for a core, small next to the page cache.
const WINDOW: u64 = 256 << 20;

/// The prefetcher of one execution: which tasks it asks pages for, in task order.
pub(super) struct Prefetch<'r> {
    open: &'r [Option<File>],
    tasks: &'r [Task],
    /// Per task, whether it is read from storage through the page cache.
    wanted: Vec<bool>,
    /// Source bytes of the wanted tasks before task `i`, for `i` in `0..=tasks.len()`.
    before: Vec<u64>,
}

impl<'r> Prefetch<'r> {
    /// The prefetcher of the copy tasks `wanted` selects; `None` when it selects none.
    pub(super) fn new(
        open: &'r [Option<File>],
        tasks: &'r [Task],
        wanted: impl Fn(&CopyRun) -> bool,
    ) -> Option<Self> {
        let wanted: Vec<bool> = tasks
            .iter()
            .map(|t| matches!(t, Task::Copy(r) if wanted(r)))
            .collect();
        if !wanted.contains(&true) {
            return None;
        }
        let mut before = Vec::with_capacity(tasks.len() + 1);
        let mut sum = 0u64;
        before.push(0);
        for (t, &w) in tasks.iter().zip(&wanted) {
            if w {
                sum = sum.saturating_add(t.arena_bytes());
            }
            before.push(sum);
        }
        Some(Prefetch {
            open,
            tasks,
            wanted,
            before,
        })
    }

    /// Whether any wanted task reads plan file `file`.
    pub(super) fn reads_file(&self, file: u32) -> bool {
        self.tasks
            .iter()
            .zip(&self.wanted)
            .any(|(t, &w)| w && matches!(t, Task::Copy(r) if r.file == file))
    }

    /// Asks for the pages of the wanted tasks in order, staying at most [`WINDOW`] bytes
    /// ahead of the tasks taken; returns once every task is taken or the load stopped.
    pub(super) fn run(&self, progress: &Progress<'_>) {
        let n = self.tasks.len();
        let mut i = 0;
        while !progress.stopped() {
            let taken = progress.taken().min(n);
            // Tasks already taken are read by their readers, asked for or not.
            i = i.max(taken);
            if i >= n {
                return;
            }
            if self.before[i] - self.before[taken] >= WINDOW {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            if let (true, Task::Copy(r)) = (self.wanted[i], &self.tasks[i]) {
                if let Some(Some(f)) = self.open.get(r.file as usize) {
                    source_pages(r, |s, e| {
                        // SAFETY: a valid open descriptor; advice only (it starts reads of
                        // the range into the page cache and returns).
                        unsafe {
                            libc::posix_fadvise(
                                f.as_raw_fd(),
                                s as libc::off_t,
                                (e - s) as libc::off_t,
                                libc::POSIX_FADV_WILLNEED,
                            )
                        };
                    });
                }
            }
            i += 1;
        }
    }
}

/// The file pages run `r`'s chunks touch, as `[start, end)` ranges in file order, pages
/// shared by neighbouring chunks joined (a validated run: no offset overflows).
pub(super) fn source_pages(r: &CopyRun, mut each: impl FnMut(u64, u64)) {
    let page = page_size();
    let mut cur: Option<(u64, u64)> = None;
    for k in 0..r.count {
        let s = r.rows(k, 1).src;
        let (ps, pe) = (s / page * page, (s + r.len).div_ceil(page) * page);
        match &mut cur {
            Some((_, end)) if ps <= *end => *end = (*end).max(pe),
            _ => {
                if let Some((a, b)) = cur.replace((ps, pe)) {
                    each(a, b);
                }
            }
        }
    }
    if let Some((a, b)) = cur {
        each(a, b);
    }
}
