//! The staging budget: a counting limit on the staging and bounce buffers held at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use crate::{Error, Result};

/// A counting limit on staging memory: acquiring blocks until the bytes fit, so the budget is
/// never exceeded however many threads run.
pub(super) struct Budget {
    limit: u64,
    used: Mutex<u64>,
    freed: Condvar,
    peak: AtomicU64,
}

impl Budget {
    pub(super) fn new(limit: u64) -> Self {
        Budget {
            limit,
            used: Mutex::new(0),
            freed: Condvar::new(),
            peak: AtomicU64::new(0),
        }
    }

    /// Most bytes held at once so far.
    pub(super) fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    /// Waits until `n` more bytes fit, then counts them as held and returns the count to
    /// give back (at most the whole budget: a single larger piece waits for all others to
    /// finish instead of forever).
    pub(super) fn reserve(&self, n: u64) -> u64 {
        let n = n.min(self.limit);
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used + n > self.limit {
            used = self.freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += n;
        self.peak.fetch_max(*used, Ordering::Relaxed);
        n
    }

    pub(super) fn acquire(&self, n: u64) -> Result<Vec<u8>> {
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

    pub(super) fn give_back(&self, n: u64) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        *used = used.saturating_sub(n);
        self.freed.notify_all();
    }

    pub(super) fn release(&self, buf: Vec<u8>) {
        let n = buf.len() as u64;
        drop(buf);
        self.give_back(n);
    }
}
