//! Deadlines on polled waits, apart from any transport: NCCL's device work is waited for
//! through [`wait_offloaded`] (and tested here without a GPU); MPI's requests follow the same
//! rule in `mpi.rs`.

use std::time::{Duration, Instant};

use super::{timeout_error, Communicator};
use crate::Error;
use crate::Result;

/// How long a rank that timed out waits for the others to show up for the diagnosis (a
/// liveness probe, a barrier): long enough for a live rank on a loaded machine to reach its
/// next poll, short beside the timeout.
pub fn probe_grace(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_secs(1), Duration::from_secs(5))
}

/// A gap this long between two polls (or two watchdog ticks) means this process did not run:
/// it was stopped (SIGSTOP, a debugger) or its machine froze. Polls are at most a fraction of
/// a millisecond apart, ticks 50 ms.
pub const FROZEN: Duration = Duration::from_secs(1);

/// Whether a wait of `timeout` in which this process did not run for `gap` at once overran
/// because of that: a gap of at least [`FROZEN`] and half the timeout.
pub fn frozen(timeout: Duration, gap: Duration) -> bool {
    gap >= FROZEN.max(timeout / 2)
}

/// The deadline of one wait, polled.
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    timeout: Duration,
    start: Instant,
    last: Instant,
    longest_gap: Duration,
}

/// What a poll of a [`Deadline`] says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// Time is left.
    Pending,
    /// The deadline passed while this process waited.
    Passed,
    /// The deadline passed, and during the wait this process itself did not run for the
    /// given time (see [`frozen`]): it was stopped, so the others have given up on it, and
    /// its own wait says nothing about them.
    Frozen(Duration),
}

impl Deadline {
    /// A deadline `timeout` from now.
    pub fn new(timeout: Duration) -> Self {
        let now = Instant::now();
        Deadline {
            timeout,
            start: now,
            last: now,
            longest_gap: Duration::ZERO,
        }
    }

    /// Whether the deadline has passed, and how.
    pub fn poll(&mut self) -> Expiry {
        let now = Instant::now();
        self.longest_gap = self
            .longest_gap
            .max(now.saturating_duration_since(self.last));
        self.last = now;
        if now.saturating_duration_since(self.start) < self.timeout {
            Expiry::Pending
        } else if frozen(self.timeout, self.longest_gap) {
            Expiry::Frozen(self.longest_gap)
        } else {
            Expiry::Passed
        }
    }
}

