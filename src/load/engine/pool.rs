//! The worker pool: how many readers a load gets, and the scoped threads that take tasks
//! from a shared queue in order.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use super::tasks::Task;
use crate::load::LoadOptions;
use crate::{Error, Result};

/// Worker threads: `opts.threads`, or enough to keep several reads in flight (I/O-bound
/// threads mostly wait) and every core busy; a load that reads mostly from storage with
/// direct I/O gets more, for more requests in flight (measured: 32 beat 8 cold at tp 1,
/// docs/performance.md; reads through the page cache have the prefetcher instead).
pub(super) fn workers(opts: &LoadOptions, cold: bool) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    match opts.threads {
        Some(n) if n > 0 => n,
        _ if cold => cores.saturating_mul(2).clamp(32, 64),
        _ => cores.clamp(8, 64),
    }
}

/// The shared queue as a companion thread sees it (see [`run_tasks`]).
pub(super) struct Progress<'q> {
    next: &'q AtomicUsize,
    stop: &'q AtomicBool,
}

impl Progress<'_> {
    /// Tasks the workers have taken so far: tasks are taken in order, so `0..taken()`.
    pub(super) fn taken(&self) -> usize {
        self.next.load(Ordering::Relaxed)
    }

    /// Whether a task failed (the workers stop at their next task).
    pub(super) fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// Runs `work` on every task from a shared queue on `n` scoped threads (the caller's thread
/// is one of them), in order; the first error stops the others at their next task.
/// Each task also goes through `opts.control` (cancellation and progress), see
/// [`crate::load::controlled`]. `companion`, if any, runs on one more thread beside them,
/// watching the queue's [`Progress`]; it must return once every task is taken or the
/// workers stopped.
pub(super) fn run_tasks(
    n: usize,
    tasks: &[Task],
    opts: &LoadOptions,
    work: &(dyn Fn(&Task) -> Result<()> + Sync),
    prepare: Option<&(dyn Fn(&Task) + Sync)>,
    companion: Option<&(dyn Fn(&Progress<'_>) + Sync)>,
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
            if let Err(e) = crate::load::controlled(opts, t.arena_bytes(), || work(t)) {
                stop.store(true, Ordering::Relaxed);
                let mut slot = first_err.lock().unwrap_or_else(|p| p.into_inner());
                slot.get_or_insert(e);
            }
        }
    };
    let n = n.clamp(1, tasks.len().max(1));
    std::thread::scope(|s| {
        if let Some(companion) = companion {
            let progress = Progress {
                next: &next,
                stop: &stop,
            };
            // An optimization only: without its thread the workers do the same work.
            let _ = std::thread::Builder::new().spawn_scoped(s, move || companion(&progress));
        }
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
