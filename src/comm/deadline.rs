//! Deadlines on polled waits, apart from any transport (MPI's requests are polled against
//! them in `mpi.rs`), and the line of a process that was itself stopped.

use std::time::{Duration, Instant};

use crate::Error;

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

#[cfg(test)]
mod tests {
    use super::*;

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