/// Polls `done` until it returns `Ok(true)` (then `Ok(Expiry::Pending)`) or `timeout` has
/// passed (then how, see [`Deadline::poll`]; `None` waits forever). Spins briefly, then
/// sleeps between polls.
pub fn poll_until(
    timeout: Option<Duration>,
    mut done: impl FnMut() -> Result<bool>,
) -> Result<Expiry> {
    let mut deadline = timeout.map(Deadline::new);
    let mut polls = 0u32;
    loop {
        if done()? {
            return Ok(Expiry::Pending);
        }
        match deadline.as_mut().map_or(Expiry::Pending, Deadline::poll) {
            Expiry::Pending => {}
            expired => return Ok(expired),
        }
        polls = polls.saturating_add(1);
        if polls < 1000 {
            std::hint::spin_loop();
        } else if polls < 2000 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// The error of a rank that was itself stopped past its deadline (`gap`: how long it did not
/// run): the others have given up waiting for it.
pub fn stopped_error(rank: usize, phase: &str, timeout: Duration, gap: Duration) -> Error {
    Error::Timeout {
        rank,
        phase: phase.to_string(),
        after: timeout,
        missing: None,
        silent: None,
        stopped_for: Some(gap),
    }
}

/// Waits for work that runs outside the host (an NCCL collective on the GPU, polled by
/// `done`) under `host`'s timeout, in `phase`.
///
/// Past the deadline, `abort` stops the work (e.g. `ncclCommAbort`), and the ranks meet in a
/// barrier on `host` bounded by [`probe_grace`]: every live rank of the group stalls in the
/// same collective (they arrived together, see the arrival barrier before it) and times out
/// at about the same moment, so the ranks that do not come are the missing ones, named by
/// the host's timeout ([`crate::Error::Timeout`]; over MPI the host ends the job itself).
/// When every rank comes, the error says so. The host's timeout and phase are restored.
pub fn wait_offloaded(
    host: &dyn Communicator,
    phase: &str,
    done: impl FnMut() -> Result<bool>,
    abort: impl FnOnce(),
) -> Result<()> {
    let timeout = host.timeout();
    let t = timeout.unwrap_or_default();
    match poll_until(timeout, done)? {
        Expiry::Pending => return Ok(()),
        Expiry::Frozen(gap) => {
            abort();
            return Err(stopped_error(host.rank(), phase, t, gap));
        }
        Expiry::Passed => abort(),
    }
    host.set_timeout(Some(probe_grace(t)));
    host.set_phase(phase);
    let met = host.barrier();
    host.set_timeout(timeout);
    met?;
    Err(timeout_error(host.rank(), phase, t, Some(&[])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::run_threads;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn work_that_finishes_in_time_is_not_aborted() {
        let aborted = AtomicUsize::new(0);
        let out = run_threads(3, |c| {
            c.set_timeout(Some(Duration::from_secs(30)));
            let mut polls = 0;
            wait_offloaded(
                c,
                "broadcast",
                || {
                    polls += 1;
                    Ok(polls > 50)
                },
                || {
                    aborted.fetch_add(1, Ordering::SeqCst);
                },
            )
        });
        assert!(out.iter().all(Result::is_ok), "{out:?}");
        assert_eq!(aborted.load(Ordering::SeqCst), 0);
        assert_eq!(poll_until(None, || Ok(true)).unwrap(), Expiry::Pending);
        let e = poll_until(None, || Err(Error::comm("NCCL", "device error"))).unwrap_err();
        assert!(e.to_string().contains("device error"), "{e}");
    }

    #[test]
    fn a_rank_missing_from_a_stalled_transfer_is_named() {
        // Rank 2 stopped: it never reaches the collective. Ranks 0 and 1 wait for device work
        // that cannot finish without it, time out, abort the work and name rank 2.
        let aborted = AtomicUsize::new(0);
        let start = Instant::now();
        let out = run_threads(3, |c| {
            if c.rank() == 2 {
                return Ok(());
            }
            c.set_timeout(Some(Duration::from_millis(300)));
            wait_offloaded(
                c,
                "broadcast",
                || Ok(false),
                || {
                    aborted.fetch_add(1, Ordering::SeqCst);
                },
            )
        });
        // The deadline, then the grace (1 s), then the error: not much more.
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{:?}",
            start.elapsed()
        );
        assert!(aborted.load(Ordering::SeqCst) >= 1);
        let named = out
            .iter()
            .take(2)
            .filter_map(|r| match r {
                Err(e @ Error::Timeout { phase, .. }) => Some((phase.clone(), e.missing_ranks())),
                _ => None,
            })
            .collect::<Vec<_>>();
        assert!(!named.is_empty(), "{out:?}");
        for (phase, missing) in named {
            assert_eq!(phase, "broadcast");
            assert_eq!(missing, Some(vec![2]));
        }
        for r in out.iter().take(2) {
            let msg = r.as_ref().unwrap_err().to_string();
            assert!(msg.contains("rank 2 did not arrive"), "{msg}");
        }
    }

    #[test]
    fn a_transfer_stalled_with_every_rank_present_says_so() {
        let out = run_threads(2, |c| {
            c.set_timeout(Some(Duration::from_millis(200)));
            let r = wait_offloaded(c, "read-once round 1 of 1", || Ok(false), || {});
            // The host's timeout is restored.
            assert_eq!(c.timeout(), Some(Duration::from_millis(200)));
            r
        });
        for r in out {
            match r {
                Err(e @ Error::Timeout { .. }) => {
                    assert_eq!(e.missing_ranks(), Some(vec![]));
                    let message = e.to_string();
                    assert!(
                        message.contains(
                            "timed out after 200ms in phase \"read-once round 1 of 1\": every \
                             rank arrived, but the collective did not finish"
                        ),
                        "{message}"
                    );
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_deadline_that_passes_while_this_process_does_not_run_is_frozen() {
        let mut d = Deadline::new(Duration::from_millis(100));
        assert_eq!(d.poll(), Expiry::Pending);
        // Not polled for 1.2 s (as if stopped): the deadline passed in that gap.
        std::thread::sleep(Duration::from_millis(1200));
        match d.poll() {
            Expiry::Frozen(gap) => assert!(gap >= Duration::from_millis(1200), "{gap:?}"),
            other => panic!("{other:?}"),
        }
        // Stopped for 1.2 s of a 2 s wait, continued before the deadline: still its own.
        let mut d = Deadline::new(Duration::from_secs(2));
        std::thread::sleep(Duration::from_millis(1200));
        assert_eq!(d.poll(), Expiry::Pending);
        let e = loop {
            match d.poll() {
                Expiry::Pending => std::thread::sleep(Duration::from_millis(5)),
                e => break e,
            }
        };
        assert!(matches!(e, Expiry::Frozen(_)), "{e:?}");
        // Polled all along: passed.
        let mut d = Deadline::new(Duration::from_millis(100));
        let e = loop {
            match d.poll() {
                Expiry::Pending => std::thread::sleep(Duration::from_millis(5)),
                e => break e,
            }
        };
        assert_eq!(e, Expiry::Passed);
        let e = stopped_error(
            2,
            "planning",
            Duration::from_secs(3),
            Duration::from_millis(12_300),
        );
        assert_eq!(
            e.to_string(),
            "rank 2: this process was stopped for 12s (SIGSTOP or a debugger?) while waiting in \
             phase \"planning\" (deadline 3s): the other ranks have given up on it"
        );
    }
}
