//! Readahead ahead of the readers. For the spans a load reads from storage through the page
//! cache, one thread asks the kernel (`POSIX_FADV_WILLNEED`) for exactly the pages of the
//! next tasks, up to [`WINDOW`] bytes ahead of the tasks the readers have taken. The kernel
//! submits those reads without waiting for them, so many requests are in flight however
//! the readers are scheduled (on a busy machine a reader that waits for a core also leaves
//! the disk idle), and no page outside the tasks' chunks is read: the readers' handles have
//! the kernel's own readahead off (`POSIX_FADV_RANDOM`), which used to read past the end of
//! every span. The pages stay in the page cache for the next load.
//!
//! A strided run that lies in a span its node reads together ([`NodeSpans`]) is asked for
//! whole, rows and gaps, in one request: the other ranks of the node read the gaps anyway,
//! the kernel skips pages already asked for, and storage sees large sequential reads
//! instead of one small request per row from every rank.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::time::Duration;

use super::pool::Progress;
use super::tasks::Task;
use crate::plan::{page_size, CopyRun, NodeSpans};

/// How far ahead of the tasks the readers have taken the prefetcher asks for pages (bytes
/// asked for): enough to keep the disk busy while readers wait for a core, small next to
/// the page cache.
const WINDOW: u64 = 256 << 20;

/// The prefetcher of one execution: which tasks it asks pages for, in task order.
pub(super) struct Prefetch<'r> {
    open: &'r [Option<File>],
    tasks: &'r [Task],
    /// Per task, whether it is read from storage through the page cache.
    wanted: Vec<bool>,
    /// Per task, the whole page-rounded span asked for when the node reads all of it.
    whole: Vec<Option<(u64, u64)>>,
    node: Option<&'r NodeSpans>,
    /// Bytes asked for by the wanted tasks before task `i`, for `i` in `0..=tasks.len()`.
    before: Vec<u64>,
}

impl<'r> Prefetch<'r> {
    /// The prefetcher of the copy tasks `wanted` selects; `None` when it selects none.
    /// `node`: the spans this rank's node reads together, if known.
    pub(super) fn new(
        open: &'r [Option<File>],
        tasks: &'r [Task],
        wanted: impl Fn(&CopyRun) -> bool,
        node: Option<&'r NodeSpans>,
    ) -> Option<Self> {
        let wanted: Vec<bool> = tasks
            .iter()
            .map(|t| matches!(t, Task::Copy(r) if wanted(r)))
            .collect();
        if !wanted.contains(&true) {
            return None;
        }
        let whole: Vec<Option<(u64, u64)>> = tasks
            .iter()
            .zip(&wanted)
            .map(|(t, &w)| match (w, t, node) {
                (true, Task::Copy(r), Some(node)) if r.count > 1 => {
                    let end = r.rows(r.count - 1, 1).src + r.len;
                    let page = page_size();
                    node.covers(r.file, r.src, end)
                        .then(|| (r.src / page * page, end.div_ceil(page) * page))
                }
                _ => None,
            })
            .collect();
        let mut before = Vec::with_capacity(tasks.len() + 1);
        let mut sum = 0u64;
        before.push(0);
        for ((t, &w), whole) in tasks.iter().zip(&wanted).zip(&whole) {
            if w {
                let asked = whole.map_or_else(|| t.arena_bytes(), |(s, e)| e - s);
                sum = sum.saturating_add(asked);
            }
            before.push(sum);
        }
        Some(Prefetch {
            open,
            tasks,
            wanted,
            whole,
            node,
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
                    let ask = |s: u64, e: u64| {
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
                    };
                    match (self.whole[i], self.node) {
                        (Some((s, e)), Some(node)) => {
                            node.parts(s, e, page_size()).for_each(|(s, e)| ask(s, e))
                        }
                        _ => source_pages(r, ask),
                    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::engine::tasks::tasks;

    /// Rank `r` of 4 taking a quarter of every 8 KiB row of a 2048-row tensor at 4096.
    fn quarter(r: u64) -> CopyRun {
        CopyRun {
            file: 0,
            src: 4096 + r * 2048,
            dst: 0,
            len: 2048,
            count: 2048,
            src_stride: 8192,
            dst_stride: 2048,
        }
    }

    #[test]
    fn strided_tasks_in_a_node_span_ask_for_the_whole_span() {
        let runs: Vec<Vec<CopyRun>> = (0..4).map(|r| vec![quarter(r)]).collect();
        let node = NodeSpans::of_runs(1, runs.iter().map(|r| &r[..]));
        let three = NodeSpans::of_runs(1, runs[..3].iter().map(|r| &r[..]));
        let mine = tasks(&runs[1], &[]);
        let open = [None];
        let page = page_size();
        let hull = |t: &Task| match t {
            Task::Copy(r) => {
                let end = r.rows(r.count - 1, 1).src + r.len;
                (r.src / page * page, end.div_ceil(page) * page)
            }
            Task::Zero(_) => unreachable!(),
        };
        let p = Prefetch::new(&open, &mine, |_| true, Some(&node)).unwrap();
        assert!(p.whole.iter().zip(&mine).all(|(w, t)| *w == Some(hull(t))));
        // What the window counts is what is asked for: the spans, gaps included.
        let asked: u64 = mine.iter().map(|t| hull(t).1 - hull(t).0).sum();
        assert_eq!(p.before.last(), Some(&asked));
        // Without a rank the rows are not covered, and alone nothing is: exact pages.
        for node in [Some(&three), None] {
            let p = Prefetch::new(&open, &mine, |_| true, node).unwrap();
            assert!(p.whole.iter().all(Option::is_none));
            assert_eq!(p.before.last(), Some(&(2048 * 2048)));
        }
    }
}
